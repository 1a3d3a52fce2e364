"""Read views of the fleet: filtered, paged device lists and single devices as the API shows
them, and the results devices reported.

Staleness is computed here from ``now`` (the injected clock), never stored. Knows nothing
of MQTT or HTTP; ``DeviceNotFound`` and ``ResultNotFound`` are mapped to 404 at the HTTP
boundary.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import Select

from cloud_controller.entities import (
    DesiredPublic,
    Device,
    DeviceDesired,
    DeviceLabel,
    DevicePublic,
    DeviceReported,
    ReportedPublic,
    Result,
    ResultPublic,
    TelemetryPublic,
    TelemetrySample,
)
from cloud_controller.errors import DeviceNotFound, ResultNotFound
from protocol.messages import DeviceStatus


@dataclass(frozen=True)
class DeviceFilter:
    """All conditions must hold; ``labels`` are ``key == value`` pairs."""

    status: DeviceStatus | None = None
    hardware_class: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


SelectOfState = Select[Device, DeviceDesired, DeviceReported]
"""Devices outer-joined with their desired and reported state (either may be None)."""


def _conditions(flt: DeviceFilter) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = []
    if flt.status is not None:
        conditions.append(col(Device.status) == flt.status)
    if flt.hardware_class is not None:
        conditions.append(col(Device.hardware_class) == flt.hardware_class)
    for key, value in flt.labels.items():
        conditions.append(
            col(Device.id).in_(
                select(DeviceLabel.device_id).where(
                    col(DeviceLabel.key) == key, col(DeviceLabel.value) == value
                )
            )
        )
    return conditions


def _public(
    device: Device,
    desired: DeviceDesired | None,
    reported: DeviceReported | None,
    *,
    now: datetime,
    stale_after_s: float,
    latest: TelemetrySample | None = None,
) -> DevicePublic:
    age_s = max(0.0, (now - device.last_seen).total_seconds())
    return DevicePublic(
        **device.model_dump(exclude={"status"}),
        status=DeviceStatus(device.status),  # the column holds the plain string
        staleness_age_s=age_s,
        stale=device.status == DeviceStatus.ONLINE and age_s > stale_after_s,
        desired=DesiredPublic.model_validate(desired, from_attributes=True) if desired else None,
        reported=(
            ReportedPublic.model_validate(reported, from_attributes=True) if reported else None
        ),
        latest_telemetry=(
            TelemetryPublic.model_validate(latest, from_attributes=True) if latest else None
        ),
    )


def _with_state() -> SelectOfState:
    return (
        select(Device, DeviceDesired, DeviceReported)
        .outerjoin(DeviceDesired, col(DeviceDesired.device_id) == col(Device.id))
        .outerjoin(DeviceReported, col(DeviceReported.device_id) == col(Device.id))
    )


def list_devices(
    session: Session,
    flt: DeviceFilter,
    *,
    page: int,
    page_size: int,
    now: datetime,
    stale_after_s: float,
) -> tuple[list[DevicePublic], int]:
    """One page (1-based) of matching devices in id order, and how many match in all."""
    conditions = _conditions(flt)
    total = session.exec(select(sa.func.count()).select_from(Device).where(*conditions)).one()
    rows = session.exec(
        _with_state()
        .where(*conditions)
        .order_by(col(Device.id))
        .offset((page - 1) * page_size)
        .limit(page_size)
    ).all()
    items = [
        _public(device, desired, reported, now=now, stale_after_s=stale_after_s)
        for device, desired, reported in rows
    ]
    return items, int(total)


def get_device(
    session: Session, device_id: str, *, now: datetime, stale_after_s: float
) -> DevicePublic:
    row = session.exec(_with_state().where(col(Device.id) == device_id)).first()
    if row is None:
        raise DeviceNotFound(device_id)
    device, desired, reported = row
    latest = session.exec(
        select(TelemetrySample)
        .where(col(TelemetrySample.device_id) == device_id)
        .order_by(col(TelemetrySample.id).desc())
        .limit(1)
    ).first()
    return _public(device, desired, reported, now=now, stale_after_s=stale_after_s, latest=latest)


def telemetry_history(session: Session, device_id: str, *, limit: int) -> list[TelemetryPublic]:
    """The device's newest ``limit`` samples, newest first."""
    if session.get(Device, device_id) is None:
        raise DeviceNotFound(device_id)
    samples = session.exec(
        select(TelemetrySample)
        .where(col(TelemetrySample.device_id) == device_id)
        .order_by(col(TelemetrySample.id).desc())
        .limit(limit)
    ).all()
    return [TelemetryPublic.model_validate(s, from_attributes=True) for s in samples]


def count_by_status(session: Session) -> dict[DeviceStatus, int]:
    rows = session.exec(
        select(col(Device.status), sa.func.count()).group_by(col(Device.status))
    ).all()
    counts = dict.fromkeys(DeviceStatus, 0)
    for status, count in rows:
        counts[DeviceStatus(status)] = int(count)
    return counts


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultFilter:
    """All conditions must hold; ``since`` is inclusive and ``until`` exclusive (served_at)."""

    device_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _embeddings(row: Result) -> list[list[float]] | None:
    """The stored little-endian float32 bytes as ``count`` lists of ``dim`` floats."""
    if row.embeddings is None or not row.embedding_dim:
        return None
    values = array("f")
    values.frombytes(row.embeddings)
    if sys.byteorder == "big":
        values.byteswap()
    dim = row.embedding_dim
    return [values[i : i + dim].tolist() for i in range(0, len(values), dim)]


def _result_public(row: Result, *, include_embeddings: bool) -> ResultPublic:
    return ResultPublic(
        **row.model_dump(exclude={"id", "embeddings", "embedding_count", "embedding_dim"}),
        embeddings=_embeddings(row) if include_embeddings else None,
    )


def get_result(session: Session, request_id: str, *, include_embeddings: bool) -> ResultPublic:
    """The result of ``request_id``; if several devices reported one, the last received."""
    row = session.exec(
        select(Result)
        .where(col(Result.request_id) == request_id)
        .order_by(col(Result.id).desc())
        .limit(1)
    ).first()
    if row is None:
        raise ResultNotFound(request_id)
    return _result_public(row, include_embeddings=include_embeddings)


def list_results(
    session: Session,
    flt: ResultFilter,
    *,
    page: int,
    page_size: int,
    include_embeddings: bool,
) -> tuple[list[ResultPublic], int]:
    """One page (1-based) of matching results by ``served_at``, ``seq``; and the total."""
    conditions: list[sa.ColumnElement[bool]] = []
    if flt.device_id is not None:
        conditions.append(col(Result.device_id) == flt.device_id)
    if flt.since is not None:
        conditions.append(col(Result.served_at) >= flt.since)
    if flt.until is not None:
        conditions.append(col(Result.served_at) < flt.until)
    total = session.exec(select(sa.func.count()).select_from(Result).where(*conditions)).one()
    rows = session.exec(
        select(Result)
        .where(*conditions)
        .order_by(col(Result.served_at), col(Result.seq), col(Result.id))
        .offset((page - 1) * page_size)
        .limit(page_size)
    ).all()
    items = [_result_public(row, include_embeddings=include_embeddings) for row in rows]
    return items, int(total)
