"""Rollouts, the pure part: which variant a device gets, how devices are cut into waves, and
whether a wave's telemetry lets the rollout go on.

Nothing here touches the database, MQTT or a clock; ``rollout_engine`` feeds these
functions what it read and persists what they decide, so every rule is unit-tested on
plain values.

Variant choice (``choose_variant``), per device:

1. Only ``onnxruntime`` variants of the version are candidates (the agent serves ONNX).
2. A variant *fits* when ``size_bytes * memory_overhead`` is at most ``memory_share`` of
   the memory the device announced (``capabilities.memory_mb``): weights, the runtime's
   arena and activations must all live in that budget, next to everything else the
   device runs.
3. Preference by precision: ``fp16`` first where the device supports it (it announced a
   GPU execution provider: CUDA or TensorRT; FP16 on a CPU is slower than FP32), then
   ``int8``, then ``fp32``. The first preferred precision with a fitting variant wins;
   so FP16 where supported and it fits, else INT8, else FP32 as the last resort.
4. An explicit ``pinned`` variant for the device's hardware class wins over the rule (it
   must still exist and fit). No fitting variant: the device is skipped, with the reason.

Waves (``plan_waves``): devices are interleaved by hardware class (round robin over the
classes, ids sorted within a class), so the canary holds every class when it can. The
canary is ``max(canary_min_devices, ceil(canary_share * n))`` devices (none when
``canary_share`` is 0); the rest follow ``wave_size`` at a time.

Gates (``evaluate_gates``): every gate gives ``pass``, ``fail`` or ``pending`` (not yet
evaluable: a device has sent no telemetry since it activated the new version, a metric
is missing, or too few requests/quality samples). The wave passes only when every gate
passes; it fails as soon as one gate fails; otherwise it is pending. Missing data is
never a pass. A threshold of ``None`` switches its gate off.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import (
    MODEL_ERRORS_METRIC,
    MODEL_REQUESTS_METRIC,
    QUALITY_AGREEMENT_MEAN_METRIC,
    QUALITY_AGREEMENT_MIN_METRIC,
    QUALITY_SAMPLES_METRIC,
)

GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})
"""Execution providers that make FP16 worth serving."""
ONNX_RUNTIME = "onnxruntime"
LATENCY_P95_METRIC = "latency_p95_ms"
OFFLOAD_RATIO_METRIC = "offload_ratio"


# -- configuration (the rollout request's parts) ----------------------------------------


class WaveConfig(BaseModel):
    """How devices are cut into waves and how long each wave is watched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    canary_share: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of the target devices in the first wave (the canary); 0: no canary."""
    canary_min_devices: int = Field(default=1, ge=1)
    """The canary holds at least this many devices (when there are that many)."""
    wave_size: int = Field(default=10, ge=1)
    """Devices per wave after the canary."""
    interval_s: float = Field(default=60.0, ge=0.0)
    """Observation time, once every device of a wave has installed, before its gates are
    evaluated."""
    install_timeout_s: float = Field(default=600.0, gt=0.0)
    """Seconds a device may take to report the new version active; later counts as an
    install failure (and, while rolling back, as unconfirmed)."""
    gate_timeout_s: float = Field(default=600.0, gt=0.0)
    """Seconds after the observation time the gates may stay not evaluable before the
    rollout pauses for an operator."""


class GateThresholds(BaseModel):
    """Limits the telemetry of a wave's devices must keep; ``None`` switches a gate off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_error_rate: float | None = Field(default=0.02, ge=0.0, le=1.0)
    """Errors / requests served since the new version went active, all wave devices."""
    min_requests: int = Field(default=1, ge=0)
    """Requests needed before the error rate counts as evaluable."""
    max_p95_latency_ms: float | None = Field(default=1000.0, gt=0.0)
    """Highest ``latency_p95_ms`` any wave device may report."""
    max_offload_rate: float | None = Field(default=0.5, ge=0.0, le=1.0)
    """Highest ``offload_ratio`` any wave device may report."""
    max_install_failure_rate: float | None = Field(default=0.0, ge=0.0, le=1.0)
    """Failed (or timed out) installs / devices of the wave."""
    min_quality_agreement: float | None = Field(default=0.99, ge=-1.0, le=1.0)
    """Lowest mean cosine between edge answers and the cloud's FP32 answers."""
    min_quality_agreement_floor: float | None = Field(default=0.95, ge=-1.0, le=1.0)
    """Lowest single sampled cosine."""
    min_quality_samples: int = Field(default=3, ge=1)
    """Quality samples (all wave devices) needed before quality counts as evaluable."""


class GateAction(StrEnum):
    """What a failing gate does."""

    ROLLBACK = "rollback"
    PAUSE = "pause"


# -- variant choice ---------------------------------------------------------------------


@dataclass(frozen=True)
class VariantOption:
    variant: str
    precision: str
    runtime: str
    size_bytes: int


