"""REST v1 for the fleet as a whole: what the dashboard's overview and charts read.

``/summary`` counts devices by status, hardware class, model variant and staleness;
``/devices`` is a light, searchable table page; ``/series`` a throughput / latency /
offload-ratio time series. Each answer's size is bounded by groups, the page size or the
number of buckets, never by the fleet's size.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_controller import fleet
from cloud_controller.auth import ViewerDep
from cloud_controller.deps import RuntimeDep, SessionDep
from cloud_controller.paging import Page, PageSize, check_page_size, query_error
from protocol.messages import DeviceStatus

router = APIRouter(prefix="/api/v1/fleet", tags=["fleet"])

MAX_BUCKETS = 720
"""Most points one series answer holds."""


@router.get("/summary", response_model=fleet.FleetSummary)
def get_summary(
    principal: ViewerDep, session: SessionDep, runtime: RuntimeDep
) -> fleet.FleetSummary:
    return fleet.summary(session, now=runtime.clock(), stale_after_s=runtime.settings.stale_after_s)


@router.get("/devices", response_model=fleet.FleetPage)
def list_rows(
    principal: ViewerDep,
    session: SessionDep,
    runtime: RuntimeDep,
    search: Annotated[str | None, Query(max_length=64)] = None,
    status: DeviceStatus | None = None,
    hardware_class: Annotated[str | None, Query(max_length=64)] = None,
    page: Page = 1,
    page_size: PageSize = 50,
) -> fleet.FleetPage:
    check_page_size(page_size, runtime.settings)
    return fleet.rows(
        session,
        fleet.RowFilter(search=search or None, status=status, hardware_class=hardware_class),
        page=page,
        page_size=page_size,
        now=runtime.clock(),
        stale_after_s=runtime.settings.stale_after_s,
    )


@router.get("/series", response_model=fleet.FleetSeries)
def get_series(
    principal: ViewerDep,
    session: SessionDep,
    runtime: RuntimeDep,
    window_s: Annotated[int, Query(ge=10, le=86_400)] = 300,
    step_s: Annotated[int, Query(ge=1, le=3_600)] = 5,
) -> fleet.FleetSeries:
    if window_s % step_s:
        raise query_error("window_s", f"window_s {window_s} is not a multiple of step_s", window_s)
    if window_s // step_s > MAX_BUCKETS:
        raise query_error(
            "step_s",
            f"window_s/step_s gives {window_s // step_s} points; at most {MAX_BUCKETS}",
            step_s,
        )
    return fleet.series(session, now=runtime.clock(), window_s=window_s, step_s=step_s)
