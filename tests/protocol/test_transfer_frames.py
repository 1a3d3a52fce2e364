from __future__ import annotations

import hashlib

import pytest

from protocol.codec import MalformedMessage, OversizedMessage
from protocol.transfer import ChunkResponse, ChunkStatus, decode_chunk, encode_chunk

DIGEST = "ab" * 32


def _chunk(data: bytes, offset: int = 0) -> ChunkResponse:
    return ChunkResponse(
        device_id="edge-1",
        artifact_sha256=DIGEST,
        status=ChunkStatus.OK,
        offset=offset,
        length=len(data),
        total_bytes=10_000,
        chunk_sha256=hashlib.sha256(data).hexdigest(),
    )


def test_frame_round_trip_carries_raw_bytes() -> None:
    data = bytes(range(256)) * 40
    frame = encode_chunk(_chunk(data, offset=512), data)
    assert len(frame) < len(data) + 1024  # raw bytes, not base64
    header, back = decode_chunk(frame, max_bytes=1 << 20)
    assert back == data and header.offset == 512


@pytest.mark.parametrize(
    ("mangle", "says"),
    [
        (lambda f: f[:-1], "header says"),
        (lambda f: f + b"x", "header says"),
        (lambda f: f[:-1] + bytes([f[-1] ^ 1]), "sha256"),
        (lambda f: b"\xff\xff\xff\xff" + f[4:], "does not fit"),
        (lambda f: b"\x00", "shorter"),
    ],
)
def test_damaged_frames_are_refused(mangle: object, says: str) -> None:
    data = b"spillway" * 100
    frame = encode_chunk(_chunk(data), data)
    with pytest.raises(MalformedMessage, match=says):
        decode_chunk(mangle(frame), max_bytes=1 << 20)  # type: ignore[operator]


def test_oversized_frame_is_refused() -> None:
    data = b"x" * 2048
    with pytest.raises(OversizedMessage):
        decode_chunk(encode_chunk(_chunk(data), data), max_bytes=1024)


def test_header_must_describe_the_data() -> None:
    with pytest.raises(ValueError, match="header says 3"):
        encode_chunk(_chunk(b"abc"), b"abcd")