@dataclass(frozen=True)
class DeviceFacts:
    device_id: str
    hardware_class: str
    memory_mb: int
    execution_providers: tuple[str, ...] = ()

    @classmethod
    def from_capabilities(
        cls, device_id: str, hardware_class: str, capabilities: Mapping[str, Any]
    ) -> DeviceFacts:
        memory = capabilities.get("memory_mb")
        providers = capabilities.get("execution_providers") or []
        return cls(
            device_id=device_id,
            hardware_class=hardware_class,
            memory_mb=int(memory) if isinstance(memory, int | float) else 0,
            execution_providers=tuple(str(p) for p in providers),
        )

    @property
    def fp16_capable(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.execution_providers)


@dataclass(frozen=True)
class VariantRule:
    """The knobs of the fit test (controller settings)."""

    memory_share: float = 0.5
    memory_overhead: float = 2.0


@dataclass(frozen=True)
class Chosen:
    variant: str


@dataclass(frozen=True)
class NoFit:
    reason: str


def fits(option: VariantOption, device: DeviceFacts, rule: VariantRule) -> bool:
    budget = device.memory_mb * 1024 * 1024 * rule.memory_share
    return option.size_bytes * rule.memory_overhead <= budget


def precision_order(device: DeviceFacts) -> tuple[str, ...]:
    return ("fp16", "int8", "fp32") if device.fp16_capable else ("int8", "fp32")


def choose_variant(
    options: Sequence[VariantOption],
    device: DeviceFacts,
    rule: VariantRule,
    *,
    pinned: str | None = None,
) -> Chosen | NoFit:
    """The variant ``device`` should run (module docstring, "Variant choice")."""
    onnx = [o for o in options if o.runtime == ONNX_RUNTIME]
    if pinned is not None:
        match = next((o for o in onnx if o.variant == pinned), None)
        if match is None:
            return NoFit(f"pinned variant {pinned!r} is not an ONNX variant of this version")
        if not fits(match, device, rule):
            return NoFit(f"pinned variant {pinned!r} does not fit {device.memory_mb} MiB")
        return Chosen(match.variant)
    if not onnx:
        return NoFit("the version has no ONNX variant")
    for precision in precision_order(device):
        fitting = sorted(
            (o for o in onnx if o.precision == precision and fits(o, device, rule)),
            key=lambda o: (o.size_bytes, o.variant),
        )
        if fitting:
            return Chosen(fitting[0].variant)
    usable = [o for o in onnx if o.precision in precision_order(device)]
    if not usable:
        return NoFit(f"no variant in a precision {device.hardware_class} runs")
    smallest = min(usable, key=lambda o: o.size_bytes)
    return NoFit(
        f"no variant fits: the smallest ({smallest.variant}, {smallest.size_bytes} bytes) "
        f"needs more than {rule.memory_share:.0%} of {device.memory_mb} MiB"
    )


# -- wave planning ----------------------------------------------------------------------


