"""The readable torch encoder agrees with the sentence-transformers reference."""

from __future__ import annotations

import os

import numpy as np
import torch

from models.checkpoint import checkpoint_dir
from models.corpus import stdlib_sentences
from models.encoder import FeedForward, SelfAttention, load_encoder
from models.tokenization import load_tokenizer


def test_matches_sentence_transformers_on_real_text() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    texts = [*stdlib_sentences(evaluation=64, calibration=16).evaluation, "x", "word " * 400]
    reference = SentenceTransformer(str(checkpoint_dir()), device="cpu").encode(
        texts, convert_to_numpy=True
    )
    ids, mask = load_tokenizer().encode_batch(texts)
    with torch.inference_mode():
        ours = load_encoder()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.99999
    assert ids.shape[1] == 256  # truncation at the checkpoint's max_seq_length


def test_blocks_are_shardable_modules() -> None:
    layer = load_encoder().layers[0]
    assert isinstance(layer.attention, SelfAttention)
    assert isinstance(layer.feed_forward, FeedForward)
    linears = [layer.attention.query, layer.attention.output, layer.feed_forward.intermediate]
    assert all(isinstance(m, torch.nn.Linear) for m in linears)


def test_attention_runs_on_a_column_shard_of_heads() -> None:
    attention = load_encoder().layers[0].attention
    hidden = torch.randn(2, 5, 384)
    bias = torch.zeros(2, 1, 1, 5)
    full_context = attention.output.weight.shape[1]
    with torch.inference_mode():
        full = attention(hidden, bias)
        # Two ranks, 6 heads each: shard q/k/v by output rows, output projection by input columns.
        partial = torch.zeros_like(full)
        for rank in range(2):
            cols = slice(rank * full_context // 2, (rank + 1) * full_context // 2)
            shard = SelfAttention.__new__(SelfAttention)
            torch.nn.Module.__init__(shard)
            shard.head_dim = attention.head_dim
            for name in ("query", "key", "value"):
                src = getattr(attention, name)
                lin = torch.nn.Linear(384, 192)
                lin.weight.copy_(src.weight[cols])
                lin.bias.copy_(src.bias[cols])
                setattr(shard, name, lin)
            out = torch.nn.Linear(192, 384, bias=rank == 0)
            out.weight.copy_(attention.output.weight[:, cols])
            if rank == 0:
                out.bias.copy_(attention.output.bias)
            shard.output = out
            partial += shard(hidden, bias)  # the all-reduce
    assert torch.allclose(full, partial, atol=1e-5)
