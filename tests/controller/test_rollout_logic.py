"""The pure rules of rollouts: variant choice, wave planning, gate evaluation."""

from __future__ import annotations

import pytest

from cloud_controller.rollouts import (
    Chosen,
    DeviceFacts,
    DeviceSignals,
    GateThresholds,
    NoFit,
    VariantOption,
    VariantRule,
    Verdict,
    WaveConfig,
    choose_variant,
    evaluate_gates,
    interleave,
    plan_waves,
)

MB = 1024 * 1024
OPTIONS = [
    VariantOption("fp32-onnx", "fp32", "onnxruntime", 90 * MB),
    VariantOption("fp16-onnx", "fp16", "onnxruntime", 45 * MB),
    VariantOption("int8-onnx", "int8", "onnxruntime", 23 * MB),
    VariantOption("fp32-torchscript", "fp32", "torch", 90 * MB),
]
RULE = VariantRule(memory_share=0.5, memory_overhead=2.0)


def device(memory_mb: int, *providers: str, hw: str = "jetson-orin-nano") -> DeviceFacts:
    return DeviceFacts("d", hw, memory_mb, tuple(providers) or ("CPUExecutionProvider",))


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (device(8192, "CUDAExecutionProvider"), "fp16-onnx"),  # GPU, fits: FP16
        (device(8192, "TensorrtExecutionProvider", "CPUExecutionProvider"), "fp16-onnx"),
        (device(8192), "int8-onnx"),  # CPU: no FP16, INT8 first
        # GPU, FP16 needs 90 MiB of a 100 MiB * 0.5 budget: does not fit, INT8 does
        (device(100, "CUDAExecutionProvider"), "int8-onnx"),
    ],
)
def test_variant_choice_follows_the_rule(facts: DeviceFacts, expected: str) -> None:
    assert choose_variant(OPTIONS, facts, RULE) == Chosen(expected)


def test_fp32_is_the_last_resort_and_nothing_fitting_is_said() -> None:
    only_fp32 = [o for o in OPTIONS if o.precision == "fp32"]
    assert choose_variant(only_fp32, device(8192), RULE) == Chosen("fp32-onnx")
    tiny = choose_variant(OPTIONS, device(40), RULE)
    assert isinstance(tiny, NoFit) and "no variant fits" in tiny.reason
    torch_only = [OPTIONS[3]]
    assert isinstance(choose_variant(torch_only, device(8192), RULE), NoFit)
    fp16_only = [OPTIONS[1]]
    cpu = choose_variant(fp16_only, device(8192), RULE)
    assert isinstance(cpu, NoFit) and "precision" in cpu.reason


def test_a_pinned_variant_wins_but_must_exist_and_fit() -> None:
    assert choose_variant(OPTIONS, device(8192), RULE, pinned="fp32-onnx") == Chosen("fp32-onnx")
    missing = choose_variant(OPTIONS, device(8192), RULE, pinned="bf16-onnx")
    assert isinstance(missing, NoFit) and "bf16-onnx" in missing.reason
    too_big = choose_variant(OPTIONS, device(100), RULE, pinned="fp32-onnx")
    assert isinstance(too_big, NoFit) and "does not fit" in too_big.reason


def test_memory_rule_knobs_are_honoured() -> None:
    generous = VariantRule(memory_share=1.0, memory_overhead=1.0)
    assert choose_variant(OPTIONS, device(100, "CUDAExecutionProvider"), generous) == Chosen(
        "fp16-onnx"
    )
    facts = DeviceFacts.from_capabilities(
        "x", "hw", {"memory_mb": 2048, "execution_providers": ["CUDAExecutionProvider"]}
    )
    assert facts.fp16_capable and facts.memory_mb == 2048
    assert DeviceFacts.from_capabilities("x", "hw", {}).memory_mb == 0


def test_waves_interleave_classes_and_size_the_canary() -> None:
    devices = [(f"a{i}", "nano") for i in range(6)] + [(f"b{i}", "agx") for i in range(3)]
    order = interleave(devices)
    assert order[:2] == ["b0", "a0"] and sorted(order) == sorted(d for d, _ in devices)
    waves = plan_waves(devices, WaveConfig(canary_share=0.2, wave_size=3))
    assert [len(w) for w in waves] == [2, 3, 3, 1]
    assert {"a0", "b0"} == set(waves[0])  # the canary holds both classes
    assert [d for wave in waves for d in wave] == order


@pytest.mark.parametrize(
    ("n", "share", "minimum", "size", "expected"),
    [
        (10, 0.1, 1, 5, [1, 5, 4]),
        (10, 0.0, 1, 4, [4, 4, 2]),
        (3, 0.1, 2, 10, [2, 1]),
        (2, 0.5, 5, 10, [2]),  # the canary cannot exceed the fleet
        (1, 1.0, 1, 1, [1]),
        (0, 0.1, 1, 5, []),
    ],
)
def test_wave_sizes(n: int, share: float, minimum: int, size: int, expected: list[int]) -> None:
    config = WaveConfig(canary_share=share, canary_min_devices=minimum, wave_size=size)
    waves = plan_waves([(f"d{i:02d}", "hw") for i in range(n)], config)
    assert [len(w) for w in waves] == expected


