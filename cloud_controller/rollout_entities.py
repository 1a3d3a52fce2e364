"""The rollouts' records: a rollout, its waves and its devices (migration ``0006``).

Everything the engine needs to go on after a controller restart is here: the plan (each
device's wave and variant, fixed at start), where each wave is (``WaveState`` and the
times its clocks started), what each device was running before (``previous``, the
``model`` section of its desired policy, re-assigned on rollback) and the desired
generation each step was published as. Tables, the API's ``*Public`` views and the
request body live together, as in ``entities``. Knows nothing of MQTT or HTTP.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import ConfigDict
from sqlmodel import Field, SQLModel

from cloud_controller.entities import BigId, UtcDateTime
from cloud_controller.rollouts import GateAction, GateThresholds, WaveConfig


class RolloutState(StrEnum):
    """``pending -> running -> completed``; ``running <-> paused``; a failing gate or an
    abort goes through ``rolling_back`` to ``rolled_back`` or ``aborted``."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


ACTIVE_STATES = frozenset(
    {RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK}
)
"""Not finished: its devices are not free for another rollout."""


class WaveState(StrEnum):
    PENDING = "pending"
    INSTALLING = "installing"
    """Assigned; waiting for every device to report active or failed."""
    OBSERVING = "observing"
    """Installed; gates evaluated once ``interval_s`` has passed."""
    PASSED = "passed"
    FAILED = "failed"
    OVERRIDDEN = "overridden"
    """Failed or stalled gates, resumed by an operator."""


class RolloutDeviceState(StrEnum):
    PENDING = "pending"
    ASSIGNING = "assigning"
    """Previous assignment recorded; the new one is being published."""
    INSTALLING = "installing"
    ACTIVE = "active"
    FAILED = "failed"
    SKIPPED = "skipped"
    """No variant fits it; never assigned."""
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_UNCONFIRMED = "rollback_unconfirmed"
    """Previous assignment published, but the device never confirmed it in time."""


UPDATED_STATES = frozenset(
    {
        RolloutDeviceState.ASSIGNING,
        RolloutDeviceState.INSTALLING,
        RolloutDeviceState.ACTIVE,
        RolloutDeviceState.FAILED,
    }
)
"""States of a device whose desired state names the new version: a rollback covers them."""


class Rollout(SQLModel, table=True):
    __tablename__ = "rollouts"
    __table_args__ = (sa.Index("ix_rollouts_state", "state"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    model_name: str = Field(max_length=128)
    version: str = Field(max_length=64)
    state: RolloutState = Field(sa_type=sa.String(16))
    target: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    waves_config: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    gates: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    on_gate_failure: GateAction = Field(sa_type=sa.String(16))
    quality_sample_share: float
    current_wave: int = Field(default=-1)
    """Index of the wave in hand; -1 before the first."""
    final_state: RolloutState | None = Field(default=None, sa_type=sa.String(16))
    """Where ``rolling_back`` ends: ``rolled_back`` (gate) or ``aborted`` (operator)."""
    reason: str | None = Field(default=None, sa_type=sa.Text)
    """Why it paused, rolled back or was aborted."""
    created_at: datetime = Field(sa_type=UtcDateTime)
    updated_at: datetime = Field(sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class RolloutWave(SQLModel, table=True):
    __tablename__ = "rollout_waves"

    rollout_id: int = Field(
        primary_key=True, sa_type=BigId, foreign_key="rollouts.id", ondelete="CASCADE"
    )
    index: int = Field(primary_key=True)
    canary: bool
    state: WaveState = Field(sa_type=sa.String(16))
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    settled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    """Every device reported active or failed (or timed out): observation starts."""
    evaluated_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    gate_verdict: str | None = Field(default=None, max_length=16)
    gate_results: list[dict[str, Any]] = Field(default_factory=list, sa_type=sa.JSON)


class RolloutDevice(SQLModel, table=True):
    __tablename__ = "rollout_devices"
    __table_args__ = (sa.Index("ix_rollout_devices_device_id", "device_id"),)

    rollout_id: int = Field(
        primary_key=True, sa_type=BigId, foreign_key="rollouts.id", ondelete="CASCADE"
    )
    device_id: str = Field(primary_key=True, max_length=64)
    wave: int
    hardware_class: str = Field(max_length=64)
    variant: str | None = Field(default=None, max_length=64)
    artifact_sha256: str | None = Field(default=None, max_length=64)
    state: RolloutDeviceState = Field(sa_type=sa.String(24))
    previous: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    """The ``model`` section of its desired policy before the rollout (None: none)."""
    generation: int | None = Field(default=None, sa_type=sa.BigInteger)
    """Desired generation of the last assignment (new version, or the rollback)."""
    activated_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    reason: str | None = Field(default=None, sa_type=sa.Text)
    updated_at: datetime = Field(sa_type=UtcDateTime)


# -- API ------------------------------------------------------------------------------------


class RolloutTarget(SQLModel):
    """Which devices: all conditions given must hold (labels AND classes AND ids)."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    labels: dict[str, str] = Field(default_factory=dict)
    device_ids: list[str] = Field(default_factory=list, max_length=10_000)
    hardware_classes: list[str] = Field(default_factory=list, max_length=64)


class RolloutCreate(SQLModel):
    """Body of ``POST /api/v1/rollouts``."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    target: RolloutTarget = Field(default_factory=RolloutTarget)
    waves: WaveConfig = Field(default_factory=WaveConfig)
    gates: GateThresholds = Field(default_factory=GateThresholds)
    on_gate_failure: GateAction = GateAction.ROLLBACK
    quality_sample_share: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of locally served requests the updated devices also send to the cloud pool
    to compare (``protocol.messages.QualityProbe``)."""
    variants: dict[str, str] = Field(default_factory=dict)
    """Pinned variant per hardware class; other classes follow the rule."""


class RolloutDevicePublic(SQLModel):
    device_id: str
    wave: int
    hardware_class: str
    variant: str | None
    state: RolloutDeviceState
    previous_version: str | None
    previous_variant: str | None
    generation: int | None
    activated_at: datetime | None
    reason: str | None


class RolloutWavePublic(SQLModel):
    index: int
    canary: bool
    state: WaveState
    devices: int
    started_at: datetime | None
    settled_at: datetime | None
    evaluated_at: datetime | None
    gate_verdict: str | None
    gate_results: list[dict[str, Any]]


class RolloutSummary(SQLModel):
    id: int
    model: str
    version: str
    state: RolloutState
    current_wave: int
    waves_total: int
    devices_total: int
    devices_done: int
    """Active on the new version (or rolled back, while rolling back)."""
    reason: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class RolloutPublic(RolloutSummary):
    target: dict[str, Any]
    waves_config: dict[str, Any]
    gates: dict[str, Any]
    on_gate_failure: GateAction
    quality_sample_share: float
    waves: list[RolloutWavePublic]
    devices: list[RolloutDevicePublic]


class RolloutPage(SQLModel):
    items: list[RolloutSummary]
    total: int
    page: int
    page_size: int
