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

from protocol.policy import POLICY_KEY

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


# -- quality probe ------------------------------------------------------------------------

QUALITY_SAMPLE_SHARE_KEY = "quality_sample_share"
"""Top-level policy key of the quality probe's share (``QualityProbe``)."""


class QualityProbe(BaseModel):
    """How much locally served traffic the edge also sends to the cloud pool to compare.

    The share is the larger of the desired policy's top-level ``quality_sample_share`` key
    (set by a rollout on the devices it updates) and the operating policy's
    ``offload.quality_sample_share`` (``protocol.policy``, set by operators fleet-wide);
    each 0..1, absent or invalid: 0, no probing. For that share of requests answered
    locally, the agent sends the same texts to the cloud pool after answering (never on
    the request's path) and records the cosine between its embedding and the pool's FP32
    one. Telemetry then carries ``quality_agreement_mean``, ``quality_agreement_min`` and
    ``quality_samples`` (over the samples since the serving model last changed), and
    ``model_requests`` / ``model_errors`` (requests answered, and answered with status
    ``error``, over the same span) for the rollouts' gates.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    quality_sample_share: float = Field(default=0.0, ge=0.0, le=1.0)

    @classmethod
    def from_policy(cls, policy: dict[str, Any]) -> QualityProbe:
        """The probe a desired policy asks for; a missing or out-of-range share is 0."""
        operating = policy.get(POLICY_KEY)
        document = operating.get("document") if isinstance(operating, dict) else None
        offload = document.get("offload") if isinstance(document, dict) else None
        if not isinstance(offload, dict):
            offload = {}
        shares = [policy.get(QUALITY_SAMPLE_SHARE_KEY), offload.get(QUALITY_SAMPLE_SHARE_KEY)]
        best = cls()
        for share in shares:
            try:
                probe = cls.model_validate({QUALITY_SAMPLE_SHARE_KEY: share or 0.0})
            except ValueError:
                continue
            if probe.quality_sample_share > best.quality_sample_share:
                best = probe
        return best


QUALITY_AGREEMENT_MEAN_METRIC = "quality_agreement_mean"
"""Telemetry: mean cosine edge vs. cloud FP32 over the samples since the model changed."""
QUALITY_AGREEMENT_MIN_METRIC = "quality_agreement_min"
"""Telemetry: lowest cosine over the same samples (1.0 when there are none)."""
QUALITY_SAMPLES_METRIC = "quality_samples"
"""Telemetry: texts compared since the serving model last changed."""
MODEL_REQUESTS_METRIC = "model_requests"
"""Telemetry: requests answered since the serving model last changed."""
MODEL_ERRORS_METRIC = "model_errors"
"""Telemetry: of those, answered with status ``error``."""
