"""Fixtures of the dashboard's tests: an in-process controller for the aggregate API, and
(``fleet.py``) a real fleet of processes driven through Debian's chromium."""

from __future__ import annotations

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
    bearer,
    settings_for,
    wait_subscribed,
)


@pytest.fixture
def make_controller(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    """``make_controller(database_url, **settings)``: a started app on a ``ManualClock``; its
    ``http`` client is admin."""
    stack: list[TestClient] = []

    def make(database_url: str, **overrides: Any) -> Controller:
        overrides.setdefault("artifact_dir", tmp_path / "artifacts")
        overrides.setdefault("signing_key_path", tmp_path / "keys" / "signing.key")
        settings = settings_for(broker, database_url, **overrides)
        clock = ManualClock()
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
