"""``spillway bench fleet`` end to end at a small size: a real controller, broker and
simulated fleet; convergence measured with a real rollout when a variant is built."""

from __future__ import annotations

from pathlib import Path

from sim.bench_fleet import FleetOptions, run_fleet_bench


def test_a_small_fleet_converges_through_real_rollouts(serving_models: Path) -> None:
    report = run_fleet_bench(
        FleetOptions(
            agents=12,
            workers=2,
            duration_s=2.0,
            rollout_sizes=(4, 12),
            rollout_timeout_s=60.0,
            model_dir=serving_models,
        )
    )
    assert str(report.data["convergence_by"]).startswith("Rollout convergence")
    rows = report.data["convergence"]
    assert [r["agents"] for r in rows] == [4, 12]
    assert [r["converged"] for r in rows] == ["4/4", "12/12"]
    assert all(r["converged s"] is not None for r in rows)
    load = report.tables[0][2]
    registered = next(r["value"] for r in load if r["measure"].startswith("agents connected"))
    assert registered > 0


def test_without_a_built_variant_it_times_desired_state_puts(tmp_path: Path) -> None:
    report = run_fleet_bench(
        FleetOptions(agents=4, workers=1, duration_s=2.0, rollout_sizes=(4,), model_dir=tmp_path)
    )
    assert str(report.data["convergence_by"]).startswith("Desired-state convergence")
    assert [r["converged"] for r in report.data["convergence"]] == ["4/4"]
