"""``spillway bench rollout``'s report: per-round ratios, their median against the target."""

from __future__ import annotations

from typing import Any

from sim.bench_rollout import TARGET_RATIO, fill_report
from sim.report import BenchReport


def _round(raw: float, receiver: float, downloaded: float, active: float) -> dict[str, Any]:
    return {
        "raw_fanout_s": raw,
        "raw_receiver_s": receiver,
        "delivery_downloaded_s": downloaded,
        "delivery_active_s": active,
        "ratio_downloaded": downloaded / raw,
        "ratio_active": active / raw,
        "ratio_downloaded_vs_receiver": downloaded / receiver,
        "counts": {"controller_chunk_publishes": 64, "assign_s": 0.2},
    }


def test_the_median_round_ratio_is_judged_against_the_target() -> None:
    report = BenchReport("rollout", "t")
    rounds = [_round(2.0, 3.0, 4.0, 7.0), _round(2.0, 2.5, 2.8, 6.0), _round(1.0, 2.0, 4.0, 6.0)]
    fill_report(report, rounds, {"agents": 20})
    target = report.ratios[0]
    assert target.value == 2.0 and target.target == TARGET_RATIO and target.met is False
    assert report.ratios[1].value == 4.0 / 3.0
    _title, columns, rows = report.tables[0]
    assert [r["round"] for r in rows] == [1, 2, 3] and "ratio vs raw fan-out" in columns
    assert report.data["agents"] == 20 and len(report.data["rounds"]) == 3
    assert {s.label for s in report.plots} == {"raw fan-out", "raw receiver", "delivery"}
    assert "| 1 |" in report.markdown()


def test_a_round_within_the_target_is_met() -> None:
    report = BenchReport("rollout", "t")
    fill_report(report, [_round(2.0, 2.5, 2.8, 6.0)], {})
    assert report.ratios[0].met is True
