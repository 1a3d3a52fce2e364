"""``spillway bench models`` on a tiny budget: its reports and raw JSON, not its speed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from models.build import INT8_ONNX, BuildOptions, build_all
from sim.bench_models import bench_models

BUILD_DIR = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    build_all(BuildOptions(out=BUILD_DIR, eval_sentences=200, variants=(INT8_ONNX,)))
    return BUILD_DIR


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(bench_models)
    return app


def test_bench_without_build_is_one_clean_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["--model-dir", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "models build" in result.output


def test_bench_writes_the_report_and_the_raw_json(model_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw.json"
    args = ["--model-dir", str(model_dir), "--out", str(tmp_path / "reports"), "--json", str(raw)]
    args += ["--rounds", "2", "--variant", "int8-onnx"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    report = json.loads(raw.read_text())
    assert set(report["variants"]) == {"fp32-onnx", "int8-onnx"}
    assert report["variants"]["fp32-onnx"]["speedup_b8"] == 1.0
    assert report["method"]["threads"] == 2
    ratio = report["variants"]["int8-onnx"]["speedup"]["b8"]
    assert ratio["p25"] <= ratio["median"] <= ratio["p75"]
    assert len(ratio["rounds"]) == 2
    shared = json.loads((tmp_path / "reports" / "models.json").read_text())
    names = [r["name"] for r in shared["ratios"]]
    assert "int8-onnx throughput / fp32-onnx, batch 8" in names and "int8-onnx top-1" in names
    assert shared["data"]["variants"] == report["variants"]
    assert (tmp_path / "reports" / "models.md").read_text().startswith("## Models")
    assert (tmp_path / "reports" / "models.png").stat().st_size > 0
