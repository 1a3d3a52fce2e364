"""The quality probe: sampled local answers compared with the cloud's, stats per model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from edge_agent.clock import SystemClock
from edge_agent.cloud import CloudNotConnected
from edge_agent.offload import CloudState, CloudView
from edge_agent.quality import QualityProber, cosines
from edge_agent.serving import EmbedOutcome, EmbedRequest
from protocol.inference import EmbeddingBlock, InferRequest, InferResponse, InferStatus, Tier
from protocol.messages import QualityProbe

ROWS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)


class Cloud:
    def __init__(self, rows: np.ndarray | None) -> None:
        self.rows = rows
        self.asked: list[InferRequest] = []

    def view(self, now: float) -> CloudView:
        return CloudView(CloudState.ACCEPTING)

    async def infer(self, request: InferRequest, *, timeout_s: float) -> InferResponse:
        self.asked.append(request)
        if self.rows is None:
            raise CloudNotConnected("away")
        return InferResponse(
            device_id="pool",
            request_id=request.request_id,
            status=InferStatus.OK,
            tier=Tier.CLOUD,
            embeddings=EmbeddingBlock.from_array(self.rows),
        )


def served(status: InferStatus = InferStatus.OK, tier: Tier = Tier.EDGE) -> EmbedOutcome:
    return EmbedOutcome("r", status, tier, embeddings=ROWS if status is InferStatus.OK else None)


def run(prober: QualityProber, outcomes: list[EmbedOutcome]) -> None:
    async def go() -> None:
        for outcome in outcomes:
            prober.on_served(EmbedRequest("r", ["a", "b"]), outcome)
        await prober.drain()

    asyncio.run(go())


def test_cosines_rowwise() -> None:
    assert cosines(ROWS, ROWS) == pytest.approx([1.0, 1.0])
    assert cosines(ROWS, ROWS[::-1]) == pytest.approx([0.0, 0.0])
    assert cosines(ROWS, np.zeros_like(ROWS)) == [0.0, 0.0]


def test_sampled_answers_are_compared_and_reset_when_the_model_changes() -> None:
    degraded = np.array([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    cloud = Cloud(degraded)
    model: list[object] = [object()]
    prober = QualityProber(
        cloud=cloud,
        device_id="d",
        clock=SystemClock(),
        model=lambda: model[0],
        policy=lambda: {"quality_sample_share": 1.0},
    )
    run(prober, [served(), served(InferStatus.ERROR), served(InferStatus.INVALID)])
    stats = prober.telemetry()
    assert stats["model_requests"] == 2 and stats["model_errors"] == 1
    assert stats["quality_samples"] == 2
    assert stats["quality_agreement_min"] == pytest.approx(0.8)
    assert stats["quality_agreement_mean"] == pytest.approx(0.9)
    assert cloud.asked[0].offload_reason == "policy" and cloud.asked[0].texts == ["a", "b"]

    model[0] = object()  # a swap: the new model starts from nothing
    fresh = prober.telemetry()
    assert fresh["quality_samples"] == 0 and fresh["model_requests"] == 0


def test_no_share_no_cloud_no_sample() -> None:
    cloud = Cloud(ROWS)
    model = object()
    off = QualityProber(cloud=cloud, device_id="d", clock=SystemClock(), model=lambda: model)
    run(off, [served()] * 5)
    assert cloud.asked == [] and off.telemetry()["model_requests"] == 5

    half = QualityProber(
        cloud=cloud,
        device_id="d",
        clock=SystemClock(),
        model=lambda: model,
        policy=lambda: {"quality_sample_share": 0.5},
        rng=iter([0.1, 0.9, 0.4, 0.6]).__next__,
    )
    run(half, [served()] * 4)
    assert len(cloud.asked) == 2  # draws below 0.5 only
    run(half, [served(tier=Tier.CLOUD)])  # answered by the cloud already: nothing to compare

    away = QualityProber(
        cloud=Cloud(None),
        device_id="d",
        clock=SystemClock(),
        model=lambda: model,
        policy=lambda: {"quality_sample_share": 1.0},
    )
    run(away, [served()])
    assert away.failed == 1 and away.telemetry()["quality_samples"] == 0


def test_share_from_policy_is_bounded() -> None:
    assert QualityProbe.from_policy({}).quality_sample_share == 0.0
    assert QualityProbe.from_policy({"quality_sample_share": 0.25}).quality_sample_share == 0.25
    assert QualityProbe.from_policy({"quality_sample_share": 7}).quality_sample_share == 0.0
    assert QualityProbe.from_policy({"quality_sample_share": "x"}).quality_sample_share == 0.0
