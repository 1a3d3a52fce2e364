"""A cap on request bodies, enforced before the body is read in full.

A declared ``Content-Length`` above the limit is answered 413 at once, without reading a
byte; a body sent without one (chunked) is counted as it arrives and refused the moment
it passes the limit. Model uploads have their own, larger limit (``limit_for``). The
answer is ``{"detail": "..."}`` like every other error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPART_OVERHEAD_BYTES = 1024 * 1024
"""Room for an upload's manifest (at most 64 KiB), part headers and boundaries."""
_UPLOAD_PATH = re.compile(r"^/api/v1/models/.+/versions$")


def limit_for(method: str, path: str, *, max_request_body_bytes: int, max_upload_bytes: int) -> int:
    """The body limit of one request: uploads carry an artifact and a tokenizer."""
    if method == "POST" and _UPLOAD_PATH.match(path):
        return 2 * max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    return max_request_body_bytes


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes its limit; FastAPI re-raises
    HTTP exceptions met while reading a body, and the app renders it as a 413."""

    def __init__(self, limit: int, *, size: int | None = None) -> None:
        what = f"request body of {size} bytes" if size is not None else "request body"
        super().__init__(413, f"{what} exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limit: Callable[[str, str], int]) -> None:
        self.app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, BodyTooLarge(limit, size=declared).detail)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
