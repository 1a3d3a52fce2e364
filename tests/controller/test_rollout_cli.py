"""``spillway rollout`` against a controller served by uvicorn on a real port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from cloud_controller.app import create_app
from cloud_controller.rollout_cli import rollout_app
from sim.broker import MosquittoBroker, free_port
from tests.controller.helpers import (
    TEST_ADMIN_TOKEN,
    Controller,
    ManualClock,
    SimAgent,
    settings_for,
    wait_for,
)
from tests.controller.rollout_helpers import MODEL, register

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}

MakeController = Callable[..., Controller]


@pytest.fixture
def served(
    broker: MosquittoBroker, tmp_path: Path, test_models: Path
) -> Iterator[tuple[str, ManualClock]]:
    clock = ManualClock(datetime.now(UTC))
    settings = settings_for(
        broker,
        f"sqlite:///{tmp_path / 'cli.db'}",
        artifact_dir=tmp_path / "artifacts",
        signing_key_path=tmp_path / "keys" / "signing.key",
        trusted_keys_dir=test_models / "keys",
        rollout_tick_s=0.1,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, clock=clock), port=port, log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 20)
    yield f"http://127.0.0.1:{port}", clock
    server.should_exit = True
    thread.join(10)


def test_cli_starts_shows_pauses_resumes_and_aborts(
    served: tuple[str, ManualClock],
    broker: MosquittoBroker,
    test_models: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, clock = served
    import httpx

    class Http:  # the register helper's client, over the real port
        def __init__(self) -> None:
            self.client = httpx.Client(base_url=url, timeout=30, headers=ADMIN)

        def post(self, *args: object, **kwargs: object) -> httpx.Response:
            return self.client.post(*args, **kwargs)  # type: ignore[arg-type]

    register(Controller(app=None, http=Http(), clock=None, settings=None), test_models, "2.0.0")  # type: ignore[arg-type]
    agent = SimAgent(broker, "cli-1")
    try:
        agent.hello(labels={"site": "lab"})
        assert wait_for(
            lambda: httpx.get(f"{url}/api/v1/devices/cli-1", headers=ADMIN).status_code == 200
        )
        runner = CliRunner()
        monkeypatch.setenv("SPILLWAY_URL", url)
        monkeypatch.setenv("SPILLWAY_TOKEN", TEST_ADMIN_TOKEN)
        started = runner.invoke(
            rollout_app, ["start", MODEL, "2.0.0", "--label", "site=lab", "--interval-s", "600"]
        )
        assert started.exit_code == 0, started.output
        assert "rollout 1 started: 1 devices in 1 waves" in started.output

        paused = runner.invoke(rollout_app, ["pause", "1"])
        assert paused.exit_code == 0 and "rollout 1: paused" in paused.output
        again = runner.invoke(rollout_app, ["pause", "1"])
        assert again.exit_code == 1 and "409" in again.output

        shown = runner.invoke(rollout_app, ["status", "1"])
        assert shown.exit_code == 0, shown.output
        assert "0/1 devices" in shown.output and "paused" in shown.output
        assert "canary" in shown.output
        listed = runner.invoke(rollout_app, ["status"])
        assert MODEL in listed.output and "paused" in listed.output

        def device_state() -> str:
            rollout = httpx.get(f"{url}/api/v1/rollouts/1", headers=ADMIN).json()
            return str(rollout["devices"][0]["state"])

        assert "running" in runner.invoke(rollout_app, ["resume", "1"]).output
        # the engine assigns the canary on its next pass; abort only once it has (an abort
        # before that leaves nothing to roll back)
        assert wait_for(lambda: device_state() == "installing")
        assert "rolling_back" in runner.invoke(rollout_app, ["abort", "1"]).output
        assert wait_for(lambda: device_state() == "rolling_back")
        clock.advance(700)  # the simulated device never confirms: the rollback times out
        watched = runner.invoke(rollout_app, ["status", "1", "--watch", "--every-s", "0.2"])
        assert watched.exit_code == 0 and "aborted" in watched.output

        missing = runner.invoke(rollout_app, ["status", "42"])
        assert missing.exit_code == 1 and "404" in missing.output
        bad = runner.invoke(rollout_app, ["start", MODEL, "2.0.0", "--label", "nolabel"])
        assert bad.exit_code == 1 and "key=value" in bad.output
        away = runner.invoke(rollout_app, ["status", "--url", "http://127.0.0.1:9"])
        assert away.exit_code == 2 and "unreachable" in away.output
    finally:
        agent.stop()
