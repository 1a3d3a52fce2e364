"""Device groups and operator-set labels: the records policies target.

A group is a name for a set of devices: explicit device ids and/or a label selector (its
members are resolved when read, so a device that registers later with matching labels is a
member at once). Operator labels are set per device and win over the device's reported
labels of the same key (``targeting.merge_labels``). Changing either may change which
policies target a device, so the API runs ``policies.sync`` after each change.

Knows nothing of HTTP or MQTT.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, delete, select

from cloud_controller import targeting
from cloud_controller.entities import Device
from cloud_controller.errors import DeviceNotFound, GroupNotFound, PolicyConflict
from cloud_controller.policy_entities import (
    DeviceGroup,
    GroupCreate,
    GroupPublic,
    GroupSpec,
    LabelsPublic,
    LabelsUpdate,
    OperatorLabel,
)


def _public(group: DeviceGroup, fleet: targeting.Fleet) -> GroupPublic:
    return GroupPublic(
        name=group.name,
        description=group.description,
        device_ids=list(group.device_ids),
        selector=group.selector,
        members=sorted(targeting.members(group.device_ids, group.selector, fleet.labels)),
        created_at=group.created_at,
        updated_at=group.updated_at,
    )


def _group(session: Session, name: str) -> DeviceGroup:
    group = session.get(DeviceGroup, name)
    if group is None:
        raise GroupNotFound(name)
    return group


def list_groups(session: Session) -> list[GroupPublic]:
    fleet = targeting.read_fleet(session)
    rows = session.exec(select(DeviceGroup).order_by(col(DeviceGroup.name))).all()
    return [_public(group, fleet) for group in rows]


def get_group(session: Session, name: str) -> GroupPublic:
    group = _group(session, name)
    return _public(group, targeting.read_fleet(session))


def create_group(session: Session, body: GroupCreate, *, now: datetime) -> GroupPublic:
    if session.get(DeviceGroup, body.name) is not None:
        raise PolicyConflict(f"device group {body.name!r} exists")
    session.add(
        DeviceGroup(
            name=body.name,
            description=body.description,
            device_ids=list(body.device_ids),
            selector=body.selector,
            created_at=now,
            updated_at=now,
        )
    )
    session.commit()
    return get_group(session, body.name)


def update_group(session: Session, name: str, spec: GroupSpec, *, now: datetime) -> GroupPublic:
    """Replace the group's description and membership rules."""
    group = _group(session, name)
    group.description = spec.description
    group.device_ids = list(spec.device_ids)
    group.selector = spec.selector
    group.updated_at = now
    session.add(group)
    session.commit()
    return get_group(session, name)


def delete_group(session: Session, name: str) -> None:
    """Policies naming the group keep its name and simply match nobody through it."""
    session.delete(_group(session, name))
    session.commit()


# -- labels ---------------------------------------------------------------------------------


def labels_of(session: Session, device_id: str) -> LabelsPublic:
    fleet = targeting.read_fleet(session, device_ids=[device_id])
    if device_id not in fleet.labels:
        raise DeviceNotFound(device_id)
    return LabelsPublic(
        device_id=device_id,
        reported=fleet.reported[device_id],
        operator=fleet.operator[device_id],
        effective=fleet.labels[device_id],
    )


def set_labels(session: Session, device_id: str, update: LabelsUpdate) -> LabelsPublic:
    """Merge ``update`` into the device's operator labels (``None`` removes a key)."""
    if session.get(Device, device_id) is None:
        raise DeviceNotFound(device_id)
    for key, value in update.labels.items():
        session.exec(
            delete(OperatorLabel).where(
                col(OperatorLabel.device_id) == device_id, col(OperatorLabel.key) == key
            )
        )
        if value is not None:
            session.add(OperatorLabel(device_id=device_id, key=key, value=value))
    session.commit()
    return labels_of(session, device_id)
