"""REST v1 for devices: list with filters and paging, one device, its desired state.

Routes are short: they parse, call ``queries`` or the bridge, and return ``*Public``
models. Domain errors (``DeviceNotFound``, ...) are mapped to statuses in ``app.py``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_controller import assignments, queries
from cloud_controller.deps import BridgeDep, RuntimeDep, SessionDep, SettingsDep
from cloud_controller.entities import (
    DesiredSet,
    DesiredUpdate,
    DevicePage,
    DevicePublic,
    ModelAssign,
    TelemetryPublic,
)
from cloud_controller.paging import check_page_size, query_error
from protocol.messages import DeviceStatus

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


def _parse_labels(labels: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise query_error("label", f"label filter {item!r} must look like key=value", item)
        parsed[key] = value
    return parsed


@router.get("", response_model=DevicePage)
def list_devices(
    session: SessionDep,
    runtime: RuntimeDep,
    status: DeviceStatus | None = None,
    hardware_class: str | None = None,
    label: Annotated[list[str], Query(description="key=value; repeat to AND")] = [],  # noqa: B006
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1)] = 50,
) -> DevicePage:
    settings = runtime.settings
    check_page_size(page_size, settings)
    flt = queries.DeviceFilter(
        status=status, hardware_class=hardware_class, labels=_parse_labels(label)
    )
    items, total = queries.list_devices(
        session,
        flt,
        page=page,
        page_size=page_size,
        now=runtime.clock(),
        stale_after_s=settings.stale_after_s,
    )
    return DevicePage(items=items, total=total, page=page, page_size=page_size)


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, runtime: RuntimeDep) -> DevicePublic:
    return queries.get_device(
        session, device_id, now=runtime.clock(), stale_after_s=runtime.settings.stale_after_s
    )


@router.get("/{device_id}/telemetry", response_model=list[TelemetryPublic])
def get_telemetry(
    device_id: str,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1)] = 20,
) -> list[TelemetryPublic]:
    return queries.telemetry_history(
        session, device_id, limit=min(limit, settings.telemetry_history)
    )


@router.put("/{device_id}/desired", response_model=DesiredSet)
def put_desired(device_id: str, body: DesiredUpdate, bridge: BridgeDep) -> DesiredSet:
    """Store the policy as the next generation and publish it to the device (retained)."""
    generation = bridge.set_desired(device_id, body.policy)
    return DesiredSet(device_id=device_id, generation=generation, policy=body.policy)


@router.put("/{device_id}/model", response_model=DesiredSet)
def put_model(device_id: str, body: ModelAssign, runtime: RuntimeDep) -> DesiredSet:
    """Point the device at a ready model variant (the ``model`` key of its policy)."""
    return assignments.assign_model(
        bridge=runtime.bridge,
        engine=runtime.engine,
        device_id=device_id,
        name=body.name,
        version=body.version,
        variant=body.variant,
    )
