"""``spillway controller ...``: serve the controller, migrate its database, make tokens.

``serve`` builds ``CloudSettings`` (options override the environment), configures JSON
logs, and runs every start-up check before serving; a failed check prints one line,
``spillway controller: <problem>``, to stderr and exits 2 without a traceback. FastAPI,
SQLAlchemy and uvicorn are imported only after the package check has passed.
``token create`` works straight on the database (no running controller, no token needed):
it is how a real deployment gets its first admin token. It prints the secret once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from cloud_controller.settings import CloudSettings
from spillway.logs import configure_json_logging
from spillway.preflight import (
    EXIT_PREFLIGHT,
    Check,
    PreflightError,
    mqtt_tls_files_readable,
    packages_present,
    port_free,
    run_checks,
    settings_from,
    tcp_reachable,
)

controller_app = typer.Typer(
    help="The cloud controller: device registry, desired state, REST API.",
    no_args_is_help=True,
    add_completion=False,
)

token_app = typer.Typer(
    help="API tokens, straight in the database (to bootstrap a deployment).",
    no_args_is_help=True,
    add_completion=False,
)
controller_app.add_typer(token_app, name="token")

_CLOUD_PACKAGES = (
    "fastapi",
    "uvicorn",
    "sqlmodel",
    "sqlalchemy",
    "alembic",
    "prometheus_client",
    "python_multipart",
)


def _fail(problem: str) -> NoReturn:
    typer.echo(f"spillway controller: {problem}", err=True)
    raise typer.Exit(code=EXIT_PREFLIGHT)


def build_settings(**overrides: Any) -> CloudSettings:
    """Settings from the environment with the given options on top; one line on error."""
    return settings_from(CloudSettings, overrides)


def database_reachable(database_url: str) -> Check:
    def check() -> None:
        from cloud_controller.database import DatabaseError, make_engine, ping

        try:
            engine = make_engine(database_url)
        except Exception as exc:  # bad URL, missing driver: say so in one line
            raise PreflightError(f"database URL unusable: {exc}") from exc
        try:
            ping(engine)
        except DatabaseError as exc:
            raise PreflightError(f"database unreachable: {exc}") from exc
        finally:
            engine.dispose()

    return check


def directory_writable(path: Path, *, what: str) -> Check:
    """``path`` exists (created when missing) and this process may write there."""

    def check() -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PreflightError(f"{what} {path} cannot be created: {exc.strerror}") from exc
        if not os.access(path, os.W_OK | os.X_OK):
            raise PreflightError(f"{what} {path} is not writable")

    return check


def startup_checks(settings: CloudSettings) -> list[Check]:
    packages: tuple[str, ...] = _CLOUD_PACKAGES
    if settings.database_url.startswith("postgresql"):
        packages = (*packages, "psycopg2")
    checks = [
        packages_present(*packages, extra="cloud"),
        port_free(settings.http_host, settings.http_port, what="REST API"),
        mqtt_tls_files_readable(settings),
        tcp_reachable(settings.mqtt_host, settings.mqtt_port, what="MQTT broker"),
        database_reachable(settings.database_url),
        directory_writable(settings.artifact_dir, what="artifact store"),
    ]
    if settings.model_watch_dir is not None:
        checks.append(directory_writable(settings.model_watch_dir, what="watched model folder"))
    return checks


@controller_app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address the REST API listens on.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port of the REST API.")] = None,
    mqtt_host: Annotated[str | None, typer.Option(help="Broker host.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="Broker TCP port.")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from DATABASE_URL.")
    ] = None,
) -> None:
    """Check everything the controller needs, then serve REST and the MQTT bridge."""
    try:
        settings = build_settings(
            http_host=host,
            http_port=port,
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            database_url=database_url,
        )
        configure_json_logging("controller", level=settings.log_level)
        run_checks(startup_checks(settings))
    except PreflightError as exc:
        _fail(str(exc))

    import uvicorn

    from cloud_controller.app import create_app
    from cloud_controller.heap import long_lived_frozen
    from cloud_controller.request_ids import install_log_field

    install_log_field()
    app = create_app(settings)
    # The process is the controller's alone, so its start-up heap (modules, the app, its
    # routes and schemas) can leave the collector's full passes for as long as it serves.
    with long_lived_frozen():
        uvicorn.run(
            app,
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,  # keep the JSON logs configured above
        )


@controller_app.command()
def migrate(
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from DATABASE_URL.")
    ] = None,
) -> None:
    """Bring the database schema to the newest revision."""
    try:
        settings = build_settings(database_url=database_url)
        configure_json_logging("controller", level=settings.log_level)
        run_checks([packages_present(*_CLOUD_PACKAGES, extra="cloud")])
    except PreflightError as exc:
        _fail(str(exc))

    from cloud_controller.database import DatabaseError, make_engine
    from cloud_controller.database import migrate as upgrade

    engine = make_engine(settings.database_url)
    try:
        upgrade(engine)
    except DatabaseError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    typer.echo("database schema is at head")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="What the token is for, e.g. ci-deploy.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from DATABASE_URL.")
    ] = None,
) -> None:
    """Create an API token and print its secret (shown this once; only its hash is kept)."""
    try:
        settings = build_settings(database_url=database_url)
        configure_json_logging("controller", level="WARNING")
        run_checks([packages_present(*_CLOUD_PACKAGES, extra="cloud")])
    except PreflightError as exc:
        _fail(str(exc))

    from datetime import UTC, datetime

    from pydantic import ValidationError
    from sqlmodel import Session

    from cloud_controller.auth import Role, tokens
    from cloud_controller.database import DatabaseError, make_engine
    from cloud_controller.database import migrate as upgrade

    try:
        body = tokens.TokenCreate.model_validate({"name": name, "role": role})
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        _fail(f"bad token: {problems}")
    engine = make_engine(settings.database_url)
    try:
        upgrade(engine)
        with Session(engine) as session:
            row, secret = tokens.create(
                session, name=body.name, role=Role(body.role), now=datetime.now(UTC)
            )
            session.commit()
            token_id = row.id
    except DatabaseError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    typer.echo(f"created {body.role} token {body.name!r} (id {token_id}); shown once:", err=True)
    typer.echo(secret)  # alone on stdout: TOKEN=$(spillway controller token create ...)
