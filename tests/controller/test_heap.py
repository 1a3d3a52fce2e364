"""Start-up objects are left out of garbage collections while the controller serves."""

from __future__ import annotations

import gc

import pytest
from typer.testing import CliRunner

from cloud_controller import cli
from cloud_controller.heap import long_lived_frozen
from sim.broker import free_port
from tests.controller.helpers import Controller


def test_objects_alive_at_the_start_are_frozen_until_the_end() -> None:
    gc.unfreeze()
    kept: list[list[int]] = [[] for _ in range(100)]  # tracked by the collector
    with long_lived_frozen():
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0


def test_serve_freezes_the_heap_around_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: list[int] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(gc.get_freeze_count()))
    monkeypatch.setattr(cli, "run_checks", lambda checks: None)  # no broker or database needed
    gc.unfreeze()
    result = CliRunner().invoke(cli.controller_app, ["serve", "--port", str(free_port())])
    assert result.exit_code == 0, result.output
    assert seen and seen[0] > 10_000  # the app, its routes and schemas, the modules
    assert gc.get_freeze_count() == 0


def test_the_app_itself_leaves_the_collector_alone(controller: Controller) -> None:
    """Tests (and embedders) run many controllers in one process."""
    assert controller.bridge.is_connected
    assert gc.get_freeze_count() == 0
