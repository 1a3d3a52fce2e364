"""REST v1 for device groups: create, list, read (with resolved members), replace, delete.

A change re-pushes the effective policy of every device it may affect (``policies.sync``).
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlmodel import Session

from cloud_controller import groups, policies
from cloud_controller.deps import RuntimeDep, SessionDep
from cloud_controller.policy_entities import GroupChanged, GroupCreate, GroupPublic, GroupSpec
from cloud_controller.runtime import Runtime

router = APIRouter(prefix="/api/v1/groups", tags=["groups"])


def _pushed(runtime: Runtime, group: GroupPublic) -> GroupChanged:
    synced = policies.sync(runtime.bridge, runtime.engine)
    return GroupChanged(**group.model_dump(), devices_updated=synced.updated)


@router.post("", response_model=GroupChanged, status_code=201)
def create_group(body: GroupCreate, runtime: RuntimeDep) -> GroupChanged:
    with Session(runtime.engine) as session:
        group = groups.create_group(session, body, now=runtime.clock())
    return _pushed(runtime, group)


@router.get("", response_model=list[GroupPublic])
def list_groups(session: SessionDep) -> list[GroupPublic]:
    return groups.list_groups(session)


@router.get("/{name}", response_model=GroupPublic)
def get_group(name: str, session: SessionDep) -> GroupPublic:
    return groups.get_group(session, name)


@router.put("/{name}", response_model=GroupChanged)
def update_group(name: str, body: GroupSpec, runtime: RuntimeDep) -> GroupChanged:
    with Session(runtime.engine) as session:
        group = groups.update_group(session, name, body, now=runtime.clock())
    return _pushed(runtime, group)


@router.delete("/{name}", status_code=204)
def delete_group(name: str, runtime: RuntimeDep) -> None:
    with Session(runtime.engine) as session:
        groups.delete_group(session, name)
    policies.sync(runtime.bridge, runtime.engine)
