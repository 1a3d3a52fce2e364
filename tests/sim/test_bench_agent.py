"""``spillway bench agent`` end to end on a tiny budget: its shape, not its speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from models.build import INT8_ONNX, BuildOptions, build_all
from sim.bench_agent import bench_agent

BUILD_DIR = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    build_all(BuildOptions(out=BUILD_DIR, eval_sentences=200, variants=(INT8_ONNX,)))
    return BUILD_DIR


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(bench_agent)
    return app


def test_bench_agent_reports_every_ratio_as_a_table_and_json(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    args = ["--model-dir", str(model_dir), "--rounds", "1", "--phase-s", "0.2"]
    args += ["--latency-samples", "6", "--concurrency", "4", "--threads", "1", "--json", str(out)]
    args += ["--out", str(tmp_path / "reports")]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "| measure | value | target | met |" in result.output
    shared = json.loads((tmp_path / "reports" / "agent.json").read_text())
    assert [r["target"] for r in shared["ratios"]] == [0.9, 1.0, None, 1.3]
    assert (tmp_path / "reports" / "agent.png").stat().st_size > 0
    report = json.loads(out.read_text())
    assert report["variant"] == "int8-onnx" and report["threads"] == 1
    saturation, latency, batching = (
        report["saturation"],
        report["latency_batch1"],
        report["dynamic_batching"],
    )
    assert saturation["raw_items_per_s"] > 0 and saturation["agent_items_per_s"] > 0
    assert saturation["ratio"] == pytest.approx(
        saturation["agent_items_per_s"]
        / max(saturation["raw_items_per_s"], saturation["raw_batch1_items_per_s"]),
        rel=1e-9,
    )
    assert latency["samples"] == 6 and latency["raw_p50_ms"] > 0
    assert latency["added_p50_ms"] == pytest.approx(latency["agent_p50_ms"] - latency["raw_p50_ms"])
    assert batching["concurrency"] == 4 and batching["batch1_items_per_s"] > 0
    assert all("met" in part for part in (saturation, latency, batching))
    assert shared["data"]["latency_batch1"] == latency


def test_bench_agent_without_a_build_says_how_to_make_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["--model-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "spillway models build --out" in result.output
