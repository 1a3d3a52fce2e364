"""How close a variant's embeddings stay to FP32, and the gate a variant must pass to be published.

Metrics are computed on held-out real text (see :mod:`models.corpus`): per-sentence cosine to the
FP32
embedding (mean and minimum) and top-1 nearest-neighbour agreement, i.e. for each sentence, whether
its
nearest other sentence is the same one under the variant as under FP32 - what a retrieval user
notices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from models.backends import EmbeddingBackend, Embeddings
from models.tokenization import EmbeddingTokenizer

logger = logging.getLogger(__name__)


class QualityMetrics(BaseModel):
    """Agreement of a variant with the FP32 reference on ``samples`` held-out sentences."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean_cosine: float
    min_cosine: float
    top1_agreement: float
    samples: int
    corpus: str


#: Held-out sentences a publishable build measures on; smaller builds are for development.
PUBLISHABLE_SAMPLES = 1000


class QualityGate(BaseModel):
    """Lowest acceptable metrics; a variant below any of them cannot be published."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_mean_cosine: float
    min_min_cosine: float
    min_top1_agreement: float

    def for_samples(self, samples: int) -> QualityGate:
        """The gate to apply to a measurement on ``samples`` sentences.

        Top-1 agreement is a proportion: on a 200-sentence development build its sampling error
        alone is ~1.5 points at 0.95, so below :data:`PUBLISHABLE_SAMPLES` the top-1 floor is
        lowered by two binomial standard errors. Publishable builds get the gate unchanged.
        """
        if samples >= PUBLISHABLE_SAMPLES:
            return self
        target = self.min_top1_agreement
        margin = 2.0 * float(np.sqrt(target * (1.0 - target) / max(samples, 1)))
        return self.model_copy(update={"min_top1_agreement": round(target - margin, 4)})

    def failures(self, metrics: QualityMetrics) -> list[str]:
        """Human-readable reasons ``metrics`` fails this gate; empty when it passes."""
        checks = [
            ("mean cosine", metrics.mean_cosine, self.min_mean_cosine),
            ("min cosine", metrics.min_cosine, self.min_min_cosine),
            ("top-1 agreement", metrics.top1_agreement, self.min_top1_agreement),
        ]
        return [f"{name} {got:.5f} < {need}" for name, got, need in checks if got < need]


def embed_texts(
    backend: EmbeddingBackend,
    tokenizer: EmbeddingTokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
) -> Embeddings:
    """Embed ``texts`` in batches; sorting by length first keeps padding (and time) low."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks: list[Embeddings] = []
    for start in range(0, len(order), batch_size):
        batch = [texts[i] for i in order[start : start + batch_size]]
        ids, mask = tokenizer.encode_batch(batch)
        chunks.append(backend.embed(ids, mask))
    stacked = np.concatenate(chunks, axis=0)  # (N, C) in length order
    out = np.empty_like(stacked)
    out[np.asarray(order)] = stacked
    return out


def compare(reference: Embeddings, candidate: Embeddings, *, corpus: str) -> QualityMetrics:
    """Metrics of ``candidate`` against ``reference``; both ``(N, C)``, rows in the same order."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cand = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    cosine = np.sum(ref * cand, axis=1)  # (N,)
    return QualityMetrics(
        mean_cosine=float(cosine.mean()),
        min_cosine=float(cosine.min()),
        top1_agreement=float(np.mean(_nearest(ref) == _nearest(cand))),
        samples=len(ref),
        corpus=corpus,
    )


def _nearest(x: Embeddings) -> np.ndarray:
    similarity = x @ x.T  # (N, N)
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)
