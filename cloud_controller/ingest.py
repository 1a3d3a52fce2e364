"""Applying what devices say to the database: the one write path for device records.

Each per-message function takes an open ``Session`` and a decoded message, writes, commits
and says what it did as an ``Ingested`` value; ``apply_batch`` applies many messages in one
transaction (the bridge's worker path) and leaves the commit to its caller, with the same
outcome per message as one by one would give. The rules that keep a restarted agent safe from its
own past live here:

* ``Hello`` always registers (upsert, online): it is the device's own word, sent after
  every successful connect. A Hello whose ``boot_epoch`` went backwards (state wiped,
  board replaced) is accepted with a warning rather than locking the device out.
* Presence, heartbeats, telemetry and reports from an older ``boot_epoch`` than the
  device's current one are ignored: an old Last Will published during a session takeover
  must not mark a restarted agent offline.
* Results are the exception: they are stored whatever the boot epoch and whether or not
  the device is registered, because a restarted agent resends its previous boot's outbox
  and a result must never be lost. A record already stored under its
  (``device_id``, ``boot_epoch``, ``seq``) is skipped (insert-or-ignore), so a redelivered
  batch changes nothing.

It knows nothing of MQTT topics or HTTP.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, delete, select

from cloud_controller.entities import (
    Device,
    DeviceLabel,
    DeviceReported,
    Result,
    TelemetrySample,
)
from protocol.inference import ResultBatch, ResultRecord
from protocol.messages import DeviceStatus, Heartbeat, Hello, Presence, ReportedState, Telemetry

logger = logging.getLogger(__name__)


class Ingested(StrEnum):
    """What became of one accepted message; anything but APPLIED is a metric label."""

    APPLIED = "applied"
    UNKNOWN_DEVICE = "unknown_device"
    STALE_BOOT_EPOCH = "stale_boot_epoch"
    STALE_GENERATION = "stale_generation"


def register(session: Session, hello: Hello, *, now: datetime) -> Ingested:
    outcome = _register(session, hello, now=now)
    session.commit()
    return outcome


def _register(session: Session, hello: Hello, *, now: datetime) -> Ingested:
    device = session.get(Device, hello.device_id)
    if device is None:
        device = Device(
            id=hello.device_id,
            hardware_class=hello.hardware_class,
            labels=dict(hello.labels),
            agent_version=hello.agent_version,
            capabilities=hello.capabilities.model_dump(mode="json"),
            boot_epoch=hello.boot_epoch,
            keepalive_s=hello.keepalive_s,
            status=DeviceStatus.ONLINE,
            first_seen=now,
            last_seen=now,
        )
        session.add(device)
        logger.info("device registered", extra={"device_id": hello.device_id})
    else:
        if hello.boot_epoch < device.boot_epoch:
            logger.warning(
                "boot_epoch went backwards; accepting the hello",
                extra={
                    "device_id": device.id,
                    "boot_epoch": hello.boot_epoch,
                    "previous_boot_epoch": device.boot_epoch,
                },
            )
        device.hardware_class = hello.hardware_class
        device.labels = dict(hello.labels)
        device.agent_version = hello.agent_version
        device.capabilities = hello.capabilities.model_dump(mode="json")
        device.boot_epoch = hello.boot_epoch
        device.keepalive_s = hello.keepalive_s
        device.status = DeviceStatus.ONLINE
        device.last_seen = now
        session.add(device)
        session.exec(delete(DeviceLabel).where(col(DeviceLabel.device_id) == hello.device_id))
    session.flush()
    session.add_all(
        DeviceLabel(device_id=hello.device_id, key=key, value=value)
        for key, value in hello.labels.items()
    )
    session.flush()
    return Ingested.APPLIED


def _current(session: Session, device_id: str, boot_epoch: int) -> Device | Ingested:
    """The device, or why a message of ``boot_epoch`` about it must be ignored."""
    device = session.get(Device, device_id)
    if device is None:
        return Ingested.UNKNOWN_DEVICE
    if boot_epoch < device.boot_epoch:
        return Ingested.STALE_BOOT_EPOCH
    return device


def apply_presence(session: Session, presence: Presence, *, now: datetime) -> Ingested:
    outcome = _apply_presence(session, presence, now=now)
    session.commit()
    return outcome


def _apply_presence(session: Session, presence: Presence, *, now: datetime) -> Ingested:
    device = _current(session, presence.device_id, presence.boot_epoch)
    if isinstance(device, Ingested):
        return device
    if device.status != presence.status:
        logger.info(
            "device %s",
            presence.status.value,
            extra={"device_id": device.id, "reason": presence.reason},
        )
    device.status = presence.status
    device.boot_epoch = presence.boot_epoch
    if presence.status == DeviceStatus.ONLINE:
        device.last_seen = now  # an offline presence may be the broker speaking (Last Will)
    session.add(device)
    session.flush()
    return Ingested.APPLIED


def record_heartbeat(session: Session, heartbeat: Heartbeat, *, now: datetime) -> Ingested:
    """The device is alive: ``last_seen`` (never backwards) and its boot epoch; commit."""
    (applied,) = apply_batch(session, [(heartbeat, now)], keep=1)
    session.commit()
    return applied.outcome


def record_telemetry(
    session: Session, telemetry: Telemetry, *, now: datetime, keep: int
) -> Ingested:
    """Store one sample and delete all but the newest ``keep`` of this device; commit."""
    (applied,) = apply_batch(session, [(telemetry, now)], keep=keep)
    session.commit()
    return applied.outcome


def record_reported(session: Session, report: ReportedState, *, now: datetime) -> Ingested:
    """Keep the device's latest report; one about an older generation is ignored."""
    outcome = _record_reported(session, report, now=now)
    session.commit()
    return outcome


