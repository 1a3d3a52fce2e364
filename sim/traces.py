"""Workload traces: seeded, pure generators of request arrival times, each with an SLO.

A ``Trace`` is the arrival times (seconds from the trace's start, sorted) plus the latency
objective its requests carry and the rate function it was drawn from, so a report can plot
offered load next to what was served. Three shapes:

* ``poisson`` - a homogeneous Poisson process at ``rate_per_s``.
* ``bursts`` - ``base_rate_per_s`` with bursts of ``burst_rate_per_s`` lasting ``burst_s``
  every ``period_s`` (the first one at ``first_burst_s``): flash crowds.
* ``diurnal`` - a sinusoid between ``mean*(1-amplitude)`` and ``mean*(1+amplitude)`` over
  ``period_s`` (a day compressed into a benchmark), starting at the trough.

All are drawn by the same method: a non-homogeneous Poisson process by thinning (draw a
homogeneous process at the peak rate, keep each arrival with probability rate(t)/peak), so
the only source of randomness is ``numpy.random.default_rng(seed)``: the same arguments
give the same trace, on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

RateFn = Callable[[NDArray[np.float64]], NDArray[np.float64]]


class TraceError(ValueError):
    """Arguments that cannot describe a trace; the message says which."""


@dataclass(frozen=True)
class Trace:
    name: str
    arrivals_s: NDArray[np.float64]
    """Arrival times in seconds from the start, sorted ascending, all in [0, duration_s)."""
    duration_s: float
    slo_ms: float
    """The latency objective every request of this trace carries."""
    rate: RateFn = field(repr=False, compare=False)
    """Offered rate in requests/s as a function of time (vectorised)."""
    params: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.arrivals_s.size)

    @property
    def mean_rate_per_s(self) -> float:
        return len(self) / self.duration_s if self.duration_s > 0 else 0.0

    def expected_count(self, start_s: float = 0.0, end_s: float | None = None) -> float:
        """Integral of the rate over [start_s, end_s) (numerically, 1 ms steps)."""
        end = self.duration_s if end_s is None else end_s
        steps = max(1, int((end - start_s) * 1000))
        t = start_s + (np.arange(steps) + 0.5) * (end - start_s) / steps
        return float(self.rate(t).sum() * (end - start_s) / steps)

    def count_between(self, start_s: float, end_s: float) -> int:
        lo, hi = np.searchsorted(self.arrivals_s, [start_s, end_s])
        return int(hi - lo)


def _check(duration_s: float, slo_ms: float, **rates: float) -> None:
    if not duration_s > 0:
        raise TraceError(f"duration_s must be > 0, got {duration_s}")
    if not slo_ms > 0:
        raise TraceError(f"slo_ms must be > 0, got {slo_ms}")
    for name, value in rates.items():
        if not (value >= 0 and math.isfinite(value)):
            raise TraceError(f"{name} must be a finite number >= 0, got {value}")


def _thinned(rate: RateFn, peak_per_s: float, duration_s: float, seed: int) -> NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    if peak_per_s <= 0:
        return np.empty(0, dtype=np.float64)
    count = rng.poisson(peak_per_s * duration_s)
    times = np.sort(rng.uniform(0.0, duration_s, size=count))
    keep = rng.uniform(0.0, 1.0, size=count) < rate(times) / peak_per_s
    return times[keep]


def poisson(rate_per_s: float, *, duration_s: float, slo_ms: float, seed: int = 0) -> Trace:
    _check(duration_s, slo_ms, rate_per_s=rate_per_s)

    def rate(t: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.full_like(t, rate_per_s, dtype=np.float64)

    return Trace(
        "poisson",
        _thinned(rate, rate_per_s, duration_s, seed),
        duration_s,
        slo_ms,
        rate,
        {"rate_per_s": rate_per_s},
    )


def bursts(
    *,
    base_rate_per_s: float,
    burst_rate_per_s: float,
    burst_s: float,
    period_s: float,
    duration_s: float,
    slo_ms: float,
    first_burst_s: float = 0.0,
    seed: int = 0,
) -> Trace:
    _check(duration_s, slo_ms, base_rate_per_s=base_rate_per_s, burst_rate_per_s=burst_rate_per_s)
    if not 0 < burst_s <= period_s:
        raise TraceError(f"need 0 < burst_s <= period_s, got {burst_s} and {period_s}")
    if first_burst_s < 0:
        raise TraceError(f"first_burst_s must be >= 0, got {first_burst_s}")

    def in_burst(t: NDArray[np.float64]) -> NDArray[np.bool_]:
        since = t - first_burst_s
        return (since >= 0) & (np.mod(since, period_s) < burst_s)

    def rate(t: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.where(in_burst(t), burst_rate_per_s, base_rate_per_s).astype(np.float64)

    peak = max(base_rate_per_s, burst_rate_per_s)
    return Trace(
        "bursts",
        _thinned(rate, peak, duration_s, seed),
        duration_s,
        slo_ms,
        rate,
        {
            "base_rate_per_s": base_rate_per_s,
            "burst_rate_per_s": burst_rate_per_s,
            "burst_s": burst_s,
            "period_s": period_s,
            "first_burst_s": first_burst_s,
        },
    )


def burst_windows(trace: Trace) -> list[tuple[float, float]]:
    """The [start, end) of each burst of a ``bursts`` trace, clipped to its duration."""
    if trace.name != "bursts":
        raise TraceError(f"a {trace.name} trace has no bursts")
    p = trace.params
    out: list[tuple[float, float]] = []
    start = p["first_burst_s"]
    while start < trace.duration_s:
        out.append((start, min(start + p["burst_s"], trace.duration_s)))
        start += p["period_s"]
    return out


def diurnal(
    *,
    mean_rate_per_s: float,
    amplitude: float,
    period_s: float,
    duration_s: float,
    slo_ms: float,
    seed: int = 0,
) -> Trace:
    """Rate ``mean * (1 - amplitude * cos(2 pi t / period))``: trough at 0, peak at period/2."""
    _check(duration_s, slo_ms, mean_rate_per_s=mean_rate_per_s)
    if not 0 <= amplitude <= 1:
        raise TraceError(f"amplitude must be in [0, 1], got {amplitude}")
    if not period_s > 0:
        raise TraceError(f"period_s must be > 0, got {period_s}")

    def rate(t: NDArray[np.float64]) -> NDArray[np.float64]:
        return mean_rate_per_s * (1.0 - amplitude * np.cos(2.0 * np.pi * t / period_s))

    return Trace(
        "diurnal",
        _thinned(rate, mean_rate_per_s * (1.0 + amplitude), duration_s, seed),
        duration_s,
        slo_ms,
        rate,
        {"mean_rate_per_s": mean_rate_per_s, "amplitude": amplitude, "period_s": period_s},
    )
