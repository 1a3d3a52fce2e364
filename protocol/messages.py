"""Versioned payloads: one pydantic model per message kind.

Every message carries the envelope fields (``schema_version``, ``message_id``,
``sent_at``, ``device_id``). A receiver accepts the versions in
``SUPPORTED_VERSIONS``; unknown fields are ignored so a newer sender can add optional
fields without breaking an older receiver (a breaking change bumps ``SCHEMA_VERSION``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})


def _message_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Fields every Spillway message carries."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = SCHEMA_VERSION
    message_id: str = Field(default_factory=_message_id, min_length=1, max_length=64)
    sent_at: datetime = Field(default_factory=utc_now)
    device_id: str = Field(min_length=1, max_length=64)


class RuntimeCapabilities(BaseModel):
    """What a device can run."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    execution_providers: list[str] = Field(default_factory=list, max_length=16)
    memory_mb: int = Field(ge=0)
    cpu_count: int = Field(ge=1)
    onnxruntime_version: str | None = None


class Hello(Envelope):
    """An agent announces itself after every (re)connect."""

    kind: Literal["hello"] = "hello"
    hardware_class: str = Field(min_length=1, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    agent_version: str = Field(min_length=1, max_length=32)
    capabilities: RuntimeCapabilities
    boot_epoch: int = Field(ge=0, description="Increments on every agent start.")
    keepalive_s: int = Field(ge=1, description="MQTT keepalive the agent connected with.")


class DeviceStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Presence(Envelope):
    """Retained presence; the offline form is also the agent's Last Will."""

    kind: Literal["status"] = "status"
    status: DeviceStatus
    boot_epoch: int = Field(ge=0)
    reason: Literal["connected", "shutdown", "lost"] = "connected"


class Heartbeat(Envelope):
    kind: Literal["heartbeat"] = "heartbeat"
    seq: int = Field(ge=0)
    uptime_s: float = Field(ge=0)
    boot_epoch: int = Field(ge=0)


class Telemetry(Envelope):
    """Periodic measurements; ``metrics`` names carry their unit (``cpu_percent``)."""

    kind: Literal["telemetry"] = "telemetry"
    boot_epoch: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=256)


class ModelAssignment(BaseModel):
    """Which model variant a device should run; lives under ``DesiredState.policy["model"]``.

    The agent verifies ``manifest`` (a signed manifest, ``models.verify``) and pulls the
    artifact and the tokenizer by digest from the chunk server.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    variant: str = Field(min_length=1, max_length=64)
    artifact_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    manifest: dict[str, Any]


MODEL_POLICY_KEY = "model"
"""The policy key a ``ModelAssignment`` is stored under."""


class DesiredState(Envelope):
    """What the cloud wants a device to run. Generations only ever grow.

    ``key_id`` and ``signature`` are the controller's Ed25519 signature over
    (``device_id``, ``generation``, ``policy``) (``protocol.signing``); an agent that
    requires signatures drops a message without them.
    """

    kind: Literal["desired"] = "desired"
    generation: int = Field(ge=1)
    policy: dict[str, Any] = Field(default_factory=dict)
    key_id: str | None = Field(default=None, max_length=64)
    """Id of the signing key (sha256 of the raw public key, first 16 hex digits)."""
    signature: str | None = Field(default=None, max_length=256)
    """Base64 Ed25519 signature of ``protocol.signing.signed_bytes``."""


class ApplyOutcome(StrEnum):
    APPLIED = "applied"
    FAILED = "failed"


class ReportedState(Envelope):
    """What the agent actually runs, and which desired generation it has seen."""

    kind: Literal["reported"] = "reported"
    observed_generation: int = Field(ge=0)
    outcome: ApplyOutcome
    policy: dict[str, Any] = Field(default_factory=dict)
    error: str | None = Field(default=None, max_length=2000)
    boot_epoch: int = Field(ge=0)