GOOD = {
    "model_requests": 100.0,
    "model_errors": 0.0,
    "latency_p95_ms": 40.0,
    "offload_ratio": 0.05,
    "quality_samples": 10.0,
    "quality_agreement_mean": 0.999,
    "quality_agreement_min": 0.998,
}


def active(name: str, **changes: float) -> DeviceSignals:
    return DeviceSignals(name, installed=True, install_failed=False, metrics={**GOOD, **changes})


def verdicts(signals: list[DeviceSignals], **thresholds: object) -> dict[str, Verdict]:
    report = evaluate_gates(signals, GateThresholds.model_validate(thresholds))
    return {r.name: r.verdict for r in report.results}


def test_healthy_wave_passes_every_gate() -> None:
    report = evaluate_gates([active("a"), active("b")], GateThresholds())
    assert report.verdict is Verdict.PASS
    assert {r.name for r in report.results} == {
        "install_failures",
        "error_rate",
        "p95_latency",
        "offload_rate",
        "quality_agreement",
        "quality_agreement_floor",
    }
    assert report.summary() == "all gates passed"


@pytest.mark.parametrize(
    ("changes", "gate"),
    [
        ({"model_errors": 5.0}, "error_rate"),
        ({"latency_p95_ms": 5000.0}, "p95_latency"),
        ({"offload_ratio": 0.9}, "offload_rate"),
        ({"quality_agreement_mean": 0.90, "quality_agreement_min": 0.5}, "quality_agreement"),
        ({"quality_agreement_min": 0.5}, "quality_agreement_floor"),
    ],
)
def test_each_gate_fails_on_its_own_metric(changes: dict[str, float], gate: str) -> None:
    report = evaluate_gates([active("a"), active("b", **changes)], GateThresholds())
    assert report.verdict is Verdict.FAIL
    assert gate in {r.name for r in report.failures}
    assert gate in report.summary()


def test_quality_mean_is_weighted_by_samples() -> None:
    few_bad = active("a", quality_samples=1.0, quality_agreement_mean=0.9)
    many_good = active("b", quality_samples=99.0, quality_agreement_mean=0.9999)
    report = evaluate_gates([few_bad, many_good], GateThresholds(min_quality_agreement_floor=None))
    (quality,) = [r for r in report.results if r.name == "quality_agreement"]
    assert quality.value == pytest.approx((0.9 + 99 * 0.9999) / 100)
    # one sample at 0.9 among 99 at 0.9999 passes; an unweighted mean (0.95) would not
    assert quality.verdict is Verdict.PASS


def test_missing_telemetry_is_pending_never_a_pass() -> None:
    silent = DeviceSignals("c", installed=True, install_failed=False, metrics=None)
    report = evaluate_gates([active("a"), silent], GateThresholds())
    assert report.verdict is Verdict.PENDING
    assert "c" in report.summary()
    partial = DeviceSignals("d", installed=True, install_failed=False, metrics={"cpu_percent": 1})
    assert evaluate_gates([partial], GateThresholds()).verdict is Verdict.PENDING


def test_too_few_requests_or_samples_are_pending() -> None:
    assert verdicts([active("a", model_requests=0.0)])["error_rate"] is Verdict.PENDING
    assert (
        verdicts([active("a", model_requests=3.0)], min_requests=5)["error_rate"] is Verdict.PENDING
    )
    few = verdicts([active("a", quality_samples=2.0)])
    assert few["quality_agreement"] is Verdict.PENDING
    assert few["quality_agreement_floor"] is Verdict.PENDING


def test_installs_in_progress_pending_and_failures_fail() -> None:
    installing = DeviceSignals("b", installed=False, install_failed=False)
    assert verdicts([active("a"), installing])["install_failures"] is Verdict.PENDING
    failed = DeviceSignals("b", installed=False, install_failed=True)
    report = evaluate_gates([active("a"), failed], GateThresholds())
    assert report.verdict is Verdict.FAIL and report.failures[0].name == "install_failures"
    tolerant = evaluate_gates([active("a"), failed], GateThresholds(max_install_failure_rate=0.5))
    assert tolerant.verdict is Verdict.PASS
    all_failed = evaluate_gates([failed], GateThresholds(max_install_failure_rate=1.0))
    assert all_failed.verdict is Verdict.PASS  # nothing active to measure, failures allowed


def test_gates_switched_off_are_not_evaluated() -> None:
    off = GateThresholds(
        max_error_rate=None,
        max_p95_latency_ms=None,
        max_offload_rate=None,
        min_quality_agreement=None,
        min_quality_agreement_floor=None,
    )
    silent = DeviceSignals("c", installed=True, install_failed=False, metrics=None)
    report = evaluate_gates([silent], off)
    assert report.verdict is Verdict.PASS
    assert [r.name for r in report.results] == ["install_failures"]
    assert evaluate_gates([], GateThresholds()).verdict is Verdict.PASS
