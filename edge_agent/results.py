"""Served results into the durable outbox before anyone is answered: the group commit.

Every request served with status ``ok`` (locally or by the cloud) becomes a
``ResultRecord`` whose ``seq`` is its outbox key. A record is answered only after it is
committed (fsync with the default ``synchronous=full``): a result the caller has seen can
never be lost, not even by ``kill -9`` a moment later.

Two ways in, one contract:

* ``submit`` (any thread, never blocks on disk): the records go to a dedicated commit
  thread, which groups them - while one transaction is being written, the records that
  arrive queue up and go together in the next one, so under load there is one fsync per
  batch, not per request. The model thread uses it when more work is queued, so it can
  compute the next batch while this one is committed; each caller's ``Done`` is called
  from the commit thread once its record is durable. ``commit`` is the same for a
  coroutine on the serving loop.
* ``write`` (blocks on disk): the calling thread commits the records itself and gets
  each one's seq (or error) back. The model thread uses it when nothing else waits for
  the model, so a lone request's answer does not pay a hop to the commit thread and
  back: its rows and its seq reach the loop together.

This module knows no MQTT: the uplink is told to look (``on_committed``) and sends what
is pending.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge_agent.clock import Clock
from edge_agent.outbox import Outbox, OutboxError
from protocol.inference import ResultRecord

logger = logging.getLogger(__name__)

RESULT_KIND = "result"

Stored = int | OutboxError
"""A record's outbox seq, or why it was not stored."""

Done = Callable[[Stored], None]
"""Called on the commit thread with the record's outbox seq, or why it was not stored."""

PayloadFactory = Callable[[int], bytes]


def payload_factory(record: ResultRecord) -> PayloadFactory:
    """``seq -> `` the JSON of ``record`` with that ``seq``; serialized once, up front.

    The JSON is built before the outbox transaction (outside its lock) and only the key
    is put in inside it: ``seq`` is ``ResultRecord``'s first field, so the rest of the
    document does not depend on it. Byte for byte what
    ``record.model_copy(update={"seq": seq}).model_dump_json()`` gives.
    """
    body = record.model_dump_json().encode()
    head = b'{"seq":%d,' % record.seq
    if not body.startswith(head):  # a reordered model: fall back to the slow, sure way
        return lambda seq: record.model_copy(update={"seq": seq}).model_dump_json().encode()
    rest = body[len(head) :]
    return lambda seq: b'{"seq":%d,%b' % (seq, rest)


@dataclass
class _Waiting:
    record: ResultRecord
    done: Done


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
        self._counts = threading.Lock()
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

    def write(self, records: Sequence[ResultRecord]) -> list[Stored]:
        """Commit ``records`` on the calling thread, now (one transaction, fsync), and
        return each one's outbox seq or the ``OutboxError`` that kept it out.

        For a caller with nothing better to do while the disk works - the model thread
        when no other request waits for it. Same durability as ``submit``: when this
        returns a seq, the record is committed.
        """
        with self._ready:
            if self._thread is None:
                raise RuntimeError("ResultWriter is not running")
        return self._store([payload_factory(r) for r in records])

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
        stored = self._store([payload_factory(w.record) for w in group])
        for waiting, outcome in zip(group, stored, strict=True):
            waiting.done(outcome)

    def _store(self, payloads: list[PayloadFactory]) -> list[Stored]:
        """One transaction for all of ``payloads``; if that is refused, each on its own."""
        now = self._clock.now().timestamp()
        try:
            records = self._outbox.append_many(RESULT_KIND, payloads, now=now)
        except OutboxError as exc:
            if len(payloads) == 1:
                self._count(failed=1)
                return [exc]
            # One record may not fit; commit the others on their own.
            return [self._store_alone(payload, now) for payload in payloads]
        except Exception as exc:  # the disk or SQLite itself: nobody may be left waiting
            logger.exception("group commit of %d results failed", len(payloads))
            self._count(failed=len(payloads))
            return [OutboxError(str(exc))] * len(payloads)
        self._stored(len(records))
        return [record.seq for record in records]

    def _store_alone(self, payload: PayloadFactory, now: float) -> Stored:
        try:
            (record,) = self._outbox.append_many(RESULT_KIND, [payload], now=now)
        except OutboxError as exc:
            self._count(failed=1)
            return exc
        self._stored(1)
        return record.seq

    def _count(self, *, commits: int = 0, records: int = 0, failed: int = 0) -> None:
        with self._counts:  # the commit thread and a ``write`` caller may both count
            self.commits += commits
            self.records += records
            self.failed += failed

    def _stored(self, records: int) -> None:
        self._count(commits=1, records=records)
        if self._on_committed is not None:
            try:
                self._on_committed()
            except Exception:
                logger.exception("on_committed failed")


def answer_on(loop: asyncio.AbstractEventLoop, future: asyncio.Future[int]) -> Done:
    """A ``Done`` that settles ``future`` on ``loop`` (from the commit thread)."""

    def settle(outcome: Stored) -> None:
        if future.done():
            return
        if isinstance(outcome, OutboxError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def done(outcome: Stored) -> None:
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            logger.warning("result committed after the serving loop closed")

    return done
