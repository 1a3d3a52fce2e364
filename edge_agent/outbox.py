"""The durable outbox: results and telemetry that must reach the cloud exactly once.

A record is committed here (SQLite, ``synchronous=FULL``: fsync on commit) *before* the
local caller is acknowledged, and deleted only when the controller acknowledges it at
the application level, after its own database commit. Every record is keyed
``(device_id, boot_epoch, seq)``; ``seq`` starts at 1 for each boot and has no gaps, so
the controller can both drop redeliveries (UNIQUE key) and notice a hole.

The outbox is bounded by bytes and by age. When it is full the explicit policy decides:
``drop_oldest`` makes room by deleting the oldest records, ``reject_new`` refuses the new
one with ``OutboxFull``. Everything dropped is counted (``dropped``) and logged, never
silent. This module knows no MQTT::

    OutboxError        permanent for this record
    └── OutboxFull     the bound is reached and the policy is reject_new
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)


class OutboxError(RuntimeError):
    pass


class OutboxFull(OutboxError):
    pass


class FullPolicy(StrEnum):
    DROP_OLDEST = "drop_oldest"
    REJECT_NEW = "reject_new"


@dataclass(frozen=True)
class OutboxLimits:
    max_bytes: int = 64 * 1024 * 1024
    """Payload bytes kept at most."""
    max_age_s: float = 7 * 24 * 3600
    """Records older than this are dropped (and counted) on the next append."""
    policy: FullPolicy = FullPolicy.DROP_OLDEST
    synchronous: Literal["full", "normal"] = "full"
    """``full``: fsync on every commit (survives power loss). ``normal`` (WAL): a commit
    survives the process being killed, not the machine losing power."""


@dataclass(frozen=True)
class Record:
    boot_epoch: int
    seq: int
    kind: str
    payload: bytes
    created_at: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    boot_epoch INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    created_at REAL    NOT NULL,
    PRIMARY KEY (boot_epoch, seq)
);
CREATE INDEX IF NOT EXISTS outbox_created_at ON outbox (created_at);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    """One SQLite file per device; safe to use from several threads."""

    def __init__(self, path: Path, *, boot_epoch: int, limits: OutboxLimits) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={limits.synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._boot_epoch = boot_epoch
        self._limits = limits
        row = self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE boot_epoch = ?", (boot_epoch,)
        ).fetchone()
        self._next_seq = int(row[0]) + 1
        # Payload bytes held, kept in step with every insert and delete (under ``_lock``)
        # so an append costs O(1), not a scan of the table per record.
        self._used_bytes = self._sum_bytes()
        # A lower bound on the oldest record's ``created_at`` (None: empty), so an append
        # only runs the expiry DELETE when something may really be due. Inserts lower it;
        # acks and drops may leave it too low, which costs one DELETE that finds nothing
        # and refreshes it - never a missed expiry.
        self._oldest_at = self._min_created_at()

    def _min_created_at(self) -> float | None:
        (oldest,) = self._db.execute("SELECT MIN(created_at) FROM outbox").fetchone()
        return None if oldest is None else float(oldest)

    def _sum_bytes(self) -> int:
        (used,) = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        return int(used)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def boot_epoch(self) -> int:
        return self._boot_epoch

    @property
    def dropped(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def size(self) -> tuple[int, int]:
        """(records, payload bytes) waiting."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
        count, size = row
        return int(count), int(size)

    def append(self, kind: str, payload: bytes, *, now: float) -> Record:
        """Commit one record durably and return it with its key."""
        (record,) = self.append_many(kind, [lambda seq: payload], now=now)
        return record

    def append_many(
        self, kind: str, payloads: Sequence[Callable[[int], bytes]], *, now: float
    ) -> list[Record]:
        """Commit several records in one transaction (one fsync): a group commit.

        Each payload is built by calling its factory with the record's ``seq``, so a
        payload can carry its own key. All or none are committed; on ``OutboxFull`` none is.
        """
        with self._lock:
            used_before, oldest_before = self._used_bytes, self._oldest_at
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._oldest_at is not None and self._oldest_at < now - self._limits.max_age_s:
                    self._expire(now)
                records: list[Record] = []
                seq = self._next_seq
                for make in payloads:
                    payload = make(seq)
                    self._make_room(len(payload))
                    records.append(Record(self._boot_epoch, seq, kind, payload, now))
                    self._db.execute(
                        "INSERT INTO outbox VALUES (?, ?, ?, ?, ?)",
                        (self._boot_epoch, seq, kind, payload, now),
                    )
                    self._used_bytes += len(payload)
                    seq += 1
                if records:
                    oldest = self._oldest_at
                    self._oldest_at = now if oldest is None else min(oldest, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._used_bytes, self._oldest_at = used_before, oldest_before
                raise
            self._next_seq = seq
            return records

    def pending(self, *, limit: int = 100) -> list[Record]:
        """Oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT boot_epoch, seq, kind, payload, created_at FROM outbox "
                "ORDER BY boot_epoch, seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [Record(int(b), int(s), str(k), bytes(p), float(c)) for b, s, k, p, c in rows]

    def ack(self, boot_epoch: int, seqs: list[int]) -> int:
        """Delete acknowledged records; returns how many were still here."""
        with self._lock:
            deleted = freed = 0
            for seq in seqs:
                row = self._db.execute(
                    "DELETE FROM outbox WHERE boot_epoch = ? AND seq = ? RETURNING LENGTH(payload)",
                    (boot_epoch, seq),
                ).fetchone()
                if row is not None:
                    deleted += 1
                    freed += int(row[0])
            self._used_bytes -= freed
            return deleted

    # -- bounds (called inside the append transaction) -----------------------------

    def _count_dropped(self, n: int, why: str) -> None:
        if n <= 0:
            return
        self._db.execute(
            "INSERT INTO counters VALUES ('dropped', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (n,),
        )
        logger.warning("outbox dropped records", extra={"dropped": n, "why": why})

    def _expire(self, now: float) -> None:
        rows = self._db.execute(
            "DELETE FROM outbox WHERE created_at < ? RETURNING LENGTH(payload)",
            (now - self._limits.max_age_s,),
        ).fetchall()
        self._used_bytes -= sum(int(size) for (size,) in rows)
        self._oldest_at = self._min_created_at()
        self._count_dropped(len(rows), "max_age_s")

    def _make_room(self, incoming: int) -> None:
        if incoming > self._limits.max_bytes:
            raise OutboxFull(f"record of {incoming} bytes exceeds max_bytes")
        used = self._used_bytes
        excess = used + incoming - self._limits.max_bytes
        if excess <= 0:
            return
        if self._limits.policy is FullPolicy.REJECT_NEW:
            raise OutboxFull(
                f"outbox holds {used} of {self._limits.max_bytes} bytes; policy reject_new"
            )
        freed = dropped = 0
        for boot, seq, size in self._db.execute(
            "SELECT boot_epoch, seq, LENGTH(payload) FROM outbox ORDER BY boot_epoch, seq"
        ).fetchall():
            if freed >= excess:
                break
            self._db.execute("DELETE FROM outbox WHERE boot_epoch = ? AND seq = ?", (boot, seq))
            freed += int(size)
            dropped += 1
        self._used_bytes -= freed
        self._count_dropped(dropped, "max_bytes")
