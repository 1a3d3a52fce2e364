"""The Alembic migrations build the schema the entities describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from cloud_controller import tables  # noqa: F401  (registers every table)
from cloud_controller.database import downgrade, make_engine, migrate
from cloud_controller.settings import CloudSettings

TABLES = {
    "devices",
    "device_labels",
    "desired_states",
    "reported_states",
    "telemetry_samples",
    "results",
    "models",
    "model_versions",
    "model_variants",
    "alerts",
    "policies",
    "policy_versions",
    "device_groups",
    "operator_labels",
    "rollouts",
    "rollout_waves",
    "rollout_devices",
    "api_tokens",
    "audit_log",
}


def test_upgrade_head_builds_the_schema_the_entities_describe(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent: a second start changes nothing
        inspector = sa.inspect(engine)
        assert TABLES | {"alembic_version"} <= set(inspector.get_table_names())
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, SQLModel.metadata) == []
            assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

        downgrade(engine, revision="base")
        assert not TABLES & set(sa.inspect(engine).get_table_names())
        migrate(engine)
        assert set(sa.inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "spillway.db"
    engine = make_engine(f"sqlite:///{target}")
    try:
        migrate(engine)
    finally:
        engine.dispose()
    assert target.exists()


def test_database_url_comes_from_prefixed_or_plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPILLWAY_DATABASE_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://plain/db")
    assert CloudSettings().database_url == "postgresql+psycopg2://plain/db"
    monkeypatch.setenv("SPILLWAY_DATABASE_URL", "sqlite:///prefixed.db")
    assert CloudSettings().database_url == "sqlite:///prefixed.db"
    assert CloudSettings(database_url="sqlite:///given.db").database_url == "sqlite:///given.db"
    monkeypatch.setenv("SPILLWAY_HTTP_PORT", "8123")
    assert CloudSettings().http_port == 8123
