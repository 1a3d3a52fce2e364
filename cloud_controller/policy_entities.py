"""Records of operating policies, device groups and operator-set labels.

Same families as ``entities`` (``table=True`` rows, ``*Create``/``*Update`` inputs,
``*Public`` outputs), kept apart because they are a concern of their own:

* ``policies`` - one row per policy name: which version is current and its state.
* ``policy_versions`` - immutable: every change of a policy (document, priority, target,
  state) is a new row; old ones stay viewable.
* ``device_groups`` - named sets of devices: explicit ids and/or a label selector.
* ``operator_labels`` - labels the operator sets on a device; merged over the labels the
  device reports (the operator's value wins for a key both set).

The schema is owned by migration ``0005``. This module knows nothing of MQTT or HTTP.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import ConfigDict, field_validator, model_validator
from sqlmodel import Field, SQLModel

from cloud_controller.entities import BigId, UtcDateTime
from protocol.policy import NAME_PATTERN, Policy, PolicySource

MAX_SELECTOR = 16
"""Most ``key=value`` pairs in one label selector."""
MAX_GROUP_DEVICES = 10_000
"""Most explicit device ids in one group."""

Selector = dict[str, str]
"""Label selector: every ``key: value`` pair must match (``{}`` matches every device)."""


def _check_selector(selector: Selector | None) -> None:
    if selector is None:
        return
    if len(selector) > MAX_SELECTOR:
        raise ValueError(f"a selector has at most {MAX_SELECTOR} labels, got {len(selector)}")
    for key, value in selector.items():
        if not key or len(key) > 64 or len(value) > 256:
            raise ValueError(f"selector label {key!r}: key must be 1-64 and value <= 256 chars")


def _check_name(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(
            f"{value!r}: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return value


class PolicyState(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    """Kept, but targets nothing until enabled again."""
    DELETED = "deleted"
    """Deleted by the operator; history kept, a ``PUT`` brings it back."""


# -- policies ----------------------------------------------------------------------------


class PolicyTarget(SQLModel):
    """Which devices a policy applies to: the union of ``selector`` matches and the members
    of ``groups``. At least one of them must be given; ``selector: {}`` is every device."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    selector: Selector | None = None
    groups: list[str] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _some_target(self) -> PolicyTarget:
        _check_selector(self.selector)
        for name in self.groups:
            _check_name(name)
        if self.selector is None and not self.groups:
            raise ValueError("a policy targets a label selector, groups, or both")
        return self


class PolicySpec(SQLModel):
    """Body of ``PUT /api/v1/policies/{name}``: everything a version holds, replaced whole."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    priority: int = Field(default=0, ge=-10_000, le=10_000)
    """Higher wins: merged later over lower priorities (ties: by name)."""
    target: PolicyTarget
    document: Policy
    """A partial policy: only the fields given are kept and merged."""
    description: str = Field(default="", max_length=2000)
    enabled: bool = True


class PolicyCreate(PolicySpec):
    """Body of ``POST /api/v1/policies``."""

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)


class PolicyRow(SQLModel, table=True):
    """One policy: its name and its current version."""

    __tablename__ = "policies"

    name: str = Field(primary_key=True, max_length=64)
    current_version: int
    state: str = Field(sa_type=sa.String(16), index=True)
    created_at: datetime = Field(sa_type=UtcDateTime)
    updated_at: datetime = Field(sa_type=UtcDateTime)


class PolicyVersion(SQLModel, table=True):
    """One immutable version of a policy."""

    __tablename__ = "policy_versions"
    __table_args__ = (
        sa.UniqueConstraint("policy_name", "version", name="uq_policy_versions_name_version"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    policy_name: str = Field(max_length=64, foreign_key="policies.name", ondelete="CASCADE")
    version: int
    state: str = Field(sa_type=sa.String(16))
    priority: int
    selector: dict[str, str] | None = Field(default=None, sa_type=sa.JSON)
    groups: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    document: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    """The partial document, only the fields it sets."""
    description: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(sa_type=UtcDateTime)
    created_by: str = Field(max_length=128)
    """Who made this version; ``operator`` until the API authenticates callers."""


class PolicyVersionPublic(SQLModel):
    version: int
    state: PolicyState
    priority: int
    target: PolicyTarget
    document: dict[str, Any]
    description: str
    created_at: datetime
    created_by: str


class PolicyPublic(SQLModel):
    name: str
    state: PolicyState
    current_version: int
    created_at: datetime
    updated_at: datetime
    current: PolicyVersionPublic


class PolicyDetail(PolicyPublic):
    versions: list[PolicyVersionPublic]
    """Every version, oldest first."""


# -- groups ---------------------------------------------------------------------------------


class GroupSpec(SQLModel):
    """Body of ``PUT /api/v1/groups/{name}``: members are explicit ids and/or a selector."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    description: str = Field(default="", max_length=2000)
    device_ids: list[str] = Field(default_factory=list, max_length=MAX_GROUP_DEVICES)
    selector: Selector | None = None
    """None: explicit members only; ``{}``: every device."""

    @model_validator(mode="after")
    def _check(self) -> GroupSpec:
        _check_selector(self.selector)
        if len(set(self.device_ids)) != len(self.device_ids):
            raise ValueError("device_ids lists a device twice")
        return self


