"""Artifact transfer over MQTT: pulled in chunks with request/response.

An agent asks for ``length`` bytes at ``offset`` of the artifact named by its sha256
(``ChunkRequest`` on ``Topics.model_chunks()``, response topic + correlation data); the
controller answers on the response topic with a framed ``ChunkResponse``. Agents name the
artifact's broadcast topic (``Topics.artifact_chunks(sha256)``) as response topic and listen
on it while they download, so one publish of a chunk answers every agent that asked for it
(and reaches those that will): ``listener`` tells the controller which subscription a
request comes from, so it never counts on a publish that subscription cannot have seen.
An agent says when it starts listening (``TransferListening``: from then on every publish
reaches it) and when it ends a download (``TransferDone``, which frees its transfer slot).
The answer frame is a small JSON
header followed by the raw bytes, so a 1 MiB chunk costs 1 MiB on the wire, not the 1.33
MiB base64 would. The header carries the chunk's own sha256, so every chunk is checked on
arrival and a download resumes from the last verified offset::

    frame = u32 big-endian header length | header JSON | chunk bytes

Decoding errors are the codec's (``MalformedMessage``, ``OversizedMessage``,
``UnsupportedVersion``), plus ``MalformedMessage`` for a frame whose bytes do not match
its header.
"""

from __future__ import annotations

import hashlib
import struct
from enum import StrEnum
from typing import Literal

from pydantic import Field

from protocol.codec import MalformedMessage, OversizedMessage, decode, encode
from protocol.messages import Envelope

DEFAULT_CHUNK_BYTES = 1024 * 1024 - 4096
"""Brokers cap packets (EMQX: 1 MiB by default): this chunk plus its header fits that cap."""
MAX_CHUNK_BYTES = 4 * 1024 * 1024
_HEADER_LIMIT = 16 * 1024
_LEN = struct.Struct(">I")

SHA256_PATTERN = r"^[0-9a-f]{64}$"


class ChunkStatus(StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"
    """No artifact with that digest (deprecated or never registered)."""
    BAD_RANGE = "bad_range"
    BUSY = "busy"
    """The controller is at its concurrent-transfer bound: ask again after ``retry_after_ms``."""


LISTENER_PATTERN = r"^[0-9a-f]{32}$"


class ChunkRequest(Envelope):
    kind: Literal["chunk_request"] = "chunk_request"
    artifact_sha256: str = Field(pattern=SHA256_PATTERN)
    offset: int = Field(ge=0)
    length: int = Field(ge=1, le=MAX_CHUNK_BYTES)
    listener: str | None = Field(default=None, pattern=LISTENER_PATTERN)
    """With a broadcast response topic: an id the agent draws each time it (re)subscribes
    to that topic. The controller answers it with a publish made after it first saw this
    id (the subscription was in place by then), never with an earlier one."""
    attempt: int = Field(default=1, ge=1)
    """How many times this chunk has been asked for in this download; past the first, the
    controller publishes it again rather than count on an earlier publish."""


class TransferListening(Envelope):
    """An agent subscribed to ``artifact_sha256``'s broadcast topic as ``listener`` (sent
    right after the SUBSCRIBE, so the broker holds the subscription by the time the
    controller reads this): every chunk publish that begins later reaches it, so its
    requests can join publishes already under way instead of causing new ones."""

    kind: Literal["transfer_listening"] = "transfer_listening"
    artifact_sha256: str = Field(pattern=SHA256_PATTERN)
    listener: str = Field(pattern=LISTENER_PATTERN)


class TransferDone(Envelope):
    """An agent stopped downloading ``artifact_sha256`` (finished, failed or cancelled)."""

    kind: Literal["transfer_done"] = "transfer_done"
    artifact_sha256: str = Field(pattern=SHA256_PATTERN)


TransferMessage = ChunkRequest | TransferListening | TransferDone
"""What travels on ``Topics.model_chunks()``."""


def decode_transfer_message(payload: bytes, *, max_bytes: int) -> TransferMessage:
    """A ``ChunkRequest``, ``TransferListening`` or ``TransferDone``."""
    try:
        return decode(payload, ChunkRequest, max_bytes=max_bytes)
    except MalformedMessage as first:
        try:
            return decode(payload, TransferListening, max_bytes=max_bytes)
        except MalformedMessage:
            pass
        try:
            return decode(payload, TransferDone, max_bytes=max_bytes)
        except MalformedMessage:
            raise first from None


class ChunkResponse(Envelope):
    kind: Literal["chunk_response"] = "chunk_response"
    artifact_sha256: str = Field(pattern=SHA256_PATTERN)
    status: ChunkStatus
    offset: int = Field(ge=0)
    length: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    chunk_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    retry_after_ms: int | None = Field(default=None, ge=0)
    detail: str | None = Field(default=None, max_length=500)


def encode_chunk(header: ChunkResponse, data: bytes) -> bytes:
    """Frame ``header`` and ``data``; the header's length and digest must describe ``data``."""
    if header.length != len(data):
        raise ValueError(f"header says {header.length} bytes, data has {len(data)}")
    raw = encode(header)
    return _LEN.pack(len(raw)) + raw + data


def read_chunk_frame(payload: bytes, *, max_bytes: int) -> tuple[ChunkResponse, memoryview]:
    """Unframe one chunk and check its length against the header, without hashing it: a
    receiver that already has this chunk can drop it here (``check_chunk`` before use)."""
    if len(payload) > max_bytes:
        raise OversizedMessage(f"{len(payload)} bytes exceeds the limit of {max_bytes}")
    if len(payload) < _LEN.size:
        raise MalformedMessage("chunk frame shorter than its length prefix")
    (header_len,) = _LEN.unpack_from(payload)
    if header_len > _HEADER_LIMIT or _LEN.size + header_len > len(payload):
        raise MalformedMessage(f"chunk header length {header_len} does not fit the frame")
    view = memoryview(payload)
    header = decode(bytes(view[_LEN.size : _LEN.size + header_len]), ChunkResponse)
    data = view[_LEN.size + header_len :]
    if len(data) != header.length:
        raise MalformedMessage(f"chunk has {len(data)} bytes, header says {header.length}")
    return header, data


def check_chunk(header: ChunkResponse, data: bytes | memoryview) -> None:
    """An ``ok`` chunk's bytes must match the sha256 its header carries."""
    if header.status is ChunkStatus.OK and hashlib.sha256(data).hexdigest() != header.chunk_sha256:
        raise MalformedMessage(f"chunk at offset {header.offset} fails its sha256")


def decode_chunk(payload: bytes, *, max_bytes: int) -> tuple[ChunkResponse, bytes]:
    """Unframe and check one chunk: length and sha256 must match the header."""
    header, data = read_chunk_frame(payload, max_bytes=max_bytes)
    check_chunk(header, data)
    return header, bytes(data)
