"""Shared fixtures: a real mosquitto per test, PostgreSQL when reachable."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.broker import MosquittoBroker

TEST_MODELS_DIR = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))
"""Where tests build model variants once; content-hashed, so a rebuild is a no-op."""
TEST_EVAL_SENTENCES = 200
"""Held-out sentences the tests' quality gates use (a published build uses >= 1000)."""

POSTGRES_HOST = os.environ.get("SPILLWAY_TEST_PG_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("SPILLWAY_TEST_PG_PORT", "5432"))
POSTGRES_ADMIN_URL = f"postgresql+psycopg2://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"


@pytest.fixture(autouse=True)
def _keep_root_logging() -> Iterator[None]:
    """CLI entry points reconfigure the root logger; give every test the handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A mosquitto of this test's own on a free port; ``restart()``/``kill()`` are fair game."""
    with MosquittoBroker(tmp_path / "broker") as b:
        yield b


def _postgres_reachable() -> bool:
    try:
        with socket.create_connection((POSTGRES_HOST, POSTGRES_PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards.

    In CI (``CI=true``) PostgreSQL must be reachable: the test fails instead of skipping.
    """
    if not _postgres_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT} unreachable in CI")
        pytest.skip(f"PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT} unreachable")
    from sqlalchemy import create_engine, text

    name = f"spillway_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg2://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every database test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'spillway.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def serving_models() -> Path:
    """FP32 and INT8 ONNX variants with signed manifests, for agents that serve."""
    from models.build import FP32_ONNX, INT8_ONNX, BuildOptions, build_all

    build_all(
        BuildOptions(
            out=TEST_MODELS_DIR,
            eval_sentences=TEST_EVAL_SENTENCES,
            variants=(FP32_ONNX, INT8_ONNX),
        )
    )
    return TEST_MODELS_DIR
