"""The pool's pure parts: back-pressure, scaling policy, idempotency store, settings, API."""

from __future__ import annotations

from pathlib import Path

import pytest

import cloud_controller.pool as pool_pkg
from cloud_controller.pool.answered import AnsweredStore
from cloud_controller.pool.backpressure import (
    DEFAULT_PER_ITEM_MS,
    ReplicaLoad,
    SeenLoad,
    pool_status,
)
from cloud_controller.pool.orchestrator import desired_replicas
from cloud_controller.pool.settings import PoolSettings


def _load(replica: str, items: int, per_item_ms: float, *, ready: bool = True) -> ReplicaLoad:
    return ReplicaLoad(
        device_id=replica,
        ready=ready,
        tp=1,
        outstanding_requests=items // 2,
        outstanding_items=items,
        per_item_ms=per_item_ms,
        answered=0,
        computed=0,
    )


def test_pool_status_sums_live_replicas_and_estimates_the_wait() -> None:
    seen = [
        SeenLoad(_load("a", 40, 10.0), received_at=99.0),
        SeenLoad(_load("b", 20, 30.0), received_at=99.5),
        SeenLoad(_load("c", 500, 10.0), received_at=80.0),  # stale
        SeenLoad(_load("d", 500, 10.0, ready=False), received_at=99.9),  # starting
    ]
    status = pool_status(seen, now=100.0, stale_after_s=5, high_water_items=100)
    assert (status.replicas, status.queue_depth) == (2, 30)
    assert status.est_wait_ms == pytest.approx(60 * 20.0 / 2)
    assert status.accepting
    busy = pool_status(seen, now=100.0, stale_after_s=5, high_water_items=30)
    assert not busy.accepting  # 60 items >= 30 per replica x 2


def test_pool_status_without_replicas_is_not_accepting() -> None:
    status = pool_status([], now=0.0, stale_after_s=5, high_water_items=10)
    assert (status.accepting, status.replicas, status.est_wait_ms) == (False, 0, 0.0)
    fresh = pool_status(
        [SeenLoad(_load("a", 4, 0.0), 0.0)], now=0.0, stale_after_s=5, high_water_items=10
    )
    assert fresh.est_wait_ms == pytest.approx(4 * DEFAULT_PER_ITEM_MS)


@pytest.mark.parametrize(
    ("items", "per_item_ms", "current", "expected"),
    [
        (0, 10.0, 1, 1),  # idle at the floor
        (100, 10.0, 1, 2),  # 1000 ms of work, 500 ms target
        (1000, 10.0, 1, 4),  # capped at max
        (10, 10.0, 4, 3),  # scale down one step at a time
        (90, 10.0, 3, 3),  # 450 ms on 2 replicas is not under half the target: stay
    ],
)
def test_desired_replicas(items: int, per_item_ms: float, current: int, expected: int) -> None:
    assert (
        desired_replicas(
            queued_items=items,
            per_item_ms=per_item_ms,
            current=current,
            min_replicas=1,
            max_replicas=4,
            target_wait_ms=500,
        )
        == expected
    )


def test_answered_store_survives_a_restart_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "answered.sqlite"
    store = AnsweredStore(path, capacity=3)
    for i in range(5):
        store.record(message_id=f"m{i}", request_id=f"r{i}", response=f"resp{i}".encode())
    store.record(message_id="m-refused", request_id="r-refused", response=None)
    store.close()
    reopened = AnsweredStore(path, capacity=3)
    assert reopened.message_answered("m4") and reopened.message_answered("m-refused")
    assert not reopened.message_answered("m0")  # evicted
    assert reopened.response_for("r4") == b"resp4"
    assert reopened.response_for("r-refused") is None  # a refusal is not replayed
    assert len(reopened) == 3


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = PoolSettings(tp=3, replicas=2, autoscale=True, state_dir=Path("/tmp/x"))
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    assert PoolSettings() == settings
    with pytest.raises(ValueError, match="needs device=cuda"):
        PoolSettings(dtype="float16")


def test_public_api_is_exactly_all() -> None:
    public = {name for name in vars(pool_pkg) if not name.startswith("_")}
    submodules = {
        "answered",
        "backpressure",
        "gateway",
        "orchestrator",
        "settings",
        "supervisor",
        "tensor_parallel",
        "replica",
        "kubernetes",
        "cli",
        "metrics",
    }
    assert public - submodules == set(pool_pkg.__all__)
