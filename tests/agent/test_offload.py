"""The overflow policy, pure: decisions, hysteresis, rate cap, synthetic load on virtual time."""

from __future__ import annotations

import pytest

from edge_agent.offload import (
    CloudState,
    CloudView,
    Decision,
    Local,
    Offload,
    OffloadController,
    OffloadPolicy,
    TokenBucket,
    decide,
    policy_pick,
)
from protocol.inference import OffloadReason

POLICY = OffloadPolicy(slo_ms=100.0, enter_ratio=1.0, exit_ratio=0.5, rate_per_s=10, burst=5)
UP = CloudView(CloudState.ACCEPTING, est_wait_ms=5.0)


def _decide(
    queue: int,
    *,
    ms: float = 10.0,
    items: int = 1,
    deadline_ms: float | None = None,
    cloud: CloudView = UP,
    tokens: float = 5.0,
    overflowing: bool = False,
    policy: OffloadPolicy = POLICY,
    pick: bool = False,
) -> Decision:
    return decide(
        queue_items=queue,
        request_items=items,
        ms_per_item=ms,
        deadline_ms=deadline_ms,
        cloud=cloud,
        tokens=tokens,
        overflowing=overflowing,
        policy=policy,
        policy_pick=pick,
    )


@pytest.mark.parametrize(
    ("kwargs", "route"),
    [
        ({"queue": 0}, Local()),  # 10 ms predicted, SLO 100 ms
        ({"queue": 8}, Local()),  # 90 ms: still inside
        ({"queue": 9}, Offload(OffloadReason.OVERFLOW)),  # 100 ms: enter threshold
        ({"queue": 2, "deadline_ms": 20.0}, Offload(OffloadReason.DEADLINE)),
        ({"queue": 0, "deadline_ms": 20.0}, Local()),  # its own deadline fits locally
        ({"queue": 0, "pick": True}, Offload(OffloadReason.POLICY)),
        ({"queue": 20, "deadline_ms": 50.0}, Offload(OffloadReason.DEADLINE)),  # deadline first
        ({"queue": 20, "cloud": CloudView(CloudState.UNKNOWN)}, Local("cloud_unknown")),
        (
            {"queue": 20, "cloud": CloudView(CloudState.BACK_PRESSURE, 900)},
            Local("cloud_back_pressure"),
        ),
        ({"queue": 20, "cloud": CloudView(CloudState.UNAVAILABLE)}, Local("cloud_unavailable")),
        ({"queue": 20, "tokens": 0.5}, Local("rate_capped")),
        (
            {"queue": 20, "deadline_ms": 30.0, "cloud": CloudView(CloudState.ACCEPTING, 40.0)},
            Local("cloud_too_slow"),
        ),
        ({"queue": 20, "policy": OffloadPolicy(enabled=False, slo_ms=100)}, Local("disabled")),
        ({"queue": 1000, "ms": 0.0}, Local()),  # nothing measured yet: no prediction
    ],
)
def test_decision_table(kwargs: dict[str, object], route: object) -> None:
    queue = kwargs.pop("queue")
    assert isinstance(queue, int)
    assert _decide(queue, **kwargs).route == route  # type: ignore[arg-type]


def test_hysteresis_enters_high_and_leaves_only_below_the_exit_threshold() -> None:
    overflowing = False
    routes = []
    # predicted wait = (queue + 1) * 10 ms against SLO 100 ms: enter >= 100, exit <= 50
    for queue in [3, 9, 7, 5, 5, 4, 6, 9]:
        d = _decide(queue, overflowing=overflowing)
        overflowing = d.overflowing
        routes.append("cloud" if isinstance(d.route, Offload) else "edge")
    assert routes == ["edge", "cloud", "cloud", "cloud", "cloud", "edge", "edge", "cloud"]


def test_token_bucket_caps_the_rate_on_virtual_time() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 tokens
    assert bucket.take(0.5)  # 1.0 token
    assert bucket.level(100.0) == 3.0  # never more than the burst


def test_policy_pick_is_deterministic_and_close_to_the_fraction() -> None:
    picks = [policy_pick(f"req-{i}", 0.25) for i in range(4000)]
    assert picks == [policy_pick(f"req-{i}", 0.25) for i in range(4000)]
    assert 0.22 < sum(picks) / len(picks) < 0.28
    assert not any(policy_pick(f"req-{i}", 0.0) for i in range(100))


def test_synthetic_burst_offloads_within_the_rate_cap_and_does_not_flap() -> None:
    """A burst fills the queue faster than the model drains it, then the load goes away.

    Virtual time in 10 ms steps; the model serves 1 text per 10 ms; during the first 500 ms
    three single-text requests arrive per step. Offloaded requests never enter the queue.
    """
    policy = OffloadPolicy(slo_ms=100.0, enter_ratio=1.0, exit_ratio=0.5, rate_per_s=50, burst=5)
    controller = OffloadController(policy, now=0.0)
    queue = 0
    offloaded_at: list[float] = []
    transitions = 0
    was = False
    for step in range(150):
        now = step * 0.010
        arrivals = 3 if step < 50 else 0
        for k in range(arrivals):
            d = controller.route(
                request_id=f"r{step}-{k}",
                queue_items=queue,
                request_items=1,
                ms_per_item=10.0,
                deadline_ms=None,
                cloud=UP,
                now=now,
            )
            if isinstance(d.route, Offload):
                assert d.route.reason is OffloadReason.OVERFLOW
                offloaded_at.append(now)
            else:
                queue += 1
            if d.overflowing != was:
                transitions += 1
                was = d.overflowing
        queue = max(0, queue - 1)  # the model finishes one text per step

    decisions, offloads, kept, _ = controller.snapshot()
    assert decisions == 150
    assert offloads == {"overflow": len(offloaded_at)}
    # The cap: burst + rate x elapsed, over the half second the burst lasted.
    assert len(offloaded_at) <= policy.burst + policy.rate_per_s * 0.5 + 1
    assert kept["rate_capped"] > 0  # the cap did bite
    assert transitions == 1  # entered overflow once; never flapped back and forth
    # Nothing arrives after the burst, so the queue drains (the flag updates on next arrival).
    assert queue == 0
