"""Pure parts of the overflow and fleet benchmarks: summaries, metrics parsing, slopes."""

from __future__ import annotations

import pytest

from sim.bench_fleet import backlog_grows, backlog_slope, backlog_trend, parse_metrics
from sim.bench_overflow import Served, summarize


def test_summarize_counts_goodput_within_the_slo_and_the_offload_ratio() -> None:
    served = [
        Served(arrival_s=0.5, latency_ms=100, status="ok", tier="edge"),
        Served(arrival_s=1.5, latency_ms=400, status="ok", tier="cloud"),
        Served(arrival_s=2.5, latency_ms=900, status="ok", tier="edge"),  # late
        Served(arrival_s=3.5, latency_ms=50, status="deadline_exceeded", tier="edge"),
    ]
    row = summarize(served, slo_ms=500, duration_s=4.0, window=(1.0, 3.0))
    assert (row["requests"], row["ok"], row["within_slo"]) == (4, 3, 2)
    assert row["goodput_per_s"] == pytest.approx(2 / 4.0)
    assert row["burst_goodput_per_s"] == pytest.approx(1 / 2.0)  # arrivals in [1, 3): one good
    assert row["throughput_per_s"] == pytest.approx(3 / 4.0)
    assert row["slo_attainment"] == pytest.approx(0.5)
    assert row["offload_ratio"] == pytest.approx(1 / 3)
    assert row["p50_ms"] == pytest.approx(400)


def test_summarize_with_nothing_answered() -> None:
    row = summarize(
        [Served(0.0, 1.0, "overloaded", "edge")], slo_ms=10, duration_s=1, window=(0, 1)
    )
    assert row["goodput_per_s"] == 0.0 and row["offload_ratio"] == 0.0


def test_parse_metrics_reads_gauges_and_labelled_counters() -> None:
    text = "\n".join(
        [
            "# HELP spillway_ingest_pending Accepted MQTT messages waiting.",
            "# TYPE spillway_ingest_pending gauge",
            "spillway_ingest_pending 12.0",
            'spillway_mqtt_messages_total{channel="heartbeat"} 1500.0',
            'spillway_mqtt_messages_total{channel="telemetry"} 1.5e3',
        ]
    )
    metrics = parse_metrics(text)
    assert metrics["spillway_ingest_pending"] == 12.0
    assert metrics['spillway_mqtt_messages_total{channel="telemetry"}'] == 1500.0


def test_backlog_slope() -> None:
    assert backlog_slope([0, 1, 2, 3], [0, 10, 20, 30]) == pytest.approx(10.0)
    assert backlog_slope([0, 1, 2, 3], [5, 5, 5, 5]) == pytest.approx(0.0, abs=1e-9)
    assert backlog_slope([0], [3]) == 0.0


def test_a_backlog_grows_only_with_a_clear_upward_trend() -> None:
    steady_rise = backlog_trend([0, 1, 2, 3, 4, 5], [0, 5, 10, 15, 20, 25])
    assert steady_rise[0] == pytest.approx(5.0) and steady_rise[1] == pytest.approx(0.0)
    assert backlog_grows(*steady_rise)
    wobble = backlog_trend([0, 1, 2, 3, 4, 5], [20, 80, 10, 90, 30, 95])
    assert wobble[0] > 1.0 and not backlog_grows(*wobble)  # noise, not a trend
    assert not backlog_grows(*backlog_trend([0, 1, 2, 3], [40, 40, 40, 40]))
