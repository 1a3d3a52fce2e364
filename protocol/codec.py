"""Encoding and checked decoding of payloads.

``decode`` never lets a bad payload through and never raises anything but
``DecodeError``; ``RejectCounter`` is how receivers log and count what they drop::

    DecodeError                 permanent: the payload is dropped, retrying cannot help
    ├── OversizedMessage        more bytes than the receiver accepts
    ├── MalformedMessage        not JSON, not an object, or fails the model's validation
    └── UnsupportedVersion      schema_version outside SUPPORTED_VERSIONS
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from protocol.messages import SUPPORTED_VERSIONS, Envelope

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024

M = TypeVar("M", bound=Envelope)


class DecodeError(ValueError):
    """A payload that cannot be accepted. ``reason`` is a short metric label."""

    reason = "invalid"


class OversizedMessage(DecodeError):
    reason = "oversized"


class MalformedMessage(DecodeError):
    reason = "malformed"


class UnsupportedVersion(DecodeError):
    reason = "unsupported_version"


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode(payload: bytes, model: type[M], *, max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Parse ``payload`` as ``model`` or raise a ``DecodeError`` saying why not.

    Fast path: pydantic parses and validates the bytes in one pass, in strict mode (JSON
    types must already be right: an integer is an integer, not ``"1"`` or ``1.0``), and the
    message is taken when it names a supported ``schema_version`` itself. Anything else,
    which a well-behaved sender never sends, goes the checked way (``json.loads``, the
    version, then lax validation): it accepts and refuses exactly what it always did and
    says why. Whatever strict validation accepts, lax validation of the same JSON gives
    the same message, so the fast path changes only the cost.
    """
    if len(payload) > max_bytes:
        raise OversizedMessage(f"{len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        message = model.model_validate_json(payload, strict=True)
    except ValidationError:
        pass
    else:
        if "schema_version" in message.model_fields_set and (
            message.schema_version in SUPPORTED_VERSIONS
        ):
            return message
    return _decode_checked(payload, model)


def _decode_checked(payload: bytes, model: type[M]) -> M:
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"schema_version {version!r} not in supported {sorted(SUPPORTED_VERSIONS)}"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise MalformedMessage(
            f"{model.__name__}: {where}: {first['msg']} ({exc.error_count()} error(s))"
        ) from exc


class RejectCounter:
    """Counts dropped inbound messages by (channel, reason) and logs each one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def reject(self, channel: str, reason: str, detail: str, *, topic: str) -> None:
        with self._lock:
            self._counts[(channel, reason)] += 1
        logger.warning(
            "rejected inbound message",
            extra={"topic": topic, "channel": channel, "reason": reason, "detail": detail},
        )

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
