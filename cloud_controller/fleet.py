"""Fleet-wide read views for the dashboard: counts, a searchable device table, time series.

Everything is aggregated in SQL (``GROUP BY``), so the answer's size depends on the number
of groups and time buckets, never on the number of devices or results. Latency quantiles
are estimated from per-bucket counts under fixed edges (like Prometheus'
``histogram_quantile``), which works the same on SQLite and PostgreSQL. Knows nothing of
MQTT or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped
from sqlmodel import Session, SQLModel, col, select

from cloud_controller.entities import Device, DeviceReported, Result, TelemetrySample
from cloud_controller.rollout_entities import Rollout, RolloutState
from protocol.messages import DeviceStatus

LATENCY_EDGES_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
"""Upper edges of the latency buckets the series' quantiles are estimated from."""
NO_VARIANT = "none"
"""The variant group of devices that reported no model."""


class FleetSummary(SQLModel):
    total: int
    by_status: dict[str, int]
    by_hardware_class: dict[str, int]
    by_variant: dict[str, int]
    """Model variant the device last reported running (``none``: no model reported)."""
    stale: int
    """Online devices silent for longer than ``stale_after_s``."""
    staleness_s: dict[str, int]
    """Devices by time since last heard from: ``<10s``, ``10-60s``, ``1-10m``, ``>10m``."""


class FleetRow(SQLModel):
    """One device as the fleet table shows it (no JSON blobs: a page stays small)."""

    id: str
    status: DeviceStatus
    hardware_class: str
    variant: str | None
    staleness_age_s: float
    stale: bool
    last_seen: datetime


class FleetPage(SQLModel):
    items: list[FleetRow]
    total: int
    page: int
    page_size: int


class SeriesPoint(SQLModel):
    t: datetime
    """Start of the bucket (controller clock)."""
    results: int
    """Results stored in the bucket."""
    throughput_rps: float
    p50_ms: float | None
    """Estimated from bucket counts; None when the bucket holds no result."""
    p99_ms: float | None
    offload_ratio: float | None
    """Results served by the cloud pool / all results; None when there were none."""
    telemetry_samples: int
    cpu_percent_mean: float | None
    """Mean host CPU over the fleet's telemetry samples in the bucket."""


class FleetSeries(SQLModel):
    step_s: int
    window_s: int
    points: list[SeriesPoint]


def _variant_expr() -> sa.ColumnElement[str]:
    policy = sa.type_coerce(col(DeviceReported.policy), sa.JSON)
    return policy[("model", "variant")].as_string()


def _bucket(session: Session, column: Mapped[datetime], step_s: int) -> sa.ColumnElement[Any]:
    """Whole ``step_s`` periods since the epoch of a UTC timestamp column, in the session's
    SQL dialect (SQLite stores timestamps as UTC text; integer division floors there)."""
    if session.get_bind().dialect.name == "postgresql":
        epoch = sa.func.extract("epoch", column)
        return sa.cast(sa.func.floor(epoch / step_s), sa.BigInteger)
    return sa.cast(sa.func.strftime("%s", column), sa.Integer) / step_s


def summary(session: Session, *, now: datetime, stale_after_s: float) -> FleetSummary:
    by_status = {s.value: 0 for s in DeviceStatus}
    for status, count in session.exec(
        select(col(Device.status), sa.func.count()).group_by(col(Device.status))
    ).all():
        by_status[str(status)] = int(count)
    by_hw = {
        str(hw): int(n)
        for hw, n in session.exec(
            select(col(Device.hardware_class), sa.func.count())
            .group_by(col(Device.hardware_class))
            .order_by(sa.func.count().desc())
        ).all()
    }
    variant = sa.func.coalesce(_variant_expr(), NO_VARIANT)
    by_variant = {
        str(v): int(n)
        for v, n in session.exec(
            select(variant, sa.func.count())
            .select_from(Device)
            .outerjoin(DeviceReported, col(DeviceReported.device_id) == col(Device.id))
            .group_by(variant)
            .order_by(sa.func.count().desc())
        ).all()
    }
    ages = {"<10s": 10.0, "10-60s": 60.0, "1-10m": 600.0}
    staleness: dict[str, int] = {}
    lower = now
    for name, seconds in ages.items():
        since = now - timedelta(seconds=seconds)
        staleness[name] = _count(
            session, col(Device.last_seen) > since, col(Device.last_seen) <= lower
        )
        lower = since
    staleness[">10m"] = _count(session, col(Device.last_seen) <= lower)
    stale = _count(
        session,
        col(Device.status) == DeviceStatus.ONLINE,
        col(Device.last_seen) < now - timedelta(seconds=stale_after_s),
    )
    return FleetSummary(
        total=sum(by_status.values()),
        by_status=by_status,
        by_hardware_class=by_hw,
        by_variant=by_variant,
        stale=stale,
        staleness_s=staleness,
    )


def rollouts_by_state(session: Session) -> dict[str, int]:
    """Rollouts by state (every state present, 0 when none): the ``spillway_rollouts`` gauge."""
    counts = {state.value: 0 for state in RolloutState}
    for state, count in session.exec(
        select(col(Rollout.state), sa.func.count()).group_by(col(Rollout.state))
    ).all():
        counts[str(state)] = int(count)
    return counts


def _count(session: Session, *conditions: sa.ColumnElement[bool]) -> int:
    return int(session.exec(select(sa.func.count()).select_from(Device).where(*conditions)).one())


