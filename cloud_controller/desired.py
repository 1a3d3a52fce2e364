"""Desired state in the database: bump a device's generation, list them all.

Publishing is the bridge's job (``Bridge.set_desired``): it calls ``bump`` (which commits)
and then publishes, so a retained message never announces a generation the database does
not hold. Knows nothing of MQTT.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from cloud_controller.entities import Device, DeviceDesired
from cloud_controller.errors import DeviceNotFound


def bump(
    session: Session, device_id: str, policy: dict[str, Any], *, now: datetime
) -> DeviceDesired:
    """Store ``policy`` as the device's next generation (first is 1) and commit."""
    return amend(session, device_id, lambda current: policy, now=now)


def amend(
    session: Session,
    device_id: str,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    now: datetime,
) -> DeviceDesired:
    """Store ``change(current policy)`` as the device's next generation and commit; the
    current row is locked meanwhile (``{}`` when the device has none yet)."""
    if session.get(Device, device_id) is None:
        raise DeviceNotFound(device_id)
    row = session.exec(
        select(DeviceDesired).where(col(DeviceDesired.device_id) == device_id).with_for_update()
    ).first()
    row = _next_generation(device_id, row, change, now)
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def _next_generation(
    device_id: str,
    row: DeviceDesired | None,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    now: datetime,
) -> DeviceDesired:
    """``row`` (or a first one) holding ``change(current policy)`` as the next generation."""
    policy = change(dict(row.policy) if row is not None else {})
    if row is None:
        return DeviceDesired(device_id=device_id, generation=1, policy=policy, updated_at=now)
    row.generation += 1
    row.policy = policy
    row.updated_at = now
    return row


def amend_many(
    session: Session,
    device_ids: list[str],
    change: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    now: datetime,
) -> tuple[list[DeviceDesired], list[str]]:
    """``amend`` for many devices in one transaction: (the new rows, the ids of devices
    that do not exist, which are left alone)."""
    known = set(session.exec(select(Device.id).where(col(Device.id).in_(device_ids))).all())
    current = {
        row.device_id: row
        for row in session.exec(
            select(DeviceDesired)
            .where(col(DeviceDesired.device_id).in_(sorted(known)))
            .with_for_update()
        ).all()
    }
    rows: list[DeviceDesired] = []
    for device_id in device_ids:
        if device_id not in known:
            continue
        row = _next_generation(device_id, current.get(device_id), change, now)
        session.add(row)
        rows.append(row)
    session.commit()
    for row in rows:
        session.refresh(row)
    return rows, [d for d in device_ids if d not in known]


def current_all(session: Session) -> list[DeviceDesired]:
    """Every device's current desired state, for republishing after a reconnect."""
    return list(session.exec(select(DeviceDesired).order_by(col(DeviceDesired.device_id))).all())
