"""``spillway controller``: start-up checks fail with one line and exit 2; migrate works."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud_controller.cli import controller_app
from sim.broker import MosquittoBroker, free_port


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """The CLI configures JSON logs on the root logger; give pytest its handlers back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _serve(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(controller_app, ["serve", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.stderr


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("spillway controller: ")
    return lines[0]


def test_port_taken_prints_one_line_and_exits_2(broker: MosquittoBroker, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        code, stderr = _serve(
            "--port",
            str(taken),
            "--mqtt-port",
            str(broker.port),
            "--database-url",
            f"sqlite:///{tmp_path / 'c.db'}",
        )
    assert code == 2
    line = _one_line(stderr)
    assert f"127.0.0.1:{taken}" in line and "REST API" in line


def test_unreachable_broker_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    code, stderr = _serve(
        "--port",
        str(free_port()),
        "--mqtt-port",
        str(free_port()),
        "--database-url",
        f"sqlite:///{tmp_path / 'c.db'}",
    )
    assert code == 2
    assert "MQTT broker" in _one_line(stderr)


def test_unreachable_database_prints_one_line_and_exits_2(broker: MosquittoBroker) -> None:
    code, stderr = _serve(
        "--port",
        str(free_port()),
        "--mqtt-port",
        str(broker.port),
        "--database-url",
        f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nothing",
    )
    assert code == 2
    assert "database unreachable" in _one_line(stderr)


def test_invalid_setting_prints_one_line_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLWAY_STALE_AFTER_S", "-5")
    code, stderr = _serve("--port", str(free_port()))
    assert code == 2
    assert "invalid setting stale_after_s" in _one_line(stderr)


def test_migrate_brings_the_schema_to_head(database_url: str) -> None:
    result = CliRunner().invoke(controller_app, ["migrate", "--database-url", database_url])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(controller_app, ["migrate", "--database-url", database_url])
    assert again.exit_code == 0 and "head" in again.stdout
