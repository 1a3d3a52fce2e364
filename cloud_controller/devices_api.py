"""REST v1 for devices: list with filters and paging, one device, its desired state.

Routes are short: they parse, call ``queries`` or the bridge, and return ``*Public``
models. Domain errors (``DeviceNotFound``, ...) are mapped to statuses in ``app.py``.
Reads need a viewer token, changes an operator token and are audited.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import StringConstraints

from cloud_controller import assignments, audit, queries
from cloud_controller.auth import OperatorDep, ViewerDep
from cloud_controller.deps import RuntimeDep, SessionDep, SettingsDep
from cloud_controller.entities import (
    DesiredSet,
    DesiredUpdate,
    DevicePage,
    DevicePublic,
    ModelAssign,
    TelemetryPublic,
)
from cloud_controller.paging import Page, PageSize, check_page_size, query_error
from protocol.messages import DeviceStatus

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])

DeviceId = Annotated[str, Path(min_length=1, max_length=64)]


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
    principal: ViewerDep,
    session: SessionDep,
    runtime: RuntimeDep,
    status: DeviceStatus | None = None,
    hardware_class: Annotated[str | None, Query(max_length=64)] = None,
    label: Annotated[
        list[Annotated[str, StringConstraints(max_length=256)]],
        Query(description="key=value; repeat to AND", max_length=32),
    ] = [],  # noqa: B006
    page: Page = 1,
    page_size: PageSize = 50,
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
def get_device(
    device_id: DeviceId, principal: ViewerDep, session: SessionDep, runtime: RuntimeDep
) -> DevicePublic:
    return queries.get_device(
        session, device_id, now=runtime.clock(), stale_after_s=runtime.settings.stale_after_s
    )


@router.get("/{device_id}/telemetry", response_model=list[TelemetryPublic])
def get_telemetry(
    device_id: DeviceId,
    principal: ViewerDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 20,
) -> list[TelemetryPublic]:
    return queries.telemetry_history(
        session, device_id, limit=min(limit, settings.telemetry_history)
    )


@router.put("/{device_id}/desired", response_model=DesiredSet, name="device.set_desired")
def put_desired(
    device_id: DeviceId,
    body: DesiredUpdate,
    principal: OperatorDep,
    session: SessionDep,
    runtime: RuntimeDep,
) -> DesiredSet:
    """Store the policy as the next generation and publish it to the device (retained)."""
    with audit.audited(
        session, principal, "device.set_desired", "device", device_id, now=runtime.clock()
    ) as detail:
        generation = runtime.bridge.set_desired(device_id, body.policy)
        detail.update(generation=generation, policy=body.policy)
    return DesiredSet(device_id=device_id, generation=generation, policy=body.policy)


@router.put("/{device_id}/model", response_model=DesiredSet, name="device.assign_model")
def put_model(
    device_id: DeviceId,
    body: ModelAssign,
    principal: OperatorDep,
    session: SessionDep,
    runtime: RuntimeDep,
) -> DesiredSet:
    """Point the device at a ready model variant (the ``model`` key of its policy)."""
    with audit.audited(
        session, principal, "device.assign_model", "device", device_id, now=runtime.clock()
    ) as detail:
        detail.update(model=body.model_dump())
        answer = assignments.assign_model(
            bridge=runtime.bridge,
            engine=runtime.engine,
            device_id=device_id,
            name=body.name,
            version=body.version,
            variant=body.variant,
        )
        detail.update(generation=answer.generation)
    return answer