class GroupCreate(GroupSpec):
    """Body of ``POST /api/v1/groups``."""

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)


class DeviceGroup(SQLModel, table=True):
    __tablename__ = "device_groups"

    name: str = Field(primary_key=True, max_length=64)
    description: str = Field(sa_type=sa.Text)
    device_ids: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    selector: dict[str, str] | None = Field(default=None, sa_type=sa.JSON)
    created_at: datetime = Field(sa_type=UtcDateTime)
    updated_at: datetime = Field(sa_type=UtcDateTime)


class GroupPublic(SQLModel):
    name: str
    description: str
    device_ids: list[str]
    selector: Selector | None
    members: list[str]
    """Registered devices in the group now (explicit ids that are registered, plus
    selector matches), sorted."""
    created_at: datetime
    updated_at: datetime


# -- labels -----------------------------------------------------------------------------------


class OperatorLabel(SQLModel, table=True):
    """A ``key=value`` label the operator set on a device; wins over a reported one."""

    __tablename__ = "operator_labels"

    device_id: str = Field(
        primary_key=True, max_length=64, foreign_key="devices.id", ondelete="CASCADE"
    )
    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(sa_type=sa.Text)


class LabelsUpdate(SQLModel):
    """Body of ``PUT /api/v1/devices/{id}/labels``: merged into the operator's labels;
    a ``null`` value removes that operator label (the reported one, if any, shows again)."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    labels: dict[str, str | None]

    @model_validator(mode="after")
    def _bounded(self) -> LabelsUpdate:
        if len(self.labels) > 64:
            raise ValueError(f"at most 64 labels, got {len(self.labels)}")
        for key, value in self.labels.items():
            if not key or len(key) > 64 or (value is not None and len(value) > 256):
                raise ValueError(f"label {key!r}: key must be 1-64 and value <= 256 chars")
        return self


class LabelsPublic(SQLModel):
    device_id: str
    reported: dict[str, str]
    """What the device announced in its Hello, plus ``hardware_class``."""
    operator: dict[str, str]
    effective: dict[str, str]
    """``reported`` overlaid by ``operator``: what selectors match against."""


# -- the effective policy of a device --------------------------------------------------------


class EffectivePolicyPublic(SQLModel):
    device_id: str
    labels: dict[str, str]
    groups: list[str]
    """Groups the device is a member of."""
    document: Policy
    sources: list[PolicySource]
    """Policy versions merged, lowest priority first ([] = the defaults)."""
    conflicts: dict[str, str]
    """Matching versions skipped because their merged result was invalid."""
    desired_generation: int | None
    """The device's current desired generation (None: it has none yet)."""
    pushed: bool
    """Whether the device's desired state holds exactly this effective policy."""


# -- answers to changes ----------------------------------------------------------------------


class _Pushed(SQLModel):
    devices_updated: list[str] = Field(default_factory=list)
    """Devices given a new desired generation by this change (their effective policy
    changed); a device whose effective policy is unchanged gets none."""


class PolicyChanged(PolicyDetail, _Pushed):
    pass


class GroupChanged(GroupPublic, _Pushed):
    pass


class LabelsChanged(LabelsPublic, _Pushed):
    pass
