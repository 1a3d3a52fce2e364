"""Liveness, readiness and metrics: what an orchestrator and Prometheus ask.

``/healthz`` only says the process answers; ``/readyz`` says whether it can do its job
(database answers ``SELECT 1`` and the bridge is connected) and, when not, which part
failed; ``/metrics`` renders the app's own registry.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from cloud_controller.database import DatabaseError, ping
from cloud_controller.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(runtime: RuntimeDep) -> dict[str, str]:
    return {"status": "ok", "timestamp": runtime.clock().isoformat()}


@router.get("/readyz", responses={503: {"description": "A dependency is down"}})
def readyz(runtime: RuntimeDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        ping(runtime.engine)
        checks["database"] = "ok"
    except DatabaseError as exc:
        checks["database"] = f"failed: {exc}"
    checks["mqtt"] = "ok" if runtime.bridge.is_connected else "failed: not connected to broker"
    ready = all(value == "ok" for value in checks.values())
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": checks}
    if not ready:
        body["failed"] = sorted(name for name, value in checks.items() if value != "ok")
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
