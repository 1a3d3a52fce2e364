"""Applying what devices say to the database: the one write path for device records.

Each function takes an open ``Session`` and a decoded message, writes, commits and says
what it did as an ``Ingested`` value. The rules that keep a restarted agent safe from its
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
    session.commit()
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
    session.commit()
    return Ingested.APPLIED


def record_heartbeat(session: Session, heartbeat: Heartbeat, *, now: datetime) -> Ingested:
    device = _current(session, heartbeat.device_id, heartbeat.boot_epoch)
    if isinstance(device, Ingested):
        return device
    device.last_seen = now
    device.boot_epoch = heartbeat.boot_epoch
    session.add(device)
    session.commit()
    return Ingested.APPLIED


def record_telemetry(
    session: Session, telemetry: Telemetry, *, now: datetime, keep: int
) -> Ingested:
    """Store one sample and delete all but the newest ``keep`` of this device."""
    device = _current(session, telemetry.device_id, telemetry.boot_epoch)
    if isinstance(device, Ingested):
        return device
    device.last_seen = now
    session.add(device)
    session.add(
        TelemetrySample(
            device_id=device.id,
            ts=telemetry.sent_at,
            received_at=now,
            metrics=dict(telemetry.metrics),
        )
    )
    session.flush()
    oldest_kept = session.exec(
        select(TelemetrySample.id)
        .where(col(TelemetrySample.device_id) == device.id)
        .order_by(col(TelemetrySample.id).desc())
        .offset(keep - 1)
        .limit(1)
    ).first()
    if oldest_kept is not None:
        session.exec(
            delete(TelemetrySample).where(
                col(TelemetrySample.device_id) == device.id,
                col(TelemetrySample.id) < oldest_kept,
            )
        )
    session.commit()
    return Ingested.APPLIED


def record_reported(session: Session, report: ReportedState, *, now: datetime) -> Ingested:
    """Keep the device's latest report; one about an older generation is ignored."""
    device = _current(session, report.device_id, report.boot_epoch)
    if isinstance(device, Ingested):
        return device
    device.last_seen = now
    session.add(device)
    row = session.get(DeviceReported, device.id)
    if row is not None and report.observed_generation < row.observed_generation:
        session.commit()
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
    session.commit()
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
    session.commit()
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
