"""The service-time model: calibration kept in the run's output, interpolation, scaling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sim.profiles import profile_named
from sim.servicetime import (
    Calibration,
    CalibrationError,
    ServiceTimeModel,
    SimulatedModel,
    calibrate,
    load,
    load_or_calibrate,
    measure_int8,
    save,
)

MODELS = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))


def _calibration(batch_ms: dict[int, float]) -> Calibration:
    return Calibration(
        batch_ms=batch_ms,
        variant="int8-onnx",
        intra_op_threads=1,
        machine="test",
        measured_at="2026-01-01T00:00:00+00:00",
        repeats=1,
    )


def test_interpolates_between_and_extrapolates_beyond_measured_sizes() -> None:
    model = ServiceTimeModel(_calibration({1: 4.0, 8: 18.0, 32: 66.0}), speed=1.0)
    assert model.batch_ms(1) == 4.0
    assert model.batch_ms(8) == 18.0
    assert model.batch_ms(20) == pytest.approx(18.0 + 12 * (48.0 / 24))
    assert model.batch_ms(64) == pytest.approx(66.0 + 32 * 2.0)
    assert model.batch_ms(0) == 0.0
    assert model.capacity_per_s(32) == pytest.approx(32 * 1000 / 66.0)


def test_a_faster_profile_takes_proportionally_less_time() -> None:
    cal = _calibration({1: 5.0, 16: 40.0})
    nano = ServiceTimeModel.for_profile(cal, profile_named("jetson-orin-nano"))
    agx = ServiceTimeModel.for_profile(cal, profile_named("jetson-agx-orin"))
    ratio = (
        profile_named("jetson-agx-orin").relative_speed
        / profile_named("jetson-orin-nano").relative_speed
    )
    assert nano.batch_ms(16) / agx.batch_ms(16) == pytest.approx(ratio)
    half = ServiceTimeModel.for_profile(cal, profile_named("jetson-orin-nano"), scale=0.5)
    assert half.batch_ms(16) == pytest.approx(2 * nano.batch_ms(16))
    with pytest.raises(CalibrationError):
        ServiceTimeModel(cal, speed=0)


def test_simulated_model_sleeps_the_modelled_time_and_says_it_is_simulated() -> None:
    slept: list[float] = []
    service = ServiceTimeModel(_calibration({1: 2.0, 4: 6.0}), speed=2.0)
    sim = SimulatedModel(service, label="jetson-orin-nano", sleep=slept.append)
    rows = sim.embed(["a", "b", "c", "d"])
    assert rows.shape == (4, 384)
    assert slept == [pytest.approx(0.003)]
    served = sim.serving_model()
    assert served.device == "simulated jetson-orin-nano"
    assert (sim.batches, sim.items) == (1, 4)


def test_calibrate_measures_every_batch_size_with_the_given_embed() -> None:
    seen: list[int] = []

    def embed(texts: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
        seen.append(len(texts))
        return np.zeros((len(texts), 1), dtype=np.float32)

    cal = calibrate(embed, [f"t{i}" for i in range(100)], variant="x", intra_op_threads=1,
                    batch_sizes=(1, 4, 16), repeats=3)  # fmt: skip
    assert sorted(cal.batch_ms) == [1, 4, 16]
    assert all(v >= 0 for v in cal.batch_ms.values())
    assert sorted(seen[1:]) == [1, 1, 1, 4, 4, 4, 16, 16, 16]  # after one warm-up batch
    with pytest.raises(CalibrationError):
        calibrate(embed, [], variant="x", intra_op_threads=1)


def test_cached_calibration_is_reused_and_bad_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    calls: list[int] = []

    def measure() -> Calibration:
        calls.append(1)
        return _calibration({1: 3.0, 8: 12.0})

    first, reused = load_or_calibrate(path, measure)
    assert not reused and path.is_file()
    again, reused = load_or_calibrate(path, measure)
    assert reused and again == first and calls == [1]
    save(first, tmp_path / "copy.json")
    assert load(tmp_path / "copy.json").batch_ms == {1: 3.0, 8: 12.0}
    (tmp_path / "bad.json").write_text('{"batch_ms": 3}')
    with pytest.raises(CalibrationError):
        load(tmp_path / "bad.json")


def test_real_int8_calibration(tmp_path: Path) -> None:
    if not (MODELS / "int8-onnx" / "manifest.json").is_file():
        pytest.skip(f"no built int8-onnx in {MODELS}")
    cal = measure_int8(MODELS, threads=1, repeats=2)
    assert sorted(cal.batch_ms) == [1, 2, 4, 8, 16, 32]
    assert all(ms > 0 for ms in cal.batch_ms.values())
    assert cal.variant == "int8-onnx" and cal.intra_op_threads == 1
    with pytest.raises(CalibrationError, match="no built int8-onnx"):
        measure_int8(tmp_path)