def _record_reported(session: Session, report: ReportedState, *, now: datetime) -> Ingested:
    device = _current(session, report.device_id, report.boot_epoch)
    if isinstance(device, Ingested):
        return device
    device.last_seen = now
    session.add(device)
    row = session.get(DeviceReported, device.id)
    if row is not None and report.observed_generation < row.observed_generation:
        session.flush()
        return Ingested.STALE_GENERATION
    if row is None:
        row = DeviceReported(
            device_id=device.id,
            observed_generation=report.observed_generation,
            outcome=report.outcome,
            boot_epoch=report.boot_epoch,
            reported_at=now,
        )
    row.observed_generation = report.observed_generation
    row.outcome = report.outcome
    row.policy = dict(report.policy)
    row.error = report.error
    row.boot_epoch = report.boot_epoch
    row.reported_at = now
    session.add(row)
    session.flush()
    return Ingested.APPLIED


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResults:
    """What ``store_results`` did with one batch; every seq in ``seqs`` is now stored."""

    seqs: tuple[int, ...]
    """The batch's distinct seqs, ascending: what the controller may now acknowledge."""
    inserted: int
    """Records stored by this batch."""
    duplicates: int
    """Records skipped because they were already stored (or repeated within the batch)."""


@dataclass(frozen=True)
class StoredSeqs:
    """The seqs stored for one (device, boot epoch), as the gap detector starts from."""

    contiguous: int
    """Every seq up to this one counts as stored (0: none)."""
    above: frozenset[int]
    """Stored seqs above ``contiguous``, when there are holes."""


_RESULT_KEY = ["device_id", "boot_epoch", "seq"]


def _result_row(batch: ResultBatch, record: ResultRecord, now: datetime) -> dict[str, Any]:
    block = record.embeddings
    return {
        "device_id": batch.device_id,
        "boot_epoch": batch.boot_epoch,
        "seq": record.seq,
        "request_id": record.request_id,
        "status": record.status.value,
        "tier": record.tier.value,
        "variant": record.variant,
        "offload_reason": record.offload_reason.value if record.offload_reason else None,
        "queued_ms": record.queued_ms,
        "latency_ms": record.latency_ms,
        "served_at": record.served_at,
        "received_at": now,
        "embedding_count": block.count if block else None,
        "embedding_dim": block.dim if block else None,
        "embeddings": base64.b64decode(block.data_b64) if block else None,
    }


