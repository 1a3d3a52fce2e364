"""Served results into the durable outbox before anyone is answered: the group commit.

Every request served with status ``ok`` (locally or by the cloud) becomes a
``ResultRecord`` whose ``seq`` is its outbox key. ``ResultWriter.commit`` returns only after
the record is committed (fsync with the default ``synchronous=full``), and the caller
answers only then: a result the caller has seen can never be lost, not even by ``kill -9``
a moment later.

Commits are grouped: while one transaction is being written (on a worker thread, so the
event loop never waits on the disk), the records that arrive queue up and go together in
the next one. Under load that is one fsync per batch, not per request. This module knows
no MQTT: the uplink is told to look (``on_committed``) and sends what is pending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.clock import Clock
from edge_agent.outbox import Outbox, OutboxError, Record
from protocol.inference import ResultRecord

logger = logging.getLogger(__name__)

RESULT_KIND = "result"


@dataclass
class _Waiting:
    record: ResultRecord
    future: asyncio.Future[int]

    def payload(self, seq: int) -> bytes:
        return self.record.model_copy(update={"seq": seq}).model_dump_json().encode()


class ResultWriter:
    """Group-commits ``ResultRecord``s; ``start()`` and ``stop()`` on the serving loop."""

    def __init__(
        self, outbox: Outbox, *, clock: Clock, on_committed: Callable[[], None] | None = None
    ) -> None:
        self._outbox = outbox
        self._clock = clock
        self._on_committed = on_committed
        self._queue: list[_Waiting] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.records = 0
        self.failed = 0

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Commit everything queued (callers get their answers), then stop."""
        if self._task is None or self._wakeup is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._task
        self._task = None

    async def commit(self, record: ResultRecord) -> int:
        """Durably store ``record`` (its ``seq`` is replaced) and return its outbox seq.

        Raises ``OutboxError`` (e.g. ``OutboxFull`` under ``reject_new``).
        """
        if self._wakeup is None:
            raise RuntimeError("ResultWriter.start() was not called")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(record, future))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._flush()
            if self._closing:
                return

    async def _flush(self) -> None:
        group, self._queue = self._queue, []
        now = self._clock.now().timestamp()
        try:
            records = await asyncio.to_thread(
                self._outbox.append_many, RESULT_KIND, [w.payload for w in group], now=now
            )
        except OutboxError as exc:
            if len(group) == 1:
                self.failed += 1
                group[0].future.set_exception(exc)
                return
            # One record may not fit; commit the others on their own.
            for waiting in group:
                await self._commit_alone(waiting, now)
            return
        self._settle(group, records)

    async def _commit_alone(self, waiting: _Waiting, now: float) -> None:
        try:
            records = await asyncio.to_thread(
                self._outbox.append_many, RESULT_KIND, [waiting.payload], now=now
            )
        except OutboxError as exc:
            self.failed += 1
            waiting.future.set_exception(exc)
            return
        self._settle([waiting], records)

    def _settle(self, group: list[_Waiting], records: list[Record]) -> None:
        self.commits += 1
        self.records += len(records)
        for waiting, record in zip(group, records, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(record.seq)
        if self._on_committed is not None:
            self._on_committed()