def interleave(devices: Iterable[tuple[str, str]]) -> list[str]:
    """``(device_id, hardware_class)`` pairs in round-robin order over the classes."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for device_id, hardware_class in devices:
        by_class[hardware_class].append(device_id)
    queues = [sorted(ids) for _, ids in sorted(by_class.items())]
    ordered: list[str] = []
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    return ordered


def plan_waves(devices: Iterable[tuple[str, str]], config: WaveConfig) -> list[list[str]]:
    """Device ids per wave; the first is the canary when ``canary_share`` > 0."""
    ordered = interleave(devices)
    if not ordered:
        return []
    waves: list[list[str]] = []
    rest = ordered
    if config.canary_share > 0:
        size = max(config.canary_min_devices, math.ceil(config.canary_share * len(ordered)))
        waves.append(ordered[:size])
        rest = ordered[size:]
    for start in range(0, len(rest), config.wave_size):
        waves.append(rest[start : start + config.wave_size])
    return waves


# -- gates ------------------------------------------------------------------------------


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    PENDING = "pending"


@dataclass(frozen=True)
class DeviceSignals:
    """What one device of a wave shows: its install outcome and, once active, its latest
    telemetry sample received after it activated the new version (None: none yet)."""

    device_id: str
    installed: bool
    """Reported the new version active."""
    install_failed: bool
    """Reported a failed install, or timed out."""
    metrics: Mapping[str, float] | None = None


@dataclass(frozen=True)
class GateResult:
    name: str
    verdict: Verdict
    value: float | None
    threshold: float | None
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict.value,
            "value": self.value,
            "threshold": self.threshold,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class GateReport:
    verdict: Verdict
    results: list[GateResult] = field(default_factory=list)

    @property
    def failures(self) -> list[GateResult]:
        return [r for r in self.results if r.verdict is Verdict.FAIL]

    def summary(self) -> str:
        failing = self.failures or [r for r in self.results if r.verdict is Verdict.PENDING]
        return "; ".join(f"{r.name}: {r.detail}" for r in failing) or "all gates passed"


def _missing(active: Sequence[DeviceSignals], *names: str) -> list[str]:
    return [
        d.device_id for d in active if d.metrics is None or any(n not in d.metrics for n in names)
    ]


def _pending(name: str, threshold: float | None, detail: str) -> GateResult:
    return GateResult(name, Verdict.PENDING, None, threshold, detail)


def _compare(
    name: str, value: float, threshold: float, *, upper: bool, unit: str = ""
) -> GateResult:
    ok = value <= threshold if upper else value >= threshold
    op = "at most" if upper else "at least"
    detail = f"{value:.4g}{unit} (must be {op} {threshold:.4g}{unit})"
    return GateResult(name, Verdict.PASS if ok else Verdict.FAIL, value, threshold, detail)


def _install_gate(devices: Sequence[DeviceSignals], t: GateThresholds) -> GateResult | None:
    if t.max_install_failure_rate is None:
        return None
    failed = sum(1 for d in devices if d.install_failed)
    if failed == 0 and any(not d.installed for d in devices):
        return _pending("install_failures", t.max_install_failure_rate, "installs in progress")
    rate = failed / len(devices) if devices else 0.0
    result = _compare("install_failures", rate, t.max_install_failure_rate, upper=True)
    return GateResult(
        result.name,
        result.verdict,
        rate,
        result.threshold,
        f"{failed}/{len(devices)} failed ({result.detail})",
    )


def _error_gate(active: Sequence[DeviceSignals], t: GateThresholds) -> GateResult | None:
    if t.max_error_rate is None:
        return None
    missing = _missing(active, MODEL_REQUESTS_METRIC, MODEL_ERRORS_METRIC)
    if missing:
        return _pending("error_rate", t.max_error_rate, f"no telemetry yet from {missing}")
    requests = sum(d.metrics[MODEL_REQUESTS_METRIC] for d in active if d.metrics)
    errors = sum(d.metrics[MODEL_ERRORS_METRIC] for d in active if d.metrics)
    if requests < max(1, t.min_requests):
        return _pending(
            "error_rate", t.max_error_rate, f"{requests:.0f} requests, need {t.min_requests}"
        )
    return _compare("error_rate", errors / requests, t.max_error_rate, upper=True)


def _max_gate(
    active: Sequence[DeviceSignals], name: str, metric: str, threshold: float | None, unit: str
) -> GateResult | None:
    if threshold is None:
        return None
    missing = _missing(active, metric)
    if missing:
        return _pending(name, threshold, f"no {metric} yet from {missing}")
    value = max(d.metrics[metric] for d in active if d.metrics)
    return _compare(name, value, threshold, upper=True, unit=unit)


def _quality_gates(active: Sequence[DeviceSignals], t: GateThresholds) -> list[GateResult]:
    wanted = [
        ("quality_agreement", t.min_quality_agreement),
        ("quality_agreement_floor", t.min_quality_agreement_floor),
    ]
    wanted = [(n, th) for n, th in wanted if th is not None]
    if not wanted:
        return []
    missing = _missing(active, QUALITY_SAMPLES_METRIC)
    samples = sum(
        d.metrics.get(QUALITY_SAMPLES_METRIC, 0.0) for d in active if d.metrics is not None
    )
    if missing or samples < t.min_quality_samples:
        why = (
            f"no quality telemetry yet from {missing}"
            if missing
            else f"{samples:.0f} quality samples, need {t.min_quality_samples}"
        )
        return [_pending(name, th, why) for name, th in wanted]
    sampled = [d.metrics for d in active if d.metrics and d.metrics[QUALITY_SAMPLES_METRIC] > 0]
    mean = (
        sum(m[QUALITY_AGREEMENT_MEAN_METRIC] * m[QUALITY_SAMPLES_METRIC] for m in sampled) / samples
    )
    floor = min(m[QUALITY_AGREEMENT_MIN_METRIC] for m in sampled)
    results = []
    for name, threshold in wanted:
        assert threshold is not None
        value = mean if name == "quality_agreement" else floor
        results.append(_compare(name, value, threshold, upper=False))
    return results


def evaluate_gates(devices: Sequence[DeviceSignals], thresholds: GateThresholds) -> GateReport:
    """One wave's verdict (module docstring, "Gates")."""
    if not devices:
        return GateReport(Verdict.PASS, [])
    active = [d for d in devices if d.installed]
    results: list[GateResult] = []
    install = _install_gate(devices, thresholds)
    if install is not None:
        results.append(install)
    if active:
        for gate in (
            _error_gate(active, thresholds),
            _max_gate(
                active, "p95_latency", LATENCY_P95_METRIC, thresholds.max_p95_latency_ms, " ms"
            ),
            _max_gate(
                active, "offload_rate", OFFLOAD_RATIO_METRIC, thresholds.max_offload_rate, ""
            ),
        ):
            if gate is not None:
                results.append(gate)
        results.extend(_quality_gates(active, thresholds))
    elif any(not d.install_failed for d in devices):
        results.append(_pending("telemetry", None, "no device has activated the new version"))
    verdicts = {r.verdict for r in results}
    if Verdict.FAIL in verdicts:
        return GateReport(Verdict.FAIL, results)
    if Verdict.PENDING in verdicts:
        return GateReport(Verdict.PENDING, results)
    return GateReport(Verdict.PASS, results)
