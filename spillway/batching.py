"""Dynamic batching, shared by the edge agent and the cloud pool.

The decisions are pure and tested with numpy alone: ``collate`` joins requests into one
batch, ``split`` hands each request its rows back after checking the sizes add up,
``select`` picks what goes into the next batch (priority, then arrival; requests past
their deadline, or past it by the batch's predicted end, out), and ``AdaptiveLimit`` grows
or shrinks the batch size from measured latency and host load. ``DynamicBatcher`` is the
thin asyncio scheduler around them; time comes from an injected clock, the model from a
``run_batch`` callable.

Errors a caller gets for one request (all permanent for that request)::

    BatchingError
    ├── Overloaded        the queue is full: rejected at once (HTTP 429), never queued
    ├── DeadlineExceeded  the deadline passed (or would, before its batch finished)
    └── BatchShapeError   the model returned a different number of rows than it was given
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BatchingError(Exception):
    status = "error"


class Overloaded(BatchingError):
    status = "overloaded"


class DeadlineExceeded(BatchingError):
    status = "deadline_exceeded"


class BatchShapeError(BatchingError):
    status = "internal_error"


class Clock(Protocol):
    def monotonic(self) -> float: ...


class MonotonicClock:
    def monotonic(self) -> float:
        return time.monotonic()


# -- pure parts ---------------------------------------------------------------------


def collate(requests: Sequence[Sequence[T]]) -> tuple[list[T], list[int]]:
    """Concatenate the items of several requests; returns the batch and each request's size."""
    sizes = [len(r) for r in requests]
    return [item for r in requests for item in r], sizes


def split(outputs: npt.NDArray[np.float32], sizes: Sequence[int]) -> list[npt.NDArray[np.float32]]:
    """Rows of ``outputs`` back to their requests, in order; the sizes must add up exactly."""
    if outputs.shape[0] != sum(sizes):
        raise BatchShapeError(
            f"model returned {outputs.shape[0]} rows for a batch of {sum(sizes)} items"
        )
    if len(sizes) == 1:  # a lone request (batch-1 serving): no copy, no split
        return [outputs]
    bounds = list(itertools.accumulate(sizes))
    return list(np.split(outputs, bounds[:-1])) if sizes else []


