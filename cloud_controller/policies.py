"""Operating policies: versioned records, and pushing each device's effective policy.

Every change (create, update, disable, delete) writes a new immutable ``PolicyVersion`` and
moves ``PolicyRow.current_version``; nothing is overwritten, so every version stays
viewable. After the change is committed, ``sync`` recomputes the effective policy of
devices (``targeting``) and, for each device whose desired state does not already hold
exactly that, stores and publishes a new desired generation with the ``PolicySection``
under ``protocol.policy.POLICY_KEY`` (every other key of the desired document is kept).
The bridge signs what it publishes.

A device that no policy targets and whose desired state has no policy section is left
alone (it runs its local settings); once it had one, losing its last policy pushes the
defaults. ``sync`` holds the writer's ``policy_lock`` from reading the fleet to the last
publish, so two concurrent changes cannot publish a stale computation last.

Knows nothing of HTTP; the bridge is reached through the ``DesiredWriter`` seam (the
bridge imports this module to sync a device after its Hello).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud_controller import targeting
from cloud_controller.entities import DeviceDesired
from cloud_controller.errors import (
    DesiredNotPublished,
    DeviceNotFound,
    PolicyConflict,
    PolicyNotFound,
)
from cloud_controller.policy_entities import (
    EffectivePolicyPublic,
    PolicyCreate,
    PolicyDetail,
    PolicyPublic,
    PolicyRow,
    PolicySpec,
    PolicyState,
    PolicyTarget,
    PolicyVersion,
    PolicyVersionPublic,
)
from protocol.policy import POLICY_KEY, PolicySection

logger = logging.getLogger(__name__)


class DesiredWriter(Protocol):
    """What ``sync`` needs of the bridge."""

    policy_lock: threading.Lock

    def amend_desired(
        self, device_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> int: ...


@dataclass
class SyncResult:
    updated: list[str] = field(default_factory=list)
    """Devices given a new desired generation."""
    unpublished: list[str] = field(default_factory=list)
    """Stored but not published (the broker refused; republished on reconnect)."""


# -- versions ------------------------------------------------------------------------------


def _version_public(row: PolicyVersion) -> PolicyVersionPublic:
    return PolicyVersionPublic(
        version=row.version,
        state=PolicyState(row.state),
        priority=row.priority,
        target=PolicyTarget.model_construct(selector=row.selector, groups=list(row.groups)),
        document=row.document,
        description=row.description,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def _versions(session: Session, name: str) -> list[PolicyVersion]:
    return list(
        session.exec(
            select(PolicyVersion)
            .where(col(PolicyVersion.policy_name) == name)
            .order_by(col(PolicyVersion.version))
        ).all()
    )


def _row(session: Session, name: str) -> PolicyRow:
    row = session.get(PolicyRow, name)
    if row is None:
        raise PolicyNotFound(f"policy {name!r} not found")
    return row


def _public(row: PolicyRow, current: PolicyVersion) -> PolicyPublic:
    return PolicyPublic(
        name=row.name,
        state=PolicyState(row.state),
        current_version=row.current_version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        current=_version_public(current),
    )


def get_policy(session: Session, name: str) -> PolicyDetail:
    row = _row(session, name)
    versions = _versions(session, name)
    current = next(v for v in versions if v.version == row.current_version)
    return PolicyDetail(
        **_public(row, current).model_dump(), versions=[_version_public(v) for v in versions]
    )


def get_version(session: Session, name: str, version: int) -> PolicyVersionPublic:
    _row(session, name)
    found = session.exec(
        select(PolicyVersion).where(
            col(PolicyVersion.policy_name) == name, col(PolicyVersion.version) == version
        )
    ).first()
    if found is None:
        raise PolicyNotFound(f"policy {name!r} has no version {version}")
    return _version_public(found)


def list_policies(session: Session, *, include_deleted: bool = False) -> list[PolicyPublic]:
    query = select(PolicyRow, PolicyVersion).join(
        PolicyVersion,
        (col(PolicyRow.name) == col(PolicyVersion.policy_name))
        & (col(PolicyRow.current_version) == col(PolicyVersion.version)),
    )
    if not include_deleted:
        query = query.where(col(PolicyRow.state) != PolicyState.DELETED.value)
    return [_public(row, v) for row, v in session.exec(query.order_by(col(PolicyRow.name))).all()]


def _content(spec: PolicySpec) -> dict[str, Any]:
    """What a version holds, from a request body (the document: only the fields it sets)."""
    return {
        "priority": spec.priority,
        "selector": spec.target.selector,
        "groups": list(spec.target.groups),
        "document": spec.document.model_dump(mode="json", exclude_unset=True),
        "description": spec.description,
    }


def _copied(previous: PolicyVersion) -> dict[str, Any]:
    return {
        "priority": previous.priority,
        "selector": previous.selector,
        "groups": list(previous.groups),
        "document": dict(previous.document),
        "description": previous.description,
    }


def _add_version(
    session: Session,
    row: PolicyRow,
    *,
    state: PolicyState,
    content: dict[str, Any],
    now: datetime,
    created_by: str,
) -> None:
    """Append version ``row.current_version`` and make ``state`` the policy's."""
    session.add(
        PolicyVersion(
            policy_name=row.name,
            version=row.current_version,
            state=state.value,
            created_at=now,
            created_by=created_by,
            **content,
        )
    )
    row.state = state.value
    row.updated_at = now
    session.add(row)


