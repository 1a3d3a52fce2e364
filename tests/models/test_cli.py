"""The CLI commands, mounted on a small typer app the way the CLI root mounts them."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from models.build import BuildReport
from models.cli import bench_models, models_app


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(models_app, name="models")
    bench = typer.Typer()
    bench.command("models")(bench_models)
    app.add_typer(bench, name="bench")
    return app


def test_build_is_cached(build_dir: Path, built: BuildReport) -> None:
    result = CliRunner().invoke(
        _app(), ["models", "build", "--out", str(build_dir), "--eval-sentences", "200"]
    )
    assert result.exit_code == 0, result.output
    assert "cached" in result.output


def test_bench_without_build_is_one_clean_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["bench", "models", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "models build" in result.output


def test_bench_writes_json(build_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        _app(),
        [
            "bench",
            "models",
            "--out",
            str(build_dir),
            "--json",
            str(out),
            "--rounds",
            "2",
            "--variant",
            "int8-onnx",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"fp32-onnx", "int8-onnx"}
    assert report["variants"]["fp32-onnx"]["speedup_b8"] == 1.0
    assert report["method"]["threads"] == 2
    ratio = report["variants"]["int8-onnx"]["speedup"]["b8"]
    assert ratio["p25"] <= ratio["median"] <= ratio["p75"]
