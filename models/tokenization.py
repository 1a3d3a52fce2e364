"""Turn text into the ``(input_ids, attention_mask)`` int64 arrays every backend consumes.

Wraps the Rust ``tokenizers`` library (no ``transformers``, no torch) so the edge agent can batch
requests
without the model-building stack. Padding is to the longest sequence in the batch, which is what the
sentence-transformers reference does and what keeps batch-1 latency low.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

TokenIds = npt.NDArray[np.int64]


class EmbeddingTokenizer:
    """WordPiece tokenizer of the checkpoint, padding to the longest text in a batch."""

    def __init__(self, tokenizer: Tokenizer, *, max_length: int = 256) -> None:
        self._tokenizer = tokenizer
        self.max_length = max_length
        pad_id = tokenizer.token_to_id("[PAD]")
        self._pad_id = 0 if pad_id is None else pad_id

    @classmethod
    def from_file(cls, path: Path, *, max_length: int = 256) -> EmbeddingTokenizer:
        return cls(Tokenizer.from_file(str(path)), max_length=max_length)

    def encode_batch(
        self, texts: list[str], max_length: int | None = None
    ) -> tuple[TokenIds, TokenIds]:
        """Tokenize ``texts``; returns ``(input_ids, attention_mask)``, both ``(B, T)`` int64."""
        limit = self.max_length if max_length is None else max_length
        tok = self._tokenizer
        tok.enable_truncation(max_length=limit)
        tok.enable_padding(pad_id=self._pad_id, pad_token="[PAD]")  # pad to longest in batch
        encodings = tok.encode_batch(texts)
        input_ids = np.asarray([e.ids for e in encodings], dtype=np.int64)  # (B, T)
        attention_mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)  # (B, T)
        return input_ids, attention_mask


def load_tokenizer(checkpoint: Path | None = None, *, max_length: int = 256) -> EmbeddingTokenizer:
    """Tokenizer from a checkpoint directory or a ``tokenizer.json`` path (default: the bundled
    one)."""
    if checkpoint is None:
        from models.checkpoint import checkpoint_dir

        checkpoint = checkpoint_dir()
    path = checkpoint / "tokenizer.json" if checkpoint.is_dir() else checkpoint
    return EmbeddingTokenizer.from_file(path, max_length=max_length)
