"""REST v1 for operating policies, operator labels and a device's effective policy.

Routes parse, call ``policies``/``groups``, push through ``policies.sync`` after a change,
and return ``*Public`` models; ``install`` adds the routers (groups' too) and maps the
policy errors to statuses. Reads need a viewer token, changes an operator token and are
audited.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from cloud_controller import audit, groups, groups_api, policies
from cloud_controller.auth import OperatorDep, ViewerDep
from cloud_controller.deps import RuntimeDep, SessionDep
from cloud_controller.errors import PolicyError
from cloud_controller.policy_entities import (
    EffectivePolicyPublic,
    LabelsChanged,
    LabelsPublic,
    LabelsUpdate,
    PolicyChanged,
    PolicyCreate,
    PolicyDetail,
    PolicyPublic,
    PolicySpec,
    PolicyVersionPublic,
)
from cloud_controller.runtime import Runtime

router = APIRouter(prefix="/api/v1/policies", tags=["policies"])
devices_router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


def _pushed(runtime: Runtime, detail: PolicyDetail) -> PolicyChanged:
    synced = policies.sync(runtime.bridge, runtime.engine)
    return PolicyChanged(**detail.model_dump(), devices_updated=synced.updated)


@router.post("", response_model=PolicyChanged, status_code=201)
def create_policy(body: PolicyCreate, principal: OperatorDep, runtime: RuntimeDep) -> PolicyChanged:
    """Version 1 of a new policy; pushed to the devices it targets."""
    with audit.change(
        runtime.engine, runtime.clock(), principal, "policy.create", "policy", body.name
    ) as (session, record):
        detail = policies.create_policy(
            session, body, now=runtime.clock(), created_by=principal.name
        )
        record.update(version=detail.current_version, spec=body.model_dump(mode="json"))
    return _pushed(runtime, detail)


@router.get("", response_model=list[PolicyPublic])
def list_policies(
    principal: ViewerDep, session: SessionDep, include_deleted: Annotated[bool, Query()] = False
) -> list[PolicyPublic]:
    return policies.list_policies(session, include_deleted=include_deleted)


@router.get("/{name}", response_model=PolicyDetail)
def get_policy(name: str, principal: ViewerDep, session: SessionDep) -> PolicyDetail:
    """The policy with every version, oldest first."""
    return policies.get_policy(session, name)


@router.get("/{name}/versions/{version}", response_model=PolicyVersionPublic)
def get_version(
    name: str, version: int, principal: ViewerDep, session: SessionDep
) -> PolicyVersionPublic:
    return policies.get_version(session, name, version)


@router.put("/{name}", response_model=PolicyChanged)
def update_policy(
    name: str, body: PolicySpec, principal: OperatorDep, runtime: RuntimeDep
) -> PolicyChanged:
    """A new version (priority, target, document, enabled replaced whole)."""
    with audit.change(
        runtime.engine, runtime.clock(), principal, "policy.update", "policy", name
    ) as (session, record):
        detail = policies.update_policy(
            session, name, body, now=runtime.clock(), created_by=principal.name
        )
        record.update(version=detail.current_version, spec=body.model_dump(mode="json"))
    return _pushed(runtime, detail)


@router.delete("/{name}", response_model=PolicyChanged)
def delete_policy(name: str, principal: OperatorDep, runtime: RuntimeDep) -> PolicyChanged:
    """A new version in state ``deleted``; the history stays viewable."""
    with audit.change(
        runtime.engine, runtime.clock(), principal, "policy.delete", "policy", name
    ) as (session, record):
        detail = policies.delete_policy(
            session, name, now=runtime.clock(), created_by=principal.name
        )
        record.update(version=detail.current_version)
    return _pushed(runtime, detail)


@devices_router.get("/{device_id}/policy", response_model=EffectivePolicyPublic)
def get_effective_policy(
    device_id: str, principal: ViewerDep, session: SessionDep
) -> EffectivePolicyPublic:
    """The device's effective policy and the policy versions it was merged from."""
    return policies.effective_policy(session, device_id)


@devices_router.get("/{device_id}/labels", response_model=LabelsPublic)
def get_labels(device_id: str, principal: ViewerDep, session: SessionDep) -> LabelsPublic:
    return groups.labels_of(session, device_id)


@devices_router.put("/{device_id}/labels", response_model=LabelsChanged)
def put_labels(
    device_id: str, body: LabelsUpdate, principal: OperatorDep, runtime: RuntimeDep
) -> LabelsChanged:
    """Merge operator labels (``null`` removes one); they win over reported labels."""
    with audit.change(
        runtime.engine, runtime.clock(), principal, "device.set_labels", "device", device_id
    ) as (
        session,
        record,
    ):
        labels = groups.set_labels(session, device_id, body)
        record.update(labels=body.model_dump(mode="json"))
    synced = policies.sync(runtime.bridge, runtime.engine, device_ids=[device_id])
    return LabelsChanged(**labels.model_dump(), devices_updated=synced.updated)


def install(app: FastAPI) -> None:
    """Add the policy, group and device-policy routes and map ``PolicyError``."""
    app.include_router(router)
    app.include_router(groups_api.router)
    app.include_router(devices_router)

    @app.exception_handler(PolicyError)
    async def policy_refused(request: Request, exc: PolicyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "reason": exc.reason}, status_code=exc.status_code)
