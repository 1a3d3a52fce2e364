"""Fixtures for the controller's tests: a running controller app on a real broker and DB."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloud_controller.app import create_app
from sim.broker import MosquittoBroker
from tests.controller.helpers import (
    Controller,
    ManualClock,
    SimAgent,
    settings_for,
    wait_subscribed,
)


@pytest.fixture
def make_controller(
    broker: MosquittoBroker,
) -> Iterator[Callable[..., Controller]]:
    """``make_controller(database_url, **settings)``: a started app, connected to the broker."""
    stack: list[TestClient] = []

    def make(database_url: str, **overrides: Any) -> Controller:
        settings = settings_for(broker, database_url, **overrides)
        clock = ManualClock()
        app = create_app(settings, clock=clock)
        http = TestClient(app)
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