def store_results(session: Session, batch: ResultBatch, *, now: datetime) -> StoredResults:
    """Insert the batch's records in one transaction, skipping stored ones, and commit."""
    stored = _store_results(session, batch, now=now)
    session.commit()
    return stored


def _store_results(session: Session, batch: ResultBatch, *, now: datetime) -> StoredResults:
    dialect = session.get_bind().dialect.name
    insert: Any
    if dialect == "postgresql":
        insert = postgresql.insert
    elif dialect == "sqlite":
        insert = sqlite.insert
    else:
        raise NotImplementedError(f"results need SQLite or PostgreSQL, not {dialect}")
    rows = [_result_row(batch, record, now) for record in batch.records]
    statement = insert(Result).values(rows).on_conflict_do_nothing(index_elements=_RESULT_KEY)
    inserted = session.exec(statement).rowcount
    return StoredResults(
        seqs=tuple(sorted({record.seq for record in batch.records})),
        inserted=inserted,
        duplicates=len(rows) - inserted,
    )


def stored_seqs(session: Session, device_id: str, boot_epoch: int) -> StoredSeqs:
    """What is stored for one boot of a device; seqs below the lowest stored one count as
    stored (retention deleted them, or they predate what this database keeps)."""
    where = (col(Result.device_id) == device_id, col(Result.boot_epoch) == boot_epoch)
    low, high, count = session.exec(
        select(sa.func.min(Result.seq), sa.func.max(Result.seq), sa.func.count()).where(*where)
    ).one()
    if not count:
        return StoredSeqs(contiguous=0, above=frozenset())
    if high - low + 1 == count:
        return StoredSeqs(contiguous=int(high), above=frozenset())
    above = session.exec(select(Result.seq).where(*where, col(Result.seq) > low)).all()
    return StoredSeqs(contiguous=int(low), above=frozenset(int(seq) for seq in above))


# -- batches ------------------------------------------------------------------------------

Inbound = Hello | Presence | ReportedState | Heartbeat | Telemetry | ResultBatch
"""Every message ``apply_batch`` knows."""


@dataclass(frozen=True)
class Applied:
    """What ``apply_batch`` did with one message of a batch."""

    outcome: Ingested
    coalesced: bool = False
    """Applied, but a newer heartbeat of the same device in the batch wrote ``last_seen``
    for it: it cost no write of its own."""
    stored: StoredResults | None = None
    """For a ``ResultBatch``: what was stored."""
    before: StoredSeqs | None = None
    """For a ``ResultBatch`` whose (device, boot epoch) ``seed`` asked for: what was stored
    of it before this batch (and before any earlier message of this batch)."""


def apply_batch(
    session: Session,
    messages: Sequence[tuple[Inbound, datetime]],
    *,
    keep: int,
    seed: Callable[[tuple[str, int]], bool] = lambda key: False,
) -> list[Applied]:
    """Apply ``messages`` (each with the time it was received) in one transaction, without
    committing; return one ``Applied`` per message, in order.

    Hellos, presence, reports and results are applied one by one, in the given order.
    Heartbeats and telemetry follow, set-based: the devices they name are read once, each
    message is checked against its device's boot epoch as it stood after the messages
    before it, then one ``UPDATE`` per device writes ``last_seen`` (the newest receive time,
    never earlier than the stored one) and the boot epoch, telemetry rows go in as one
    multi-row insert, and each device's history is trimmed to ``keep`` once. ``seed(key)``
    says whether the stored seqs of a results key must be read first (for the gap tracker).
    """
    out: list[Applied | None] = [None] * len(messages)
    data: list[int] = []
    seeded: set[tuple[str, int]] = set()
    for index, (message, now) in enumerate(messages):
        if isinstance(message, Hello):
            out[index] = Applied(_register(session, message, now=now))
        elif isinstance(message, Presence):
            out[index] = Applied(_apply_presence(session, message, now=now))
        elif isinstance(message, ReportedState):
            out[index] = Applied(_record_reported(session, message, now=now))
        elif isinstance(message, ResultBatch):
            key = (message.device_id, message.boot_epoch)
            before = None
            if key not in seeded and seed(key):
                before = stored_seqs(session, *key)
                seeded.add(key)
            stored = _store_results(session, message, now=now)
            out[index] = Applied(Ingested.APPLIED, stored=stored, before=before)
        else:
            data.append(index)
    if data:
        for index, applied in _apply_liveness(session, messages, data, keep=keep).items():
            out[index] = applied
    return [applied for applied in out if applied is not None]


