"""Fixtures for the agent's tests; the helper classes live in ``tests.agent.helpers``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from sim.broker import MosquittoBroker
from tests.agent.helpers import (
    KEEPALIVE_S,
    AgentFactory,
    AgentProcess,
    Cloud,
    FakeClock,
    ProcessFactory,
    RecordingPublisher,
    edge_settings,
)


@pytest.fixture(autouse=True)
def _no_edge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must come from the test, not from whoever runs it."""
    for name in list(os.environ):
        if name.startswith("SPILLWAY_EDGE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def cloud(broker: MosquittoBroker) -> Iterator[Cloud]:
    c = Cloud(broker)
    yield c
    c.close()


@pytest.fixture
def make_agent(broker: MosquittoBroker, tmp_path: Path) -> Iterator[AgentFactory]:
    """``make_agent(device_id=..., state_dir=..., **settings)`` -> a started Agent."""
    made: list[Agent] = []

    def make(**overrides: Any) -> Agent:
        device_id = overrides.get("device_id", "dev-1")
        overrides.setdefault("state_dir", tmp_path / "state" / device_id)
        agent = Agent(edge_settings(broker, **overrides))
        agent.start()
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()


@pytest.fixture
def agent_process(broker: MosquittoBroker, tmp_path: Path) -> Iterator[ProcessFactory]:
    """``agent_process(device_id)`` -> an AgentProcess (not started) on this test's broker."""
    made: list[AgentProcess] = []

    def make(device_id: str = "dev-1", *, extra: list[str] | None = None) -> AgentProcess:
        args = [
            "--device-id",
            device_id,
            "--mqtt-port",
            str(broker.port),
            "--state-dir",
            str(tmp_path / "state" / device_id),
            "--keepalive-s",
            str(KEEPALIVE_S),
            "--heartbeat-interval-s",
            "0.5",
            *(extra or []),
        ]
        proc = AgentProcess(
            args,
            log_path=tmp_path / f"{device_id}.log",
            env={"SPILLWAY_EDGE_RECONNECT_BACKOFF_MAX_S": "0.5"},
        )
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.cleanup()
