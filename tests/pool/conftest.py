"""Fixtures of the pool tests: a broker and a running pool shared by a module's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sim.broker import MosquittoBroker
from tests.pool.helpers import RunningPool, running_pool


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("broker")) as broker:
        yield broker


@pytest.fixture(scope="module")
def pool(
    module_broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPool]:
    """Two TP=1 replicas (light) serving the module's tests."""
    with running_pool(
        host=module_broker.host,
        port=module_broker.port,
        state_dir=tmp_path_factory.mktemp("pool"),
        replicas=2,
        tp=1,
    ) as running:
        yield running
