"""Batching: pure decisions with numpy alone, then the asyncio scheduler."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from spillway.batching import (
    AdaptiveLimit,
    BatcherSettings,
    BatchShapeError,
    DeadlineExceeded,
    DynamicBatcher,
    Overloaded,
    Pending,
    collate,
    select,
    split,
)


def test_collate_and_split_return_rows_to_their_requests() -> None:
    requests = [["a"], ["b", "c", "d"], [], ["e", "f"]]
    batch, sizes = collate(requests)
    assert batch == ["a", "b", "c", "d", "e", "f"] and sizes == [1, 3, 0, 2]
    outputs = np.arange(12, dtype=np.float32).reshape(6, 2)  # row i belongs to batch[i]
    parts = split(outputs, sizes)
    assert [p.shape[0] for p in parts] == sizes
    assert parts[1][:, 0].tolist() == [2.0, 4.0, 6.0] and parts[3][0, 0] == 8.0


def test_split_refuses_a_batch_that_does_not_add_up() -> None:
    with pytest.raises(BatchShapeError, match="5 rows for a batch of 6"):
        split(np.zeros((5, 2), dtype=np.float32), [3, 3])


def _p(seq: int, size: int, *, priority: int = 1, deadline: float | None = None) -> Pending[str]:
    return Pending(priority, float(seq), seq, ["x"] * size, deadline)


def test_select_orders_by_priority_then_arrival_and_drops_expired() -> None:
    queue = [_p(0, 2), _p(1, 2, priority=0), _p(2, 1, deadline=5.0), _p(3, 3), _p(4, 1)]
    chosen = select(queue, max_items=5, now=10.0)
    assert [p.seq for p in chosen.expired] == [2]
    assert [p.seq for p in chosen.batch] == [1, 0, 4]  # 3 would overflow 5 items
    assert [p.seq for p in chosen.rest] == [3]


def test_select_drops_what_would_finish_after_its_deadline() -> None:
    queue = [_p(0, 1, deadline=10.05), _p(1, 1, deadline=10.5), _p(2, 1)]
    chosen = select(queue, max_items=8, now=10.0, finish_s=0.1)
    assert [p.seq for p in chosen.expired] == [0]
    assert [p.seq for p in chosen.batch] == [1, 2]
    assert [p.seq for p in select(queue, max_items=8, now=10.0).expired] == []


def test_select_runs_an_oversized_request_alone() -> None:
    chosen = select([_p(0, 50), _p(1, 1)], max_items=8, now=0.0)
    assert [p.seq for p in chosen.batch] == [0] and [p.seq for p in chosen.rest] == [1]


def test_adaptive_limit_grows_under_load_and_backs_off() -> None:
    limit = AdaptiveLimit(floor=1, ceiling=32, latency_budget_ms=100)
    for _ in range(10):
        limit.observe(batch_items=limit.limit, latency_ms=10)
    assert limit.limit == 32
    limit.observe(batch_items=32, latency_ms=150)  # over budget
    assert limit.limit == 16
    limit.observe(batch_items=16, latency_ms=10, host_load=0.95)  # saturated host
    assert limit.limit == 8
    limit.observe(batch_items=6, latency_ms=10)  # not full: no evidence of demand
    assert limit.limit == 8
    limit.observe(batch_items=2, latency_ms=10)  # at most half full: demand fell
    assert limit.limit == 4
    limit.observe(batch_items=4, latency_ms=10, backlog_items=0)  # full, nothing behind it
    assert limit.limit == 4
    limit.observe(batch_items=4, latency_ms=10, backlog_items=3)  # full with more waiting
    assert limit.limit == 8


def test_adaptive_limit_stays_at_one_for_one_caller_at_a_time() -> None:
    limit = AdaptiveLimit(floor=1, ceiling=32, latency_budget_ms=100)
    for _ in range(5):  # sequential requests: each batch is full, nothing else is waiting
        limit.observe(batch_items=1, latency_ms=5, backlog_items=0)
    assert limit.limit == 1


class _Model:
    """Row i of the output is [len(text_i), call number]; records every batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.gate.wait(10)
        self.batches.append(len(texts))
        return np.array([[len(t), len(self.batches)] for t in texts], dtype=np.float32)


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    async def scenario() -> tuple[list[np.ndarray], list[int]]:
        model = _Model()
        batcher = DynamicBatcher(
            model, BatcherSettings(max_batch_size=16, min_batch_size=16, max_queue_delay_ms=50)
        )
        batcher.start()
        texts = [["a" * (i + 1)] * (1 + i % 3) for i in range(12)]
        results = await asyncio.gather(*(batcher.submit(t) for t in texts))
        await batcher.stop()
        return [r.rows for r in results], model.batches

    rows, batches = asyncio.run(scenario())
    for i, r in enumerate(rows):
        assert r.shape[0] == 1 + i % 3 and set(r[:, 0].tolist()) == {i + 1}
    assert sum(batches) == sum(1 + i % 3 for i in range(12))
    assert len(batches) < 12  # requests were batched together


def test_queue_limit_rejects_explicitly() -> None:
    async def scenario() -> None:
        model = _Model()
        model.gate.clear()  # the model is stuck: the queue fills up
        batcher = DynamicBatcher(
            model, BatcherSettings(max_batch_size=2, max_queue_items=4, max_queue_delay_ms=1)
        )
        batcher.start()
        first = asyncio.create_task(batcher.submit(["a", "b"]))
        await asyncio.sleep(0.05)  # taken by the stuck model call
        waiting = [asyncio.create_task(batcher.submit(["c", "d"])) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="queue full"):
            await batcher.submit(["e"])
        model.gate.set()
        await asyncio.gather(first, *waiting)
        assert batcher.rejected == 1
        await batcher.stop()

    asyncio.run(scenario())


def test_expired_requests_are_answered_not_computed() -> None:
    async def scenario() -> None:
        model = _Model()
        model.gate.clear()
        batcher = DynamicBatcher(model, BatcherSettings(max_batch_size=1, max_queue_delay_ms=1))
        batcher.start()
        loop = asyncio.get_running_loop()
        blocker = asyncio.create_task(batcher.submit(["slow"]))
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(batcher.submit(["late"], deadline=loop.time() + 0.05))
        await asyncio.sleep(0.2)
        model.gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await doomed
        with pytest.raises(DeadlineExceeded, match="on arrival"):
            await batcher.submit(["past"], deadline=loop.time() - 1)
        assert model.batches == [1]  # "late" and "past" never reached the model
        await batcher.stop()

    asyncio.run(scenario())


def test_a_request_its_batch_would_answer_late_is_not_computed() -> None:
    class Slow(_Model):
        def __call__(self, texts: list[str]) -> np.ndarray:
            time.sleep(0.2)
            return super().__call__(texts)

    async def scenario() -> None:
        model = Slow()
        batcher = DynamicBatcher(model, BatcherSettings(max_batch_size=4, max_queue_delay_ms=1))
        batcher.start()
        loop = asyncio.get_running_loop()
        await batcher.submit(["first"])  # a batch takes ~0.2 s
        assert 0.15 < batcher.batch_s < 1.0
        with pytest.raises(DeadlineExceeded, match="would finish after its deadline"):
            await batcher.submit(["tight"], deadline=loop.time() + 0.05)
        await batcher.submit(["roomy"], deadline=loop.time() + 5)
        assert model.batches == [1, 1]  # "tight" never reached the model
        assert batcher.expired == 1
        await batcher.stop()

    asyncio.run(scenario())
