"""Quality agreement: compare a sampled share of local answers with the cloud's FP32 ones.

The desired policy's ``quality_sample_share`` (``protocol.messages.QualityProbe``) says
what share of requests served locally to sample. ``QualityProbe.on_served`` runs after a
request was answered (``ServingRuntime``'s served hook); for a sampled one it starts a
task that sends the same texts to the cloud pool through the ``CloudClient`` seam
(``offload_reason=policy``) and records the cosine between each edge row and the pool's
row. The answer to the caller never waits for it; a cloud that is away only means no
sample.

It also counts the requests answered and those answered ``error``. Every number is
kept since the serving model last changed (a swap resets them), so the controller's
rollout gates read what the new version did, not its predecessor. At most
``max_inflight`` comparisons run at once; more sampled requests are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.clock import Clock
from edge_agent.cloud import CloudClient, CloudUnavailable
from protocol.inference import InferRequest, InferStatus, OffloadReason, Tier
from protocol.messages import (
    MODEL_ERRORS_METRIC,
    MODEL_REQUESTS_METRIC,
    QUALITY_AGREEMENT_MEAN_METRIC,
    QUALITY_AGREEMENT_MIN_METRIC,
    QUALITY_SAMPLES_METRIC,
    QualityProbe,
)

if TYPE_CHECKING:
    from edge_agent.serving import EmbedOutcome, EmbedRequest, Rows

logger = logging.getLogger(__name__)


def cosines(edge: Rows, cloud: Rows) -> list[float]:
    """Row-wise cosine of two ``(n, dim)`` arrays (0.0 for a zero row)."""
    a = np.asarray(edge, dtype=np.float64)
    b = np.asarray(cloud, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    return [float(d / n) if n > 0 else 0.0 for d, n in zip(dots, norms, strict=True)]


class QualityStats:
    """Counts and cosines since the serving model last changed; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: object | None = None
        self._reset()

    def _reset(self) -> None:
        self.requests = 0
        self.errors = 0
        self.samples = 0
        self.total = 0.0
        self.lowest = 1.0

    def _follow(self, model: object) -> None:
        if model is not self._model:
            self._model = model
            self._reset()

    def served(self, model: object, *, error: bool) -> None:
        with self._lock:
            self._follow(model)
            self.requests += 1
            self.errors += int(error)

    def compared(self, model: object, values: list[float]) -> None:
        with self._lock:
            if model is not self._model:
                return  # the model changed while the cloud answered: not this model's
            self.samples += len(values)
            self.total += sum(values)
            self.lowest = min([self.lowest, *values])

    def telemetry(self, model: object) -> dict[str, float]:
        with self._lock:
            self._follow(model)
            return {
                MODEL_REQUESTS_METRIC: float(self.requests),
                MODEL_ERRORS_METRIC: float(self.errors),
                QUALITY_SAMPLES_METRIC: float(self.samples),
                QUALITY_AGREEMENT_MEAN_METRIC: self.total / self.samples if self.samples else 1.0,
                QUALITY_AGREEMENT_MIN_METRIC: self.lowest,
            }


class QualityProber:
    """The served hook and its comparisons; ``policy`` returns the applied policy."""

    def __init__(
        self,
        *,
        cloud: CloudClient,
        device_id: str,
        clock: Clock,
        model: Callable[[], object],
        policy: Callable[[], dict[str, Any]] = dict,
        timeout_s: float = 5.0,
        max_inflight: int = 4,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._cloud = cloud
        self._device_id = device_id
        self._clock = clock
        self._model = model
        self.policy = policy
        """Where the share comes from; the agent points it at the applied policy."""
        self._timeout_s = timeout_s
        self._max_inflight = max_inflight
        self._rng = rng
        self.stats = QualityStats()
        self._tasks: set[asyncio.Task[None]] = set()
        self.skipped = 0
        self.failed = 0

    def share(self) -> float:
        return QualityProbe.from_policy(self.policy()).quality_sample_share

    def on_served(self, request: EmbedRequest, outcome: EmbedOutcome) -> None:
        """On the runtime's loop, after the answer: count, maybe sample (never waits)."""
        model = self._model()
        if outcome.status is InferStatus.INVALID:
            return  # the caller's mistake, not the model's
        self.stats.served(model, error=outcome.status is InferStatus.ERROR)
        if (
            outcome.status is not InferStatus.OK
            or outcome.tier is not Tier.EDGE
            or outcome.embeddings is None
        ):
            return
        share = self.share()
        if share <= 0.0 or self._rng() >= share:
            return
        if len(self._tasks) >= self._max_inflight:
            self.skipped += 1
            return
        task = asyncio.get_running_loop().create_task(
            self._compare(model, request.texts, outcome.embeddings)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, model: object, texts: list[str], edge: Rows) -> None:
        message = InferRequest(
            device_id=self._device_id,
            sent_at=self._clock.now(),
            request_id=f"quality-{uuid.uuid4().hex}",
            texts=texts,
            priority=9,
            offload_reason=OffloadReason.POLICY,
        )
        try:
            response = await self._cloud.infer(message, timeout_s=self._timeout_s)
        except CloudUnavailable as exc:
            self.failed += 1
            logger.debug("quality sample skipped: %s", exc)
            return
        if response.status is not InferStatus.OK or response.embeddings is None:
            self.failed += 1
            return
        cloud = response.embeddings.to_array()
        if cloud.shape != edge.shape:
            self.failed += 1
            logger.warning(
                "quality sample shape mismatch",
                extra={"edge": list(edge.shape), "cloud": list(cloud.shape)},
            )
            return
        self.stats.compared(model, cosines(edge, cloud))

    def telemetry(self) -> dict[str, float]:
        return self.stats.telemetry(self._model())

    async def drain(self) -> None:
        """Wait for the comparisons in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
