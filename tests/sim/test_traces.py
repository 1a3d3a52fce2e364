"""Trace generators: rates and statistics on large samples, determinism by seed."""

from __future__ import annotations

import numpy as np
import pytest

from sim.traces import TraceError, burst_windows, bursts, diurnal, poisson


def test_poisson_rate_and_exponential_gaps() -> None:
    trace = poisson(200.0, duration_s=500.0, slo_ms=100.0, seed=1)
    assert trace.slo_ms == 100.0
    assert len(trace) == pytest.approx(100_000, rel=0.02)
    gaps = np.diff(trace.arrivals_s)
    assert gaps.mean() == pytest.approx(1 / 200.0, rel=0.02)
    # Exponential gaps: standard deviation equals the mean, P(gap > mean) = 1/e.
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.03)
    assert (gaps > gaps.mean()).mean() == pytest.approx(np.exp(-1), abs=0.01)
    assert np.all(np.diff(trace.arrivals_s) >= 0)
    assert trace.arrivals_s.min() >= 0 and trace.arrivals_s.max() < 500.0


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    a = bursts(
        base_rate_per_s=5,
        burst_rate_per_s=50,
        burst_s=2,
        period_s=10,
        duration_s=60,
        slo_ms=250,
        seed=7,
    )
    b = bursts(
        base_rate_per_s=5,
        burst_rate_per_s=50,
        burst_s=2,
        period_s=10,
        duration_s=60,
        slo_ms=250,
        seed=7,
    )
    c = bursts(
        base_rate_per_s=5,
        burst_rate_per_s=50,
        burst_s=2,
        period_s=10,
        duration_s=60,
        slo_ms=250,
        seed=8,
    )
    np.testing.assert_array_equal(a.arrivals_s, b.arrivals_s)
    assert len(a) != len(c) or not np.array_equal(a.arrivals_s, c.arrivals_s)
    d1 = diurnal(mean_rate_per_s=20, amplitude=0.5, period_s=30, duration_s=60, slo_ms=1, seed=3)
    d2 = diurnal(mean_rate_per_s=20, amplitude=0.5, period_s=30, duration_s=60, slo_ms=1, seed=3)
    np.testing.assert_array_equal(d1.arrivals_s, d2.arrivals_s)


def test_bursts_have_their_rates_inside_and_outside_the_windows() -> None:
    trace = bursts(
        base_rate_per_s=20,
        burst_rate_per_s=300,
        burst_s=5,
        period_s=20,
        first_burst_s=5,
        duration_s=2000,
        slo_ms=500,
        seed=2,
    )
    windows = burst_windows(trace)
    assert windows[0] == (5, 10) and windows[1] == (25, 30) and len(windows) == 100
    inside = sum(trace.count_between(s, e) for s, e in windows)
    burst_time = sum(e - s for s, e in windows)
    outside = len(trace) - inside
    assert inside / burst_time == pytest.approx(300, rel=0.02)
    assert outside / (trace.duration_s - burst_time) == pytest.approx(20, rel=0.02)
    assert len(trace) == pytest.approx(trace.expected_count(), rel=0.02)


def test_diurnal_follows_its_sinusoid() -> None:
    trace = diurnal(
        mean_rate_per_s=100, amplitude=0.8, period_s=100, duration_s=5000, slo_ms=300, seed=4
    )
    assert trace.mean_rate_per_s == pytest.approx(100, rel=0.02)
    phase = np.mod(trace.arrivals_s, 100.0)
    trough = ((phase < 10) | (phase >= 90)).sum()  # around t = 0 mod period
    peak = ((phase >= 40) & (phase < 60)).sum()  # around t = period / 2
    expected_trough = trace.expected_count(0, 10) + trace.expected_count(90, 100)
    expected_peak = trace.expected_count(40, 60)
    periods = 50
    assert trough == pytest.approx(expected_trough * periods, rel=0.05)
    assert peak == pytest.approx(expected_peak * periods, rel=0.03)
    assert peak > 5 * trough  # 1.8x the mean at the peak vs about 0.2x at the trough


def test_a_zero_rate_gives_an_empty_trace() -> None:
    assert len(poisson(0.0, duration_s=10, slo_ms=10)) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: poisson(-1, duration_s=10, slo_ms=10),
        lambda: poisson(1, duration_s=0, slo_ms=10),
        lambda: poisson(1, duration_s=10, slo_ms=0),
        lambda: bursts(
            base_rate_per_s=1, burst_rate_per_s=2, burst_s=5, period_s=2, duration_s=10, slo_ms=1
        ),
        lambda: diurnal(mean_rate_per_s=1, amplitude=2, period_s=1, duration_s=1, slo_ms=1),
        lambda: burst_windows(poisson(1, duration_s=1, slo_ms=1)),
    ],
)
def test_bad_arguments_say_what_is_wrong(make: object) -> None:
    with pytest.raises(TraceError):
        make()  # type: ignore[operator]
