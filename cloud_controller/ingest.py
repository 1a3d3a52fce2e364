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

It knows nothing of MQTT topics or HTTP.
"""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum

from sqlmodel import Session, col, delete, select

from cloud_controller.entities import (
    Device,
    DeviceLabel,
    DeviceReported,
    TelemetrySample,
)
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
