"""Local applications' HTTP door: ``POST /v1/embed``, ``GET /metrics``, ``GET /healthz``.

``create_app(runtime)`` builds the FastAPI app; ``HttpIngress`` runs it with uvicorn on the
serving loop (bound to localhost unless configured otherwise). The route only translates:
JSON in, ``ServingRuntime.serve``, JSON out, with the status mapped onto HTTP::

    ok 200 | invalid 422 | overloaded 429 (Retry-After) | deadline_exceeded 504 | error 503

Request: ``{"texts": [...], "request_id"?: str, "deadline_ms"?: int, "priority"?: 0-9}``
(``deadline_ms`` is relative to arrival). Response: ``{"request_id", "status", "tier",
"variant", "queued_ms", "compute_ms", "latency_ms", "offload_reason", "detail",
"embeddings": [[...]]}``. This module knows no MQTT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from edge_agent.clock import Clock
from edge_agent.serving import EmbedOutcome, EmbedRequest, ServingError, ServingRuntime
from protocol.inference import MAX_TEXTS, InferStatus

logger = logging.getLogger(__name__)

HTTP_STATUS = {
    InferStatus.OK: 200,
    InferStatus.INVALID: 422,
    InferStatus.OVERLOADED: 429,
    InferStatus.DEADLINE_EXCEEDED: 504,
    InferStatus.ERROR: 503,
}
MAX_DEADLINE_MS = 3_600_000


class IngressError(ServingError):
    """The HTTP ingress could not start (port taken, bad address)."""


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)
    request_id: str | None = Field(default=None, min_length=1, max_length=128)
    deadline_ms: int | None = Field(default=None, ge=0, le=MAX_DEADLINE_MS)
    """Milliseconds from arrival after which the answer is useless (None: no deadline)."""
    priority: int = Field(default=1, ge=0, le=9)
    """0 runs first."""


def outcome_json(outcome: EmbedOutcome) -> dict[str, Any]:
    return {
        "request_id": outcome.request_id,
        "status": outcome.status.value,
        "tier": outcome.tier.value,
        "variant": outcome.variant,
        "queued_ms": round(outcome.queued_ms, 3),
        "compute_ms": round(outcome.compute_ms, 3),
        "latency_ms": round(outcome.latency_ms, 3),
        "offload_reason": outcome.offload_reason.value if outcome.offload_reason else None,
        "detail": outcome.detail,
        "embeddings": [] if outcome.embeddings is None else outcome.embeddings.tolist(),
    }


def _validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for error in list(errors)[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(runtime: ServingRuntime, *, clock: Clock) -> FastAPI:
    app = FastAPI(title="Spillway edge agent", docs_url=None, redoc_url=None, openapi_url=None)

    def invalid_body(errors: Sequence[Any]) -> JSONResponse:
        return JSONResponse(
            {"status": InferStatus.INVALID.value, "detail": _validation_message(errors)},
            status_code=422,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_body(exc.errors())

    @app.post("/v1/embed")
    async def embed(request: Request) -> Response:
        # Parsed and validated in one pass by pydantic-core straight from the bytes, not
        # json.loads + FastAPI's body machinery + a second validation: this is on every
        # request's path.
        try:
            body = EmbedBody.model_validate_json(await request.body())
        except ValidationError as exc:
            return invalid_body(exc.errors())
        except ClientDisconnect:  # gave up before its body arrived: nothing to answer
            logger.info("client left before sending its request body")
            return Response(status_code=499)
        deadline = None
        if body.deadline_ms is not None:
            deadline = clock.monotonic() + body.deadline_ms / 1000.0
        outcome = await runtime.serve(
            EmbedRequest(
                request_id=body.request_id or uuid.uuid4().hex,
                texts=body.texts,
                priority=body.priority,
                deadline=deadline,
            )
        )
        headers = {"Retry-After": "1"} if outcome.status is InferStatus.OVERLOADED else None
        return Response(
            json.dumps(outcome_json(outcome)),
            status_code=HTTP_STATUS[outcome.status],
            media_type="application/json",
            headers=headers,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runtime.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "variant": runtime.model.variant,
            "device": runtime.model.device,
            "queue_items": runtime.queued_items,
        }

    return app


class HttpIngress:
    """uvicorn serving ``app`` on the current event loop; ``start`` returns the bound port."""

    def __init__(self, app: FastAPI, *, host: str, port: int) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._host = host
        self._port = port
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self, *, timeout_s: float = 10.0) -> int:
        self._task = asyncio.get_running_loop().create_task(self._serve())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._server.started:
            if self._task.done() or loop.time() > deadline:
                raise IngressError(f"HTTP ingress could not listen on {self._host}:{self._port}")
            await asyncio.sleep(0.01)
        sockets = [s for server in self._server.servers for s in server.sockets]
        self.port = int(sockets[0].getsockname()[1])
        logger.info("http ingress listening", extra={"host": self._host, "port": self.port})
        return self.port

    async def _serve(self) -> None:
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn exits when it cannot bind
            logger.error("http ingress stopped: cannot listen on %s:%s", self._host, self._port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=5.0)
        except TimeoutError:
            self._task.cancel()
        self._task = None
