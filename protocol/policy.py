"""The operating policy: the typed document the controller manages and the agent obeys.

A ``Policy`` says how a device serves (offload SLO and thresholds, batching), which model
variants it prefers per hardware class and how often it sends telemetry. Every field has
bounds and a unit in its name; unknown fields are rejected (``extra="forbid"``), so a typo
is a 422 at the REST API, never a silently ignored setting. Defaults equal the agent's
own ``EdgeSettings`` defaults, so a device under the default policy behaves as before.

Policies stored by the controller carry *partial* documents: only the fields they set
(``Policy.model_validate(doc).model_dump(exclude_unset=True)``). A partial must be valid
over the defaults (cross-field rules such as ``min_batch_size <= max_batch_size`` are
checked against the default values of the fields it leaves out). The effective document
of a device is the defaults overlaid with the partials of the policies that target it,
in ascending priority, by ``deep_merge`` (``effective``): objects merge key by key, any
other value (numbers, strings, lists such as a variant preference) is replaced whole. An
overlay whose result breaks a cross-field rule is skipped and named in ``conflicts``.

The desired state carries the effective document under ``POLICY_KEY`` as a
``PolicySection`` (the document plus which policy versions contributed). This module knows
neither side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

POLICY_KEY = "operating_policy"
"""The key of ``DesiredState.policy`` that holds the ``PolicySection``."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Policy, group, variant and hardware-class names: one token, 1-64 characters."""

VariantName = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OffloadPolicy(_Section):
    """When the agent sends work to the cloud pool (``edge_agent.offload``)."""

    enabled: bool = True
    """Offload at all (only while the pool says it is accepting)."""
    slo_ms: float = Field(default=250.0, gt=0, le=600_000)
    """Latency objective, ms, of a request without its own deadline."""
    enter_ratio: float = Field(default=1.0, gt=0, le=100)
    """Start overflowing when the predicted local queue wait >= this x ``slo_ms``."""
    exit_ratio: float = Field(default=0.6, gt=0, le=100)
    """Stop overflowing when the predicted local queue wait <= this x ``slo_ms``."""
    rate_per_s: float = Field(default=50.0, ge=0, le=1_000_000)
    """Offloaded requests per second at most (token bucket refill)."""
    burst_requests: int = Field(default=20, ge=1, le=1_000_000)
    """Offloads allowed back to back before the rate cap bites (token bucket size)."""
    quality_sample_share: float = Field(default=0.0, ge=0, le=1)
    """Share of requests sent to the cloud to measure edge/cloud quality agreement
    (picked by request id); for rollouts, 0 = none."""

    @model_validator(mode="after")
    def _hysteresis(self) -> OffloadPolicy:
        if self.exit_ratio > self.enter_ratio:
            raise ValueError(
                f"exit_ratio ({self.exit_ratio}) must be <= enter_ratio ({self.enter_ratio})"
            )
        return self


class BatchingPolicy(_Section):
    """How the agent's dynamic batcher groups requests (``spillway.batching``)."""

    max_batch_size: int = Field(default=32, ge=1, le=1024)
    """Most texts in one model call (the adaptive limit's ceiling)."""
    min_batch_size: int = Field(default=1, ge=1, le=1024)
    """Where the adaptive batch limit starts and the least it shrinks to."""
    max_queue_delay_ms: float = Field(default=2.0, ge=0, le=10_000)
    """How long, ms, the oldest queued request waits for others to fill its batch."""
    max_queue_items: int = Field(default=1024, ge=1, le=1_000_000)
    """Texts waiting beyond this are rejected at once (``overloaded``)."""
    latency_budget_ms: float = Field(default=150.0, gt=0, le=600_000)
    """Per-batch model latency, ms, the adaptive batch limit keeps under."""

    @model_validator(mode="after")
    def _bounds(self) -> BatchingPolicy:
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(
                f"min_batch_size ({self.min_batch_size}) must be <= "
                f"max_batch_size ({self.max_batch_size})"
            )
        return self


class TelemetryPolicy(_Section):
    """How often the agent samples and sends telemetry."""

    interval_s: float = Field(default=10.0, ge=0.1, le=86_400)
    """Seconds between telemetry samples."""


class Policy(_Section):
    """One complete operating policy (every field has a default)."""

    offload: OffloadPolicy = Field(default_factory=OffloadPolicy)
    batching: BatchingPolicy = Field(default_factory=BatchingPolicy)
    telemetry: TelemetryPolicy = Field(default_factory=TelemetryPolicy)
    variant_preference: dict[
        Annotated[str, Field(pattern=NAME_PATTERN)],
        Annotated[list[VariantName], Field(min_length=1, max_length=16)],
    ] = Field(default_factory=dict, max_length=64)
    """Hardware class (``jetson-orin-nano``...) -> variant names, most preferred first; a
    class not listed has no preference. For whoever assigns variants (rollouts)."""

    @model_validator(mode="after")
    def _unique_variants(self) -> Policy:
        for hardware_class, variants in self.variant_preference.items():
            if len(set(variants)) != len(variants):
                raise ValueError(f"variant_preference[{hardware_class!r}] lists a variant twice")
        return self

    def variants_for(self, hardware_class: str) -> list[str]:
        """The preferred variants of one hardware class, best first ([] = no preference)."""
        return list(self.variant_preference.get(hardware_class, []))


def partial(document: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a partial document; return only what it sets (raises ``ValidationError``)."""
    return Policy.model_validate(document).model_dump(mode="json", exclude_unset=True)


def defaults() -> dict[str, Any]:
    """The complete default document."""
    return Policy().model_dump(mode="json")


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` on top: objects merge key by key, anything else is replaced."""
    merged: dict[str, Any] = dict(base)
    for key, value in overlay.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


class PolicySource(BaseModel):
    """One policy version that contributed to an effective document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    priority: int


@dataclass(frozen=True)
class Overlay:
    """A policy version's partial document, as ``effective`` takes it."""

    name: str
    version: int
    priority: int
    document: Mapping[str, Any]


@dataclass(frozen=True)
class Effective:
    """The merge result: the document, who contributed, and overlays that were skipped."""

    policy: Policy
    sources: list[PolicySource] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)
    """Skipped overlay (``name@version``) -> why its result was invalid."""


def effective(overlays: Iterable[Overlay]) -> Effective:
    """Defaults overlaid by ``overlays`` in ascending (priority, name) order.

    Pure. An overlay whose merged result fails validation (a cross-field rule with what
    lower-priority overlays set) is skipped and reported in ``conflicts``.
    """
    document = defaults()
    policy = Policy()
    sources: list[PolicySource] = []
    conflicts: dict[str, str] = {}
    for overlay in sorted(overlays, key=lambda o: (o.priority, o.name)):
        candidate = deep_merge(document, overlay.document)
        try:
            policy = Policy.model_validate(candidate)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            conflicts[f"{overlay.name}@{overlay.version}"] = f"{where}: {error['msg']}".strip(": ")
            continue
        document = candidate
        sources.append(
            PolicySource(name=overlay.name, version=overlay.version, priority=overlay.priority)
        )
    return Effective(policy=policy, sources=sources, conflicts=conflicts)


class PolicySection(BaseModel):
    """What ``DesiredState.policy[POLICY_KEY]`` holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    document: Policy
    sources: list[PolicySource] = Field(default_factory=list, max_length=256)
    """Policy versions merged into ``document``, in merge order ([] = the defaults)."""
