"""The CLI commands, mounted on a small typer app the way the CLI root mounts them.

``spillway bench models`` is tested in tests/sim/test_bench_models.py (it lives in ``sim``)."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from models.build import BuildReport
from models.cli import models_app


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(models_app, name="models")
    return app


def test_build_is_cached(build_dir: Path, built: BuildReport) -> None:
    result = CliRunner().invoke(
        _app(), ["models", "build", "--out", str(build_dir), "--eval-sentences", "200"]
    )
    assert result.exit_code == 0, result.output
    assert "cached" in result.output