@dataclass
class _Liveness:
    """One device as the heartbeats and telemetry of a batch leave it."""

    boot_epoch: int
    last_seen: datetime
    touched: bool = False
    last_heartbeat: int | None = None
    """Index of the newest applied heartbeat so far (an older one is coalesced)."""


def _apply_liveness(
    session: Session,
    messages: Sequence[tuple[Inbound, datetime]],
    indexes: list[int],
    *,
    keep: int,
) -> dict[int, Applied]:
    session.flush()  # the batch's hellos and presence count for what follows
    connection = session.connection()
    devices = Device.__table__  # type: ignore[attr-defined]
    samples = TelemetrySample.__table__  # type: ignore[attr-defined]
    ids = {messages[index][0].device_id for index in indexes}
    state = {
        row.id: _Liveness(int(row.boot_epoch), row.last_seen)
        for row in connection.execute(
            sa.select(devices.c.id, devices.c.boot_epoch, devices.c.last_seen).where(
                devices.c.id.in_(sorted(ids))
            )
        )
    }
    out: dict[int, Applied] = {}
    rows: list[dict[str, Any]] = []
    for index in indexes:
        message, now = messages[index]
        device = state.get(message.device_id)
        if device is None:
            out[index] = Applied(Ingested.UNKNOWN_DEVICE)
            continue
        if message.boot_epoch < device.boot_epoch:
            out[index] = Applied(Ingested.STALE_BOOT_EPOCH)
            continue
        device.touched = True
        device.last_seen = max(device.last_seen, now)
        out[index] = Applied(Ingested.APPLIED)
        if isinstance(message, Heartbeat):
            device.boot_epoch = message.boot_epoch
            if device.last_heartbeat is not None:
                out[device.last_heartbeat] = Applied(Ingested.APPLIED, coalesced=True)
            device.last_heartbeat = index
        else:
            assert isinstance(message, Telemetry)
            rows.append(
                {
                    "device_id": message.device_id,
                    "ts": message.sent_at,
                    "received_at": now,
                    "metrics": dict(message.metrics),
                }
            )
    touched = [
        {"b_id": device_id, "b_last_seen": device.last_seen, "b_boot_epoch": device.boot_epoch}
        for device_id, device in state.items()
        if device.touched
    ]
    if touched:
        connection.execute(
            sa.update(devices)
            .where(devices.c.id == sa.bindparam("b_id"))
            .values(
                last_seen=sa.bindparam("b_last_seen", type_=devices.c.last_seen.type),
                boot_epoch=sa.bindparam("b_boot_epoch"),
            ),
            touched,
        )
    if rows:
        connection.execute(sa.insert(samples), rows)
        oldest_kept = (
            sa.select(samples.c.id)
            .where(samples.c.device_id == sa.bindparam("b_device"))
            .order_by(samples.c.id.desc())
            .offset(keep - 1)
            .limit(1)
            .scalar_subquery()
        )
        connection.execute(
            sa.delete(samples).where(
                samples.c.device_id == sa.bindparam("b_device"), samples.c.id < oldest_kept
            ),
            [{"b_device": device_id} for device_id in sorted({r["device_id"] for r in rows})],
        )
    return out
