"""Engines, schema migrations and the database health probe.

The schema is owned by Alembic (``cloud_controller/migrations``); ``migrate`` runs
``upgrade head`` programmatically, with the script location resolved from this package so
it works from an installed wheel. Works on SQLite and PostgreSQL. Knows nothing of MQTT.

Errors::

    DatabaseError             the database cannot be used; the message is one line
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class DatabaseError(RuntimeError):
    """The database is unreachable or refused an operation; temporary as far as we know."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (drivers like multi-line messages)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url``; creates a SQLite file's parent directory."""
    url = make_url(database_url)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # The MQTT thread writes while the API's threads read: wait for locks, not fail.
        connect_args = {"check_same_thread": False, "timeout": 30}
    elif url.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": 5}
    engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    if url.get_backend_name() == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def migrate(engine: Engine, *, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (``upgrade``); raise ``DatabaseError`` on failure."""
    config = alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"migration to {revision} failed: {one_line(exc)}") from exc
    logger.info("database schema at %s", revision, extra={"backend": engine.dialect.name})


def downgrade(engine: Engine, *, revision: str) -> None:
    config = alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"migration to {revision} failed: {one_line(exc)}") from exc


def ping(engine: Engine) -> None:
    """``SELECT 1``; raises ``DatabaseError`` with one line saying why not."""
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseError(one_line(exc)) from exc
