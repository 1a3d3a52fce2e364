"""REST v1 for device groups: create, list, read (with resolved members), replace, delete.

A change re-pushes the effective policy of every device it may affect (``policies.sync``).
"""

from __future__ import annotations

from fastapi import APIRouter

from cloud_controller import audit, groups, policies
from cloud_controller.auth import OperatorDep, ViewerDep
from cloud_controller.deps import RuntimeDep, SessionDep
from cloud_controller.policy_entities import GroupChanged, GroupCreate, GroupPublic, GroupSpec
from cloud_controller.runtime import Runtime

router = APIRouter(prefix="/api/v1/groups", tags=["groups"])


def _pushed(runtime: Runtime, group: GroupPublic) -> GroupChanged:
    synced = policies.sync(runtime.bridge, runtime.engine)
    return GroupChanged(**group.model_dump(), devices_updated=synced.updated)


@router.post("", response_model=GroupChanged, status_code=201)
def create_group(body: GroupCreate, principal: OperatorDep, runtime: RuntimeDep) -> GroupChanged:
    with audit.change(
        runtime.engine, runtime.clock(), principal, "group.create", "group", body.name
    ) as (session, record):
        group = groups.create_group(session, body, now=runtime.clock())
        record.update(group=body.model_dump(mode="json"))
    return _pushed(runtime, group)


@router.get("", response_model=list[GroupPublic])
def list_groups(principal: ViewerDep, session: SessionDep) -> list[GroupPublic]:
    return groups.list_groups(session)


@router.get("/{name}", response_model=GroupPublic)
def get_group(name: str, principal: ViewerDep, session: SessionDep) -> GroupPublic:
    return groups.get_group(session, name)


@router.put("/{name}", response_model=GroupChanged)
def update_group(
    name: str, body: GroupSpec, principal: OperatorDep, runtime: RuntimeDep
) -> GroupChanged:
    with audit.change(
        runtime.engine, runtime.clock(), principal, "group.update", "group", name
    ) as (session, record):
        group = groups.update_group(session, name, body, now=runtime.clock())
        record.update(group=body.model_dump(mode="json"))
    return _pushed(runtime, group)


@router.delete("/{name}", status_code=204)
def delete_group(name: str, principal: OperatorDep, runtime: RuntimeDep) -> None:
    with audit.change(
        runtime.engine, runtime.clock(), principal, "group.delete", "group", name
    ) as (session, _):
        groups.delete_group(session, name)
    policies.sync(runtime.bridge, runtime.engine)
