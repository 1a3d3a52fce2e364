"""Request ids: taken from ``X-Request-ID`` (or made), echoed back, seen by logs and audit.

An ASGI middleware puts the id in a context variable for the duration of the request;
``current()`` reads it (the audit log stores it) and ``install_log_field()``, called once
at the entry point, adds it as ``request_id`` to every log record made meanwhile. A
client's id is kept when it is short and plain (``[A-Za-z0-9._:-]``, at most 128
characters), otherwise replaced, so it is safe in logs and headers.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
MAX_CHARS = 128
_PLAIN = re.compile(rf"^[A-Za-z0-9._:-]{{1,{MAX_CHARS}}}$")
_current: ContextVar[str | None] = ContextVar("spillway_request_id", default=None)


def current() -> str | None:
    """The id of the request being served, None outside a request."""
    return _current.get()


def accept(value: str | None) -> str:
    """The client's id when usable, a fresh one otherwise."""
    if value is not None and _PLAIN.match(value):
        return value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Sets the request id for the request and adds it to the response's headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = HEADER.lower().encode()
        given = next((v for k, v in scope["headers"] if k == header), None)
        request_id = accept(given.decode("latin-1") if given is not None else None)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


def install_log_field() -> None:
    """Give every log record made during a request a ``request_id`` field (idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_spillway_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        request_id = _current.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return record

    factory._spillway_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