def _state(spec: PolicySpec) -> PolicyState:
    return PolicyState.ACTIVE if spec.enabled else PolicyState.DISABLED


def create_policy(
    session: Session, body: PolicyCreate, *, now: datetime, created_by: str
) -> PolicyDetail:
    """Version 1 of a new policy; ``PolicyConflict`` if the name exists (even deleted)."""
    if session.get(PolicyRow, body.name) is not None:
        raise PolicyConflict(
            f"policy {body.name!r} exists; PUT /api/v1/policies/{body.name} changes it"
        )
    row = PolicyRow(
        name=body.name, current_version=1, state=_state(body).value, created_at=now, updated_at=now
    )
    session.add(row)
    session.flush()  # the parent row before its version (foreign key)
    _add_version(
        session, row, state=_state(body), content=_content(body), now=now, created_by=created_by
    )
    session.commit()
    return get_policy(session, body.name)


def update_policy(
    session: Session, name: str, spec: PolicySpec, *, now: datetime, created_by: str
) -> PolicyDetail:
    """A new version holding ``spec`` (a deleted policy comes back this way)."""
    row = session.exec(
        select(PolicyRow).where(col(PolicyRow.name) == name).with_for_update()
    ).first()
    if row is None:
        raise PolicyNotFound(f"policy {name!r} not found")
    row.current_version += 1
    _add_version(
        session, row, state=_state(spec), content=_content(spec), now=now, created_by=created_by
    )
    session.commit()
    return get_policy(session, name)


def delete_policy(session: Session, name: str, *, now: datetime, created_by: str) -> PolicyDetail:
    """A new version in state ``deleted`` (same content); history is kept."""
    row = session.exec(
        select(PolicyRow).where(col(PolicyRow.name) == name).with_for_update()
    ).first()
    if row is None:
        raise PolicyNotFound(f"policy {name!r} not found")
    previous = next(v for v in _versions(session, name) if v.version == row.current_version)
    if row.state != PolicyState.DELETED.value:
        row.current_version += 1
        _add_version(
            session,
            row,
            state=PolicyState.DELETED,
            content=_copied(previous),
            now=now,
            created_by=created_by,
        )
        session.commit()
    return get_policy(session, name)


# -- effective policy and pushing it -------------------------------------------------------


def section_of(fleet: targeting.Fleet, device_id: str) -> dict[str, Any]:
    """The ``PolicySection`` (wire form) a device should hold."""
    result = fleet.effective_for(device_id)
    return PolicySection(document=result.policy, sources=result.sources).model_dump(mode="json")


def effective_policy(session: Session, device_id: str) -> EffectivePolicyPublic:
    fleet = targeting.read_fleet(session, device_ids=[device_id])
    if device_id not in fleet.labels:
        raise DeviceNotFound(device_id)
    result = fleet.effective_for(device_id)
    desired = session.get(DeviceDesired, device_id)
    wire = PolicySection(document=result.policy, sources=result.sources).model_dump(mode="json")
    return EffectivePolicyPublic(
        device_id=device_id,
        labels=fleet.labels[device_id],
        groups=fleet.groups_of(device_id),
        document=result.policy,
        sources=result.sources,
        conflicts=result.conflicts,
        desired_generation=desired.generation if desired else None,
        pushed=desired is not None and desired.policy.get(POLICY_KEY) == wire,
    )


def sync(
    writer: DesiredWriter, engine: Engine, *, device_ids: Iterable[str] | None = None
) -> SyncResult:
    """Push the effective policy to every device (or ``device_ids``) whose desired state
    differs; returns who was updated. Never raises for one device's trouble."""
    result = SyncResult()
    with writer.policy_lock:
        with Session(engine) as session:
            fleet = targeting.read_fleet(session, device_ids=device_ids)
            query = select(DeviceDesired)
            if device_ids is not None:
                query = query.where(col(DeviceDesired.device_id).in_(sorted(set(device_ids))))
            current = {row.device_id: row.policy for row in session.exec(query).all()}
        for device_id in sorted(fleet.labels):
            had = current.get(device_id, {}).get(POLICY_KEY)
            targeted = any(fleet.targeted(t, device_id) for t in fleet.targets)
            if had is None and not targeted:
                continue
            wanted = section_of(fleet, device_id)
            if had == wanted:
                continue
            try:
                writer.amend_desired(device_id, _setting(wanted))
            except DesiredNotPublished:
                result.unpublished.append(device_id)
            except DeviceNotFound:
                continue
            result.updated.append(device_id)
    if result.updated:
        logger.info(
            "effective policy pushed",
            extra={"devices": len(result.updated), "unpublished": len(result.unpublished)},
        )
    return result


def _setting(section: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def change(current: dict[str, Any]) -> dict[str, Any]:
        return {**current, POLICY_KEY: section}

    return change
