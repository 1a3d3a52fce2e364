"""Megatron-style tensor parallelism for the ``models`` MiniLM, on ``torch.distributed``.

Every rank builds the full :class:`models.encoder.SentenceEncoder` from the same safetensors,
then keeps only its shard of each transformer block:

* attention ``query``/``key``/``value`` are **column-parallel**: rank ``r`` keeps output rows
  ``[r*C/tp, (r+1)*C/tp)``, i.e. heads ``[r*H/tp, (r+1)*H/tp)`` (the rows are head-major). The
  models' ``SelfAttention`` derives its head count from ``query.out_features``, so its own
  forward runs unchanged on the local heads.
* attention ``output`` is **row-parallel**: rank ``r`` keeps the input columns of its heads,
  computes a partial ``(B, T, C)`` and an all-reduce (sum) adds the partials; the bias is added
  once, after the all-reduce.
* the feed-forward ``intermediate`` is column-parallel (a slice of the 1536 units, GELU is
  element-wise so it stays local) and its ``output`` is row-parallel with an all-reduce.

Embeddings, LayerNorms, residuals, pooling and normalisation are replicated (tiny), so after
each all-reduce every rank holds the same full hidden states. Two all-reduces per layer, twelve
per forward for MiniLM-L6. The TP size must divide the head count (12: 1, 2, 3, 4, 6, 12).

This module knows torch and ``models``; it knows nothing of MQTT, batching or processes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models.checkpoint import EncoderConfig
from models.encoder import EncoderLayer, FeedForward, SelfAttention, SentenceEncoder, load_encoder

logger = logging.getLogger(__name__)


class TensorParallelError(ValueError):
    """The TP size does not fit the model (permanent: pick a divisor of the head count)."""


@dataclass(frozen=True)
class TPContext:
    """Where this rank sits in its tensor-parallel group."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None
    """None with ``world_size == 1`` (no communication), else an initialised group."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise TensorParallelError(f"rank {self.rank} outside world size {self.world_size}")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place; a no-op for a group of one."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def valid_tp_sizes(config: EncoderConfig) -> list[int]:
    """TP sizes this model can be split into: the divisors of its head count."""
    return [n for n in range(1, config.num_heads + 1) if config.num_heads % n == 0]


def check_tp_size(config: EncoderConfig, tp: int) -> None:
    if tp not in valid_tp_sizes(config) or config.intermediate_size % tp:
        raise TensorParallelError(
            f"TP size {tp} must divide {config.num_heads} heads and "
            f"{config.intermediate_size} FFN units; choose one of {valid_tp_sizes(config)}"
        )


def _shard_bounds(size: int, ctx: TPContext) -> slice:
    per_rank = size // ctx.world_size
    return slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


class ColumnParallelLinear(nn.Linear):
    """``y_r = x @ W[rows_r].T + b[rows_r]``: this rank's slice of the output features.

    No communication: the next op (attention on local heads, GELU) works on the slice.
    """

    @classmethod
    def from_dense(cls, dense: nn.Linear, ctx: TPContext) -> ColumnParallelLinear:
        rows = _shard_bounds(dense.out_features, ctx)
        shard = cls(dense.in_features, rows.stop - rows.start, bias=dense.bias is not None)
        with torch.no_grad():
            shard.weight.copy_(dense.weight[rows])  # (C_out/tp, C_in)
            if dense.bias is not None:
                shard.bias.copy_(dense.bias[rows])  # (C_out/tp,)
        return shard.to(dense.weight.device, dense.weight.dtype)


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r @ W[:, cols_r].T) + b``: partial products summed over ranks."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ctx: TPContext) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (C_out, C_in/tp)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (C_out,)
        self.ctx = ctx
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]

    @classmethod
    def from_dense(cls, dense: nn.Linear, ctx: TPContext) -> RowParallelLinear:
        cols = _shard_bounds(dense.in_features, ctx)
        weight = dense.weight.detach()[:, cols].clone()  # (C_out, C_in/tp)
        bias = None if dense.bias is None else dense.bias.detach().clone()
        return cls(weight, bias, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = nn.functional.linear(x, self.weight)  # (B, T, C_out), this rank's share
        out = self.ctx.all_reduce(partial)  # (B, T, C_out), the full product on every rank
        return out if self.bias is None else out + self.bias


def shard_self_attention(attention: SelfAttention, ctx: TPContext) -> SelfAttention:
    """Split heads across ranks in place: q/k/v column-parallel, output row-parallel."""
    attention.query = ColumnParallelLinear.from_dense(attention.query, ctx)
    attention.key = ColumnParallelLinear.from_dense(attention.key, ctx)
    attention.value = ColumnParallelLinear.from_dense(attention.value, ctx)
    attention.output = RowParallelLinear.from_dense(attention.output, ctx)  # type: ignore[assignment]
    return attention


def shard_feed_forward(feed_forward: FeedForward, ctx: TPContext) -> FeedForward:
    """Split the FFN units across ranks in place: intermediate column-, output row-parallel."""
    feed_forward.intermediate = ColumnParallelLinear.from_dense(feed_forward.intermediate, ctx)
    feed_forward.output = RowParallelLinear.from_dense(feed_forward.output, ctx)  # type: ignore[assignment]
    return feed_forward


class TPSentenceEncoder(nn.Module):
    """The models' ``SentenceEncoder`` with every block sharded for one rank.

    Embeddings, LayerNorms, mean pooling and L2 normalisation are the models' own code; every
    rank returns the same ``(B, C)`` unit vectors.
    """

    def __init__(self, dense: SentenceEncoder, ctx: TPContext) -> None:
        super().__init__()
        check_tp_size(dense.config, ctx.world_size)
        self.ctx = ctx
        self.config = dense.config
        for layer in dense.layers:
            assert isinstance(layer, EncoderLayer)
            shard_self_attention(layer.attention, ctx)
            shard_feed_forward(layer.feed_forward, ctx)
        self.encoder = dense

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)


def build_tp_encoder(
    ctx: TPContext,
    *,
    checkpoint: Path | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TPSentenceEncoder:
    """Load the full checkpoint, shard it for ``ctx.rank``, move it to ``device``/``dtype``."""
    dense = load_encoder(checkpoint)
    model = TPSentenceEncoder(dense, ctx).eval()
    model = model.to(device=device or torch.device("cpu"), dtype=dtype)
    logger.info(
        "tensor-parallel shard ready",
        extra={
            "rank": ctx.rank,
            "tp": ctx.world_size,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    )
    return model


def default_backend(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp_group(
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    timeout_s: float = 60.0,
) -> TPContext:
    """Join the group through ``env://`` (``MASTER_ADDR``/``MASTER_PORT``, as torchrun sets).

    A group of one needs no rendezvous. ``timeout_s`` bounds every collective, so a rank whose
    peer hangs fails instead of waiting forever.
    """
    if world_size == 1:
        return TPContext(rank=0, world_size=1)
    dist.init_process_group(
        backend=default_backend(device),
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return TPContext(rank=rank, world_size=world_size, group=dist.group.WORLD)


def _embed_rank(
    rank: int,
    world_size: int,
    port: int,
    ids: torch.Tensor,
    mask: torch.Tensor,
    out: str,
    threads: int,
) -> None:
    """One rank of :func:`embed_tensor_parallel` (module level so ``spawn`` can pickle it)."""
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = init_tp_group(rank=rank, world_size=world_size, device=torch.device("cpu"))
    try:
        model = build_tp_encoder(ctx)
        with torch.inference_mode():
            embeddings = model(ids, mask)  # (B, C) on every rank
        np.save(Path(out) / f"rank{rank}.npy", embeddings.numpy())
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def embed_tensor_parallel(
    input_ids: npt.NDArray[np.int64],
    attention_mask: npt.NDArray[np.int64],
    *,
    tp: int,
    port: int,
    threads_per_rank: int = 1,
) -> list[npt.NDArray[np.float32]]:
    """Embed one batch with ``tp`` spawned gloo ranks; returns every rank's ``(B, C)`` result.

    For checks and benchmarks (each call starts a group); serving uses :mod:`replica`.
    """
    ids, mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
    with tempfile.TemporaryDirectory(prefix="spillway-tp-") as out:
        mp.spawn(
            _embed_rank,
            args=(tp, port, ids, mask, out, threads_per_rank),
            nprocs=tp,
            join=True,
        )
        return [np.load(Path(out) / f"rank{r}.npy") for r in range(tp)]


def embed_reference(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """The models' FP32 reference for ``texts`` (no sharding, no process group)."""
    from models.tokenization import load_tokenizer

    ids, mask = load_tokenizer().encode_batch(list(texts))
    with torch.inference_mode():
        out = load_encoder()(torch.from_numpy(ids), torch.from_numpy(mask))
    return np.asarray(out.numpy(), dtype=np.float32)