@dataclass(frozen=True)
class RowFilter:
    """``search`` matches a substring of the id or the hardware class (case-insensitive)."""

    search: str | None = None
    status: DeviceStatus | None = None
    hardware_class: str | None = None


def rows(
    session: Session,
    flt: RowFilter,
    *,
    page: int,
    page_size: int,
    now: datetime,
    stale_after_s: float,
) -> FleetPage:
    """One page (1-based, id order) of the fleet table."""
    conditions: list[sa.ColumnElement[bool]] = []
    if flt.search:
        pattern = f"%{_escape_like(flt.search.lower())}%"
        conditions.append(
            sa.or_(
                sa.func.lower(col(Device.id)).like(pattern, escape="\\"),
                sa.func.lower(col(Device.hardware_class)).like(pattern, escape="\\"),
            )
        )
    if flt.status is not None:
        conditions.append(col(Device.status) == flt.status)
    if flt.hardware_class is not None:
        conditions.append(col(Device.hardware_class) == flt.hardware_class)
    total = _count(session, *conditions)
    found = session.execute(
        sa.select(
            col(Device.id),
            col(Device.status),
            col(Device.hardware_class),
            col(Device.last_seen),
            _variant_expr(),
        )
        .outerjoin(DeviceReported, col(DeviceReported.device_id) == col(Device.id))
        .where(*conditions)
        .order_by(col(Device.id))
        .offset((page - 1) * page_size)
        .limit(page_size)
    ).all()
    items = []
    for device_id, status, hardware_class, last_seen, variant in found:
        age_s = max(0.0, (now - last_seen).total_seconds())
        items.append(
            FleetRow(
                id=device_id,
                status=DeviceStatus(status),
                hardware_class=hardware_class,
                variant=variant,
                staleness_age_s=age_s,
                stale=status == DeviceStatus.ONLINE and age_s > stale_after_s,
                last_seen=last_seen,
            )
        )
    return FleetPage(items=items, total=total, page=page, page_size=page_size)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def estimate_quantile(cumulative: list[int], total: int, q: float) -> float | None:
    """``q`` of a latency distribution from cumulative counts under ``LATENCY_EDGES_MS``.

    Linear inside the bucket holding the rank, as ``histogram_quantile`` does; a rank
    above the last edge answers the last edge (the estimate cannot see further).
    """
    if total <= 0:
        return None
    rank = q * total
    lower_edge, lower_count = 0.0, 0
    for edge, count in zip(LATENCY_EDGES_MS, cumulative, strict=True):
        if count >= rank:
            inside = count - lower_count
            fraction = (rank - lower_count) / inside if inside else 1.0
            return lower_edge + (edge - lower_edge) * fraction
        lower_edge, lower_count = float(edge), count
    return float(LATENCY_EDGES_MS[-1])


def series(session: Session, *, now: datetime, window_s: int, step_s: int) -> FleetSeries:
    """Throughput, p50/p99 latency, offload ratio and mean CPU per ``step_s`` bucket.

    ``now`` is rounded down to a whole step so that consecutive polls share buckets; the
    last bucket is the one in progress.
    """
    end_epoch = int(now.timestamp()) // step_s * step_s + step_s
    start_epoch = end_epoch - window_s
    since = datetime.fromtimestamp(start_epoch, tz=now.tzinfo)
    bucket = _bucket(session, col(Result.received_at), step_s)
    latency = col(Result.latency_ms)
    under = [
        sa.func.sum(sa.case((latency <= edge, 1), else_=0)).label(f"le_{i}")
        for i, edge in enumerate(LATENCY_EDGES_MS)
    ]
    cloud = sa.func.sum(sa.case((col(Result.tier) == "cloud", 1), else_=0))
    result_rows = session.exec(
        select(bucket, sa.func.count(), cloud, *under)
        .where(col(Result.received_at) >= since)
        .group_by(bucket)
    ).all()
    by_bucket: dict[int, tuple[int, int, list[int]]] = {}
    for row in result_rows:
        values: list[Any] = list(row)
        key, count, cloud_count = values[:3]
        under_edges = [int(c or 0) for c in values[3:]]
        by_bucket[int(key)] = (int(count), int(cloud_count or 0), under_edges)

    t_bucket = _bucket(session, col(TelemetrySample.received_at), step_s)
    cpu = sa.type_coerce(col(TelemetrySample.metrics), sa.JSON)["cpu_percent"].as_float()
    telemetry = {
        int(key): (int(count), None if mean is None else float(mean))
        for key, count, mean in session.exec(
            select(t_bucket, sa.func.count(), sa.func.avg(cpu))
            .where(col(TelemetrySample.received_at) >= since)
            .group_by(t_bucket)
        ).all()
    }

    points = []
    for start in range(start_epoch, end_epoch, step_s):
        key = start // step_s
        count, cloud_count, cumulative = by_bucket.get(key, (0, 0, []))
        samples, cpu_mean = telemetry.get(key, (0, None))
        points.append(
            SeriesPoint(
                t=datetime.fromtimestamp(start, tz=now.tzinfo),
                results=count,
                throughput_rps=count / step_s,
                p50_ms=estimate_quantile(cumulative, count, 0.50) if count else None,
                p99_ms=estimate_quantile(cumulative, count, 0.99) if count else None,
                offload_ratio=cloud_count / count if count else None,
                telemetry_samples=samples,
                cpu_percent_mean=cpu_mean,
            )
        )
    return FleetSeries(step_s=step_s, window_s=window_s, points=points)
