"""Fixtures for the agent's tests; the helper classes live in ``tests.agent.helpers``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.serving import ServingModel, load_serving_model
from edge_agent.settings import EdgeSettings
from models.build import FP32_ONNX, INT8_ONNX, BuildOptions, build_all
from sim.broker import MosquittoBroker
from tests.agent.helpers import (
    KEEPALIVE_S,
    Acker,
    AgentFactory,
    AgentProcess,
    Cloud,
    FakeClock,
    ProcessFactory,
    RecordingPublisher,
    control_key_env,
    edge_settings,
    serving_settings,
)

#: Same cache and evaluation size as tests/models, so the variants are built once for both.
BUILD_DIR = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))
TEST_EVAL_SENTENCES = 200


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
            env={"SPILLWAY_EDGE_RECONNECT_BACKOFF_MAX_S": "0.5", **control_key_env()},
        )
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.cleanup()


# -- serving ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The FP32 and INT8 ONNX variants, built (or found in the content-hashed cache)."""
    build_all(
        BuildOptions(
            out=BUILD_DIR, eval_sentences=TEST_EVAL_SENTENCES, variants=(FP32_ONNX, INT8_ONNX)
        )
    )
    return BUILD_DIR


def _load(model_dir: Path, variant: str) -> ServingModel:
    settings = EdgeSettings(
        device_id="loader", model_dir=model_dir, model_variant=variant, intra_op_threads=1
    )
    return load_serving_model(settings)


@pytest.fixture(scope="session")
def int8_model(model_dir: Path) -> ServingModel:
    """The edge's default variant, loaded (and verified) once per session."""
    return _load(model_dir, INT8_ONNX)


@pytest.fixture(scope="session")
def fp32_model(model_dir: Path) -> ServingModel:
    """What the test-only cloud pool serves."""
    return _load(model_dir, FP32_ONNX)


@pytest.fixture
def acker(broker: MosquittoBroker) -> Iterator[Acker]:
    a = Acker(broker)
    yield a
    a.close()


@pytest.fixture
def serving_agent(
    broker: MosquittoBroker, tmp_path: Path, model_dir: Path, int8_model: ServingModel
) -> Iterator[AgentFactory]:
    """``serving_agent(model=..., **settings)`` -> a started Agent serving HTTP on a free port."""
    made: list[Agent] = []

    def make(*, model: ServingModel | None = None, **overrides: Any) -> Agent:
        device_id = overrides.get("device_id", "dev-1")
        state_dir = overrides.pop("state_dir", tmp_path / "state" / device_id)
        settings = serving_settings(broker, state_dir, model_dir, **overrides)
        agent = Agent(settings, model=model or int8_model)
        agent.start()
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()
