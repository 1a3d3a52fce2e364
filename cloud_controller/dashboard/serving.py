"""Serves the dashboard's files with validators: ``Cache-Control: no-cache`` plus a strong
ETag, so a browser revalidates every load (a 304 costs nothing) and never runs a stale
script after an upgrade. Only the files listed in ``ASSETS`` are served."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import RedirectResponse

ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "fleet.js": "text/javascript; charset=utf-8",
    "device.js": "text/javascript; charset=utf-8",
    "rollouts.js": "text/javascript; charset=utf-8",
    "policies.js": "text/javascript; charset=utf-8",
}
"""File name -> media type: the whole front end."""

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class _Asset:
    body: bytes
    etag: str
    media_type: str


@cache
def _asset(name: str) -> _Asset:
    body = resources.files(__package__).joinpath(name).read_bytes()
    return _Asset(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"', ASSETS[name])


def _serve(name: str, request: Request) -> Response:
    asset = _asset(name)
    headers = {
        "ETag": asset.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    if name == "index.html":
        # Everything the page loads comes from this origin; no inline script runs.
        headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        )
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/dashboard")
def dashboard_no_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/dashboard/")
def index(request: Request) -> Response:
    return _serve("index.html", request)


@router.get("/dashboard/{name}")
def asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no dashboard file {name!r}")
    return _serve(name, request)
