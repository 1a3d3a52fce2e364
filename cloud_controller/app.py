"""The controller's FastAPI app factory.

``create_app(settings)`` builds an app whose lifespan creates the engine, migrates the
schema to head, makes sure the bootstrap admin token exists (``admin_token``), starts the
MQTT bridge and stops it all again; nothing is built at import time. Domain errors become HTTP
statuses here and only here. Every request gets a request id (``request_ids``) and a body
limit (``body_limits``); every route but health, metrics and the docs needs a token.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cloud_controller import (
    audit_api,
    body_limits,
    dashboard,
    devices_api,
    fleet,
    fleet_api,
    health_api,
    models_api,
    policies_api,
    queries,
    request_ids,
    results_api,
    rollouts_api,
    tokens_api,
)
from cloud_controller.artifacts import ArtifactStore
from cloud_controller.auth import Role, tokens
from cloud_controller.bridge import Bridge
from cloud_controller.clock import Clock, system_clock
from cloud_controller.database import DatabaseError, make_engine, migrate, one_line
from cloud_controller.errors import (
    DesiredNotPublished,
    DeviceNotFound,
    NotAuthenticated,
    PermissionDenied,
    RegistryError,
    ResultNotFound,
    TokenConflict,
    TokenNotFound,
)
from cloud_controller.metrics import ControllerMetrics
from cloud_controller.pool.gateway import PoolClient, pool_router
from cloud_controller.rollout_engine import RolloutEngine, RolloutError
from cloud_controller.runtime import Runtime
from cloud_controller.settings import CloudSettings
from cloud_controller.transfer import ChunkServer
from cloud_controller.trust import Trust
from cloud_controller.watching import ModelWatcher
from protocol.messages import DeviceStatus
from protocol.mqtt import MqttClient
from protocol.topics import Topics

logger = logging.getLogger(__name__)


def create_app(settings: CloudSettings, *, clock: Clock = system_clock) -> FastAPI:
    """A controller app; ``clock`` is where staleness and timestamps take "now" from."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        try:
            migrate(engine)
            if settings.admin_token is not None:
                tokens.ensure(
                    engine,
                    secret=settings.admin_token.get_secret_value(),
                    role=Role.ADMIN,
                    name=tokens.BOOTSTRAP_NAME,
                    now=clock(),
                )
            metrics = ControllerMetrics()
            bridge = Bridge(settings=settings, engine=engine, metrics=metrics, clock=clock)
            store = ArtifactStore(settings.artifact_dir)
            trust = Trust(settings)
            chunks = ChunkServer(
                settings=settings,
                engine=engine,
                store=store,
                client=bridge.client,
                metrics=metrics,
            )
            watcher = None
            if settings.model_watch_dir is not None:
                watcher = ModelWatcher(
                    settings=settings,
                    engine=engine,
                    store=store,
                    trust=trust,
                    metrics=metrics,
                    clock=clock,
                )

            def devices_by_status() -> dict[DeviceStatus, int]:
                with Session(engine) as session:
                    return queries.count_by_status(session)

            def rollouts_by_state() -> dict[str, int]:
                with Session(engine) as session:
                    return fleet.rollouts_by_state(session)

            metrics.watch(
                devices_by_status=devices_by_status,
                mqtt_connected=lambda: bridge.is_connected,
                ingest_pending=lambda: bridge.pending,
                transfers_active=lambda: chunks.active,
                rollouts_by_state=rollouts_by_state,
            )
            app.state.runtime = Runtime(
                settings=settings,
                engine=engine,
                bridge=bridge,
                metrics=metrics,
                clock=clock,
                store=store,
                trust=trust,
                chunks=chunks,
                watcher=watcher,
            )
            chunks.start()  # subscribes before the bridge connects
            bridge.start()
            if watcher is not None:
                watcher.start()
            # The API gateway's path to the overflow pool: its own MQTT session, so its
            # replies never queue behind the bridge's ingest.
            pool_client = PoolClient(
                MqttClient(replace(settings.mqtt(), client_id=f"{settings.mqtt_client_id}-gw")),
                client_id=f"{settings.mqtt_client_id}-gw",
                topics=Topics(settings.topic_root),
            )
            pool_client.start()
            app.state.pool_client = pool_client
            rollouts = RolloutEngine(settings=settings, engine=engine, bridge=bridge, clock=clock)
            app.state.rollouts = rollouts
            rollouts.start()  # unfinished rollouts go on from their persisted wave
            logger.info(
                "controller started",
                extra={"mqtt": f"{settings.mqtt_host}:{settings.mqtt_port}"},
            )
            try:
                yield
            finally:
                rollouts.stop()
                pool_client.stop()
                if watcher is not None:
                    watcher.stop()
                chunks.stop()  # chunks in flight are answered while still connected
                bridge.stop()
                logger.info("controller stopped")
        finally:
            engine.dispose()

    app = FastAPI(title="Spillway controller", version="1", lifespan=lifespan)
    app.include_router(devices_api.router)
    app.include_router(results_api.router)
    app.include_router(models_api.router)
    app.include_router(models_api.alerts_router)
    app.include_router(health_api.router)
    app.include_router(pool_router)
    policies_api.install(app)
    app.include_router(rollouts_api.router)
    app.include_router(fleet_api.router)
    app.include_router(dashboard.router)
    app.include_router(tokens_api.router)
    app.include_router(tokens_api.me_router)
    app.include_router(audit_api.router)
    _map_errors(app)

    def body_limit(method: str, path: str) -> int:
        return body_limits.limit_for(
            method,
            path,
            max_request_body_bytes=settings.max_request_body_bytes,
            max_upload_bytes=settings.max_upload_bytes,
        )

    app.add_middleware(body_limits.BodyLimitMiddleware, limit=body_limit)
    app.add_middleware(request_ids.RequestIdMiddleware)  # outermost: a 413 carries the id too
    return app


def _map_errors(app: FastAPI) -> None:
    @app.exception_handler(DeviceNotFound)
    async def not_found(request: Request, exc: DeviceNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(PermissionDenied)
    async def forbidden(request: Request, exc: PermissionDenied) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(TokenNotFound)
    async def token_not_found(request: Request, exc: TokenNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(TokenConflict)
    async def token_conflict(request: Request, exc: TokenConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(ResultNotFound)
    async def result_not_found(request: Request, exc: ResultNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(DesiredNotPublished)
    async def not_published(request: Request, exc: DesiredNotPublished) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "generation": exc.generation}, status_code=503)

    @app.exception_handler(RegistryError)
    async def registry_refused(request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "reason": exc.reason}, status_code=exc.status_code)

    @app.exception_handler(RolloutError)
    async def rollout_refused(request: Request, exc: RolloutError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(SQLAlchemyError)
    async def database_failed(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        logger.error("database error", extra={"path": request.url.path, "error": one_line(exc)})
        return JSONResponse({"detail": f"database unavailable: {one_line(exc)}"}, status_code=503)

    @app.exception_handler(DatabaseError)
    async def database_down(request: Request, exc: DatabaseError) -> JSONResponse:
        return JSONResponse({"detail": f"database unavailable: {exc}"}, status_code=503)
