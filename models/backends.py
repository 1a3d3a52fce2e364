"""The inference-backend seam: one ``embed`` method the agent and the cloud pool batch against.

Real implementations wrap an ONNX Runtime session or a TorchScript module. This module must stay
importable on a device without torch: torch is only touched by :class:`TorchScriptBackend`
instances,
which are only created by the loader's ``.pt`` path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

Embeddings = npt.NDArray[np.float32]
TokenIds = npt.NDArray[np.int64]

#: Execution providers in order of preference; the first one installed wins.
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


@runtime_checkable
class EmbeddingBackend(Protocol):
    """Anything that turns a padded token batch into ``(B, 384)`` float32 unit vectors."""

    def embed(self, input_ids: TokenIds, attention_mask: TokenIds) -> Embeddings: ...


class OnnxBackend:
    """An ONNX Runtime session with inputs ``input_ids``/``attention_mask`` and output
    ``embedding``."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.provider = session.get_providers()[0]

    def embed(self, input_ids: TokenIds, attention_mask: TokenIds) -> Embeddings:
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        (out,) = self.session.run(["embedding"], feeds)
        return np.asarray(out, dtype=np.float32)


class TorchBackend:
    """A torch module (TorchScript or eager) called under ``no_grad``."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def embed(self, input_ids: TokenIds, attention_mask: TokenIds) -> Embeddings:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return np.asarray(out.float().numpy(), dtype=np.float32)


def best_providers(available: list[str]) -> list[str]:
    """Preferred providers that are available, best first; always ends with the CPU provider."""
    chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    return chosen or ["CPUExecutionProvider"]


def onnx_session(
    path: str, *, providers: list[str] | None = None, intra_op_threads: int = 0
) -> ort.InferenceSession:
    """Open an ORT session on the best available execution provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    chosen = providers or best_providers(ort.get_available_providers())
    return ort.InferenceSession(path, sess_options=options, providers=chosen)
