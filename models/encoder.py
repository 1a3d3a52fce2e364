"""Readable torch implementation of the all-MiniLM-L6-v2 sentence encoder.

BERT encoder -> mean pooling over real tokens -> L2 normalisation, loaded straight from the
checkpoint's
safetensors (no ``transformers`` at run time). This is the source of truth every exported variant is
checked against, and the building blocks are shaped for reuse by the tensor-parallel cloud pool:

* :class:`SelfAttention` owns ``query``/``key``/``value`` (shard column-wise: each rank keeps a
slice of
  heads) and ``output`` (shard row-wise, all-reduce after it). The number of heads is derived from
  ``query.out_features`` so a sharded copy runs on its local heads without further changes.
* :class:`FeedForward` owns ``intermediate`` (column-wise) and ``output`` (row-wise).
* Residual additions and LayerNorms live in :class:`EncoderLayer`, outside the shardable blocks.

The attention is written out as explicit matmuls (not ``scaled_dot_product_attention``) because that
is
the pattern ONNX Runtime's transformer optimizer recognises and fuses.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from models.checkpoint import EncoderConfig, checkpoint_dir

logger = logging.getLogger(__name__)

#: Additive attention bias for padded keys; finite so an FP16 graph cannot produce NaN.
MASK_BIAS = -10000.0


class Embeddings(nn.Module):
    """Word + position + token-type embeddings followed by LayerNorm."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)  # (1, T)
        token_types = torch.zeros_like(input_ids)  # single-segment input: (B, T)
        hidden = self.word(input_ids) + self.position(positions) + self.token_type(token_types)
        return self.norm(hidden)  # (B, T, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention; returns the output projection (before residual and LayerNorm)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)

    def _split_heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        x = x.view(batch, seq_len, num_heads, self.head_dim)  # (B, T, heads, head_dim)
        return x.transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """``hidden`` is ``(B, T, C)``; ``mask_bias`` is ``(B, 1, 1, T)``, 0 for real tokens."""
        batch, seq_len, _ = hidden.shape
        num_heads = self.query.out_features // self.head_dim  # local heads when sharded
        q = self._split_heads(self.query(hidden), num_heads)
        k = self._split_heads(self.key(hidden), num_heads)
        v = self._split_heads(self.value(hidden), num_heads)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, h, T, T)
        probs = torch.softmax(scores + mask_bias, dim=-1)
        context = torch.matmul(probs, v)  # (B, heads, T, head_dim)
        context = context.transpose(1, 2).reshape(batch, seq_len, num_heads * self.head_dim)
        return self.output(context)  # (B, T, C)


class FeedForward(nn.Module):
    """Position-wise FFN: Linear -> exact GELU -> Linear (before residual and LayerNorm)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(nn.functional.gelu(self.intermediate(hidden)))


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer block: ``LN(x + attn(x))`` then ``LN(h + ffn(h))``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        hidden = self.attention_norm(hidden + self.attention(hidden, mask_bias))
        return self.output_norm(hidden + self.feed_forward(hidden))


def attention_mask_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T)`` 1/0 mask -> ``(B, 1, 1, T)`` additive bias: 0 to attend, ``MASK_BIAS`` to skip."""
    mask = attention_mask[:, None, None, :].to(dtype)  # (B, 1, 1, T)
    return (1.0 - mask) * MASK_BIAS


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors the mask marks as real: ``(B, T, C)`` -> ``(B, C)``."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)  # (B, C)
    counts = weights.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return summed / counts


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)


class SentenceEncoder(nn.Module):
    """Token ids + attention mask -> unit-length sentence embeddings ``(B, C)``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Contextual token vectors ``(B, T, C)`` from the last layer."""
        hidden = self.embeddings(input_ids)
        mask_bias = attention_mask_bias(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, mask_bias)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.token_states(input_ids, attention_mask)
        return l2_normalize(mean_pool(hidden, attention_mask))


def _checkpoint_key_map(config: EncoderConfig) -> dict[str, str]:
    """Our parameter name -> the Hugging Face BERT name in ``model.safetensors``."""
    names = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    per_layer = {
        "attention.query": "attention.self.query",
        "attention.key": "attention.self.key",
        "attention.value": "attention.self.value",
        "attention.output": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "feed_forward.intermediate": "intermediate.dense",
        "feed_forward.output": "output.dense",
        "output_norm": "output.LayerNorm",
    }
    for i in range(config.num_layers):
        for ours, theirs in per_layer.items():
            for param in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{param}"] = f"encoder.layer.{i}.{theirs}.{param}"
    return names


def load_encoder(checkpoint: Path | None = None) -> SentenceEncoder:
    """Build the encoder and load the checkpoint's safetensors weights; returns it in eval mode."""
    directory = checkpoint_dir() if checkpoint is None else checkpoint
    config = EncoderConfig.from_checkpoint(directory)
    tensors = load_file(str(directory / "model.safetensors"))
    model = SentenceEncoder(config)
    state = {ours: tensors[theirs] for ours, theirs in _checkpoint_key_map(config).items()}
    model.load_state_dict(state, strict=True)
    logger.info(
        "loaded %s parameters from %s", sum(p.numel() for p in model.parameters()), directory
    )
    return model.eval()
