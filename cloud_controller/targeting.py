"""Which devices a policy or group targets, and each device's effective policy.

``Fleet`` is a snapshot read from the database in a handful of queries (devices with their
reported and operator labels, groups, the current version of every active policy); the
rest is pure: ``matches`` (label selectors), ``members`` (groups), ``effective_for``
(``protocol.policy.effective`` over the policies that target a device).

Targeting rules, in one place:

* A device's labels are what it reported in its Hello plus ``hardware_class``, overlaid by
  the labels the operator set (``PUT /api/v1/devices/{id}/labels``): the operator wins.
* A selector matches when every ``key: value`` pair equals the device's label; ``{}``
  matches every device; ``None`` matches none.
* A group's members are its explicit device ids (those registered) plus its selector's
  matches.
* An active policy targets the union of its selector's matches and its groups' members.

This module knows nothing of MQTT or HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from cloud_controller.entities import Device
from cloud_controller.policy_entities import (
    DeviceGroup,
    OperatorLabel,
    PolicyRow,
    PolicyState,
    PolicyVersion,
)
from protocol.policy import Effective, Overlay, effective


def matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return False
    return all(labels.get(key) == value for key, value in selector.items())


def merge_labels(
    reported: Mapping[str, str], hardware_class: str, operator: Mapping[str, str]
) -> dict[str, str]:
    """Reported labels plus ``hardware_class``, overlaid by the operator's (which win)."""
    return {**reported, "hardware_class": hardware_class, **operator}


def members(
    device_ids: Iterable[str],
    selector: Mapping[str, str] | None,
    labels: Mapping[str, Mapping[str, str]],
) -> set[str]:
    """Registered devices in a group: explicit ids known to ``labels`` plus selector matches."""
    found = {device_id for device_id in device_ids if device_id in labels}
    found.update(d for d, device_labels in labels.items() if matches(selector, device_labels))
    return found


@dataclass(frozen=True)
class Target:
    """One active policy's current version, as targeting needs it."""

    overlay: Overlay
    selector: dict[str, str] | None
    groups: tuple[str, ...]


@dataclass
class Fleet:
    """Everything targeting needs, read at one moment."""

    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    """Device id -> effective labels (every registered device is a key)."""
    operator: dict[str, dict[str, str]] = field(default_factory=dict)
    reported: dict[str, dict[str, str]] = field(default_factory=dict)
    groups: dict[str, set[str]] = field(default_factory=dict)
    """Group name -> members."""
    targets: list[Target] = field(default_factory=list)

    def groups_of(self, device_id: str) -> list[str]:
        return sorted(name for name, found in self.groups.items() if device_id in found)

    def targeted(self, target: Target, device_id: str) -> bool:
        if matches(target.selector, self.labels.get(device_id, {})):
            return True
        return any(device_id in self.groups.get(name, ()) for name in target.groups)

    def effective_for(self, device_id: str) -> Effective:
        return effective(t.overlay for t in self.targets if self.targeted(t, device_id))


def read_fleet(session: Session, *, device_ids: Iterable[str] | None = None) -> Fleet:
    """Snapshot of the fleet (or only of ``device_ids``; groups' members are then limited to
    them too, which is all ``effective_for`` of those devices needs)."""
    query = select(Device)
    only = None if device_ids is None else sorted(set(device_ids))
    if only is not None:
        query = query.where(col(Device.id).in_(only))
    fleet = Fleet()
    for device in session.exec(query).all():
        fleet.reported[device.id] = {**device.labels, "hardware_class": device.hardware_class}
        fleet.operator[device.id] = {}
    label_query = select(OperatorLabel)
    if only is not None:
        label_query = label_query.where(col(OperatorLabel.device_id).in_(only))
    for label in session.exec(label_query).all():
        if label.device_id in fleet.operator:
            fleet.operator[label.device_id][label.key] = label.value
    fleet.labels = {
        device_id: {**reported, **fleet.operator[device_id]}
        for device_id, reported in fleet.reported.items()
    }
    for group in session.exec(select(DeviceGroup)).all():
        fleet.groups[group.name] = members(group.device_ids, group.selector, fleet.labels)
    rows = session.exec(
        select(PolicyVersion)
        .join(
            PolicyRow,
            (col(PolicyRow.name) == col(PolicyVersion.policy_name))
            & (col(PolicyRow.current_version) == col(PolicyVersion.version)),
        )
        .where(col(PolicyRow.state) == PolicyState.ACTIVE.value)
    ).all()
    for version in rows:
        fleet.targets.append(
            Target(
                overlay=Overlay(
                    name=version.policy_name,
                    version=version.version,
                    priority=version.priority,
                    document=version.document,
                ),
                selector=version.selector,
                groups=tuple(version.groups),
            )
        )
    return fleet
