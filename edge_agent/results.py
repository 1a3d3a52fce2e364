"""Served results into the durable outbox before anyone is answered: the group commit.

Every request served with status ``ok`` (locally or by the cloud) becomes a
``ResultRecord`` whose ``seq`` is its outbox key. A record is answered only after it is
committed (fsync with the default ``synchronous=full``): a result the caller has seen can
never be lost, not even by ``kill -9`` a moment later.

Commits run on one dedicated commit thread and are grouped: while one transaction is
being written, the records that arrive queue up and go together in the next one, so under
load there is one fsync per batch, not per request. Records can be handed over from any
thread (``submit``): the model thread passes a finished batch straight here and goes on
with the next batch while this one is committed (compute and fsync overlap); the caller's
answer is released from this thread once its record is durable. ``commit`` is the same for
a coroutine on the serving loop. This module knows no MQTT: the uplink is told to look
(``on_committed``) and sends what is pending.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge_agent.clock import Clock
from edge_agent.outbox import Outbox, OutboxError, Record
from protocol.inference import ResultRecord

logger = logging.getLogger(__name__)

RESULT_KIND = "result"

Done = Callable[[int | OutboxError], None]
"""Called on the commit thread with the record's outbox seq, or why it was not stored."""


@dataclass
class _Waiting:
    record: ResultRecord
    done: Done

    def payload(self, seq: int) -> bytes:
        return self.record.model_copy(update={"seq": seq}).model_dump_json().encode()


class ResultWriter:
    """Group-commits ``ResultRecord``s on its own thread; ``start()``/``stop()`` on the loop."""

    def __init__(
        self, outbox: Outbox, *, clock: Clock, on_committed: Callable[[], None] | None = None
    ) -> None:
        self._outbox = outbox
        self._clock = clock
        self._on_committed = on_committed
        self._queue: list[_Waiting] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.commits = 0
        self.records = 0
        self.failed = 0

    def start(self) -> None:
        with self._ready:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="result-commit", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Commit everything queued (callers get their answers), then stop."""
        with self._ready:
            thread, self._thread = self._thread, None
            self._closing = True
            self._ready.notify()
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def submit(self, records: Sequence[ResultRecord], done: Sequence[Done]) -> None:
        """Queue ``records`` for the next group commit; thread-safe, never blocks on disk.

        ``done[i]`` is called (on the commit thread) once ``records[i]`` is durable, or
        with the ``OutboxError`` that kept it out.
        """
        with self._ready:
            if self._thread is None:
                raise RuntimeError("ResultWriter is not running")
            self._queue.extend(_Waiting(r, d) for r, d in zip(records, done, strict=True))
            self._ready.notify()

    async def commit(self, record: ResultRecord) -> int:
        """Durably store ``record`` (its ``seq`` is replaced) and return its outbox seq.

        Raises ``OutboxError`` (e.g. ``OutboxFull`` under ``reject_new``).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self.submit([record], [answer_on(loop, future)])
        return await future

    # -- the commit thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                group, self._queue = self._queue, []
                closing = self._closing
            if group:
                self._flush(group)
            elif closing:
                return

    def _flush(self, group: list[_Waiting]) -> None:
        now = self._clock.now().timestamp()
        try:
            records = self._outbox.append_many(RESULT_KIND, [w.payload for w in group], now=now)
        except OutboxError as exc:
            if len(group) == 1:
                self._fail(group[0], exc)
                return
            # One record may not fit; commit the others on their own.
            for waiting in group:
                self._commit_alone(waiting, now)
            return
        except Exception as exc:  # the disk or SQLite itself: nobody may be left waiting
            logger.exception("group commit of %d results failed", len(group))
            for waiting in group:
                self._fail(waiting, OutboxError(str(exc)))
            return
        self._settle(group, records)

    def _commit_alone(self, waiting: _Waiting, now: float) -> None:
        try:
            records = self._outbox.append_many(RESULT_KIND, [waiting.payload], now=now)
        except OutboxError as exc:
            self._fail(waiting, exc)
            return
        self._settle([waiting], records)

    def _fail(self, waiting: _Waiting, exc: OutboxError) -> None:
        self.failed += 1
        waiting.done(exc)

    def _settle(self, group: list[_Waiting], records: list[Record]) -> None:
        self.commits += 1
        self.records += len(records)
        for waiting, record in zip(group, records, strict=True):
            waiting.done(record.seq)
        if self._on_committed is not None:
            try:
                self._on_committed()
            except Exception:
                logger.exception("on_committed failed")


def answer_on(loop: asyncio.AbstractEventLoop, future: asyncio.Future[int]) -> Done:
    """A ``Done`` that settles ``future`` on ``loop`` (from the commit thread)."""

    def settle(outcome: int | OutboxError) -> None:
        if future.done():
            return
        if isinstance(outcome, OutboxError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def done(outcome: int | OutboxError) -> None:
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            logger.warning("result committed after the serving loop closed")

    return done
