"""Fixtures for the controller's tests: a running controller app on a real broker and DB,
and the real model variants built (once, content-hashed) into ``.cache/test-models``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloud_controller.app import create_app
from sim.broker import MosquittoBroker
from tests.controller.helpers import (
    Controller,
    ManualClock,
    SimAgent,
    bearer,
    settings_for,
    wait_subscribed,
)

#: Where the tests' variants are built (the same cache as tests/models uses).
BUILD_DIR = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))
TEST_EVAL_SENTENCES = 200


@pytest.fixture(scope="session")
def test_models() -> Path:
    """``fp32-onnx`` built by ``models.build`` (a no-op when cached), with the dev signing
    key under ``keys/``. Only FP32: the tests need one real artifact, and the reduced
    precision recipes (and their gates) are ``models``' business."""
    from models.build import BuildOptions, build_all

    warnings.filterwarnings("ignore")
    build_all(
        BuildOptions(out=BUILD_DIR, eval_sentences=TEST_EVAL_SENTENCES, variants=("fp32-onnx",))
    )
    return BUILD_DIR


@pytest.fixture
def make_controller(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    """``make_controller(database_url, clock=None, **settings)``: a started app, connected to
    the broker; its artifact store and signing key live under ``tmp_path``. Its ``http``
    client is admin; ``controller.client(role)`` gives a client of any role."""
    stack: list[TestClient] = []

    def make(
        database_url: str, *, clock: ManualClock | None = None, **overrides: Any
    ) -> Controller:
        overrides.setdefault("artifact_dir", tmp_path / f"artifacts-{len(stack)}")
        overrides.setdefault("signing_key_path", tmp_path / f"keys-{len(stack)}" / "signing.key")
        settings = settings_for(broker, database_url, **overrides)
        clock = clock or ManualClock()
        app = create_app(settings, clock=clock)
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        http = TestClient(app, headers=bearer(token) if token is not None else None)
        http.__enter__()
        stack.append(http)
        controller = Controller(app=app, http=http, clock=clock, settings=settings)
        assert controller.bridge.wait_connected(10), "controller did not connect to the broker"
        wait_subscribed(broker, controller)
        return controller

    yield make
    for http in reversed(stack):
        http.__exit__(None, None, None)


@pytest.fixture
def controller(make_controller: Callable[..., Controller], database_url: str) -> Controller:
    """A controller on each database (SQLite and PostgreSQL)."""
    return make_controller(database_url)


@pytest.fixture
def agents(broker: MosquittoBroker) -> Iterator[Callable[..., SimAgent]]:
    made: list[SimAgent] = []

    def make(device_id: str, **kwargs: Any) -> SimAgent:
        agent = SimAgent(broker, device_id, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()