@dataclass(order=True)
class Pending(Generic[T]):
    """A queued request. Lower ``priority`` runs first; ties go by arrival."""

    priority: int
    arrival: float
    seq: int
    items: Sequence[T] = field(compare=False)
    deadline: float | None = field(compare=False, default=None)
    """Monotonic time after which the result is worthless; None means no deadline."""

    @property
    def size(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Selection(Generic[T]):
    batch: list[Pending[T]]
    expired: list[Pending[T]]
    rest: list[Pending[T]]


def select(
    queue: Sequence[Pending[T]], *, max_items: int, now: float, finish_s: float = 0.0
) -> Selection[T]:
    """Choose the next batch: drop expired requests, then take by (priority, arrival).

    A request counts as expired when its deadline falls before ``now + finish_s``, the time
    the batch is predicted to take: computing it would only produce a late answer (and
    delay everyone behind it). A request is never split across batches; one larger than
    ``max_items`` runs alone.
    """
    due = now + max(0.0, finish_s)
    expired = [p for p in queue if p.deadline is not None and p.deadline <= due]
    live = sorted(p for p in queue if p.deadline is None or p.deadline > due)
    batch: list[Pending[T]] = []
    rest: list[Pending[T]] = []
    used = 0
    for p in live:
        if not batch or used + p.size <= max_items:
            batch.append(p)
            used += p.size
        else:
            rest.append(p)
    return Selection(batch=batch, expired=expired, rest=rest)


@dataclass
class AdaptiveLimit:
    """Batch-size limit that grows under load while latency stays within budget.

    After each batch: if the batch was full and more was waiting behind it (there is
    demand), its per-batch latency is under ``latency_budget_ms`` and the host has
    headroom, the limit doubles up to ``ceiling``; if latency overran the budget or the
    host is saturated, it halves down to ``floor``. A batch at most half the limit (demand
    fell) also halves it, so a quiet device goes back to answering single requests without
    waiting ``max_queue_delay_ms`` for a batch to fill. Host load (0..1, the larger of CPU
    and memory use) scales the budget.
    """

    floor: int
    ceiling: int
    latency_budget_ms: float
    limit: int = 0
    load_high: float = 0.9

    def __post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError(f"need 1 <= floor ({self.floor}) <= ceiling ({self.ceiling})")
        self.limit = self.limit or self.floor

    def observe(
        self,
        *,
        batch_items: int,
        latency_ms: float,
        host_load: float = 0.0,
        backlog_items: int | None = None,
    ) -> int:
        """``backlog_items``: what was left queued when the batch was taken (None: unknown,
        a full batch alone counts as demand)."""
        budget = self.latency_budget_ms * (1.0 - 0.5 * max(0.0, host_load - 0.5))
        demand = batch_items >= self.limit and (backlog_items is None or backlog_items > 0)
        if latency_ms > budget or host_load >= self.load_high or batch_items * 2 <= self.limit:
            self.limit = max(self.floor, self.limit // 2)
        elif demand and latency_ms * 2 <= budget:
            self.limit = min(self.ceiling, self.limit * 2)
        return self.limit


# -- the asyncio scheduler ------------------------------------------------------------

RunBatch = Callable[[list[T]], npt.NDArray[np.float32]]

_BATCH_TIME_WEIGHT = 0.3
"""Weight of the newest batch in the predicted batch time (follows load within a few)."""


@dataclass(frozen=True)
class BatcherSettings:
    max_batch_size: int = 32
    """Most items in one model call."""
    min_batch_size: int = 1
    """Where the adaptive limit starts and the least it shrinks to."""
    max_queue_delay_ms: float = 5.0
    """How long the oldest request may wait for others to join its batch."""
    max_queue_items: int = 1024
    """Items waiting beyond this are rejected with ``Overloaded``."""
    latency_budget_ms: float = 100.0
    """Per-batch model latency the adaptive limit keeps under."""


@dataclass(frozen=True)
class BatchResult:
    rows: npt.NDArray[np.float32]
    queued_ms: float
    batch_items: int


@dataclass
class _Entry(Generic[T]):
    pending: Pending[T]
    future: asyncio.Future[BatchResult]


class DynamicBatcher(Generic[T]):
    """Queues requests and runs them in batches on one worker thread."""

    def __init__(
        self,
        run_batch: RunBatch[T],
        settings: BatcherSettings,
        *,
        clock: Clock | None = None,
        host_load: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._run_batch = run_batch
        self._settings = settings
        self._clock = clock or MonotonicClock()
        self._host_load = host_load
        self._entries: dict[int, _Entry[T]] = {}
        self._queued_items = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.limit = AdaptiveLimit(
            floor=settings.min_batch_size,
            ceiling=settings.max_batch_size,
            latency_budget_ms=settings.latency_budget_ms,
        )
        self.batches_run = 0
        self.batch_s = 0.0
        """Moving average of a batch's model time: how long the next one is predicted to
        take (0 until one has run), so requests it could only answer late are dropped."""
        self.expired = 0
        self.rejected = 0

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def settings(self) -> BatcherSettings:
        return self._settings

    def reconfigure(self, settings: BatcherSettings) -> None:
        """Take new settings from the next batch on (call on the batcher's loop): the
        adaptive limit keeps its value, clamped into the new floor and ceiling; what is
        already queued stays queued even if above a smaller ``max_queue_items``."""
        self._settings = settings
        self.limit = AdaptiveLimit(
            floor=settings.min_batch_size,
            ceiling=settings.max_batch_size,
            latency_budget_ms=settings.latency_budget_ms,
            limit=min(settings.max_batch_size, max(settings.min_batch_size, self.limit.limit)),
        )
        self._wakeup.set()  # a shorter max_queue_delay_ms applies to what waits now

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for entry in self._entries.values():
            if not entry.future.done():
                entry.future.set_exception(Overloaded("batcher stopped"))
        self._entries.clear()

    async def submit(
        self, items: Sequence[T], *, priority: int = 1, deadline: float | None = None
    ) -> BatchResult:
        """Queue ``items`` as one request; returns its rows or raises a ``BatchingError``."""
        if self._queued_items + len(items) > self._settings.max_queue_items:
            self.rejected += 1
            raise Overloaded(
                f"queue full ({self._queued_items} items waiting, limit "
                f"{self._settings.max_queue_items})"
            )
        now = self._clock.monotonic()
        if deadline is not None and deadline <= now:
            self.expired += 1
            raise DeadlineExceeded("deadline already passed on arrival")
        pending = Pending(priority, now, next(self._seq), items, deadline)
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._entries[pending.seq] = _Entry(pending, future)
        self._queued_items += pending.size
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        while True:
            if not self._entries:
                self._wakeup.clear()
                await self._wakeup.wait()
            oldest = min(e.pending.arrival for e in self._entries.values())
            wait_s = oldest + self._settings.max_queue_delay_ms / 1000 - self._clock.monotonic()
            if self._queued_items < self.limit.limit and wait_s > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait_s)
                continue
            await self._run_one()

    async def _run_one(self) -> None:
        now = self._clock.monotonic()
        chosen = select(
            [e.pending for e in self._entries.values()],
            max_items=self.limit.limit,
            now=now,
            finish_s=self.batch_s,
        )
        for p in chosen.expired:
            assert p.deadline is not None
            why = (
                "deadline passed while queued"
                if p.deadline <= now
                else f"would finish after its deadline (batches take ~{self.batch_s * 1e3:.0f} ms)"
            )
            self._finish(p).set_exception(DeadlineExceeded(why))
            self.expired += 1
        if not chosen.batch:
            return
        entries = [self._entries[p.seq] for p in chosen.batch]
        for p in chosen.batch:
            self._finish(p)
        backlog = sum(p.size for p in chosen.rest)
        items, sizes = collate([p.items for p in chosen.batch])
        started = self._clock.monotonic()
        try:
            outputs = await asyncio.to_thread(self._run_batch, items)
            parts = split(outputs, sizes)
        except Exception as exc:
            logger.exception("batch of %d items failed", len(items))
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(
                        exc if isinstance(exc, BatchingError) else BatchingError(str(exc))
                    )
            return
        latency_ms = (self._clock.monotonic() - started) * 1000
        self.batches_run += 1
        weight = 1.0 if self.batches_run == 1 else _BATCH_TIME_WEIGHT
        self.batch_s += weight * (latency_ms / 1000 - self.batch_s)
        self.limit.observe(
            batch_items=len(items),
            latency_ms=latency_ms,
            host_load=self._host_load(),
            backlog_items=backlog,
        )
        for entry, rows in zip(entries, parts, strict=True):
            if not entry.future.done():
                queued_ms = (started - entry.pending.arrival) * 1000
                entry.future.set_result(BatchResult(rows, queued_ms, len(items)))

    def _finish(self, pending: Pending[T]) -> asyncio.Future[BatchResult]:
        entry = self._entries.pop(pending.seq)
        self._queued_items -= pending.size
        return entry.future
