from __future__ import annotations

import json

import pytest

from protocol.codec import (
    MalformedMessage,
    OversizedMessage,
    RejectCounter,
    UnsupportedVersion,
    decode,
    encode,
)
from protocol.messages import DesiredState, Hello, RuntimeCapabilities


def _hello() -> Hello:
    return Hello(
        device_id="d1",
        hardware_class="jetson-orin-nano",
        agent_version="0.1.0",
        capabilities=RuntimeCapabilities(memory_mb=8192, cpu_count=6),
        boot_epoch=1,
        keepalive_s=10,
    )


def test_round_trip_keeps_envelope() -> None:
    hello = _hello()
    back = decode(encode(hello), Hello)
    assert back == hello
    assert back.schema_version == 1 and len(back.message_id) == 32


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = json.loads(encode(_hello()))
    raw["added_in_a_later_minor"] = 1
    assert decode(json.dumps(raw).encode(), Hello).device_id == "d1"


@pytest.mark.parametrize(
    ("payload", "error", "says"),
    [
        (b"\xff\xfe", MalformedMessage, "not valid JSON"),
        (b"{not json", MalformedMessage, "not valid JSON"),
        (b"[1, 2]", MalformedMessage, "JSON object"),
        (b'{"schema_version": 99, "device_id": "d1"}', UnsupportedVersion, "99"),
        (b'{"device_id": "d1"}', UnsupportedVersion, "None"),
        (
            b'{"schema_version": 1, "device_id": "d1", "generation": 0}',
            MalformedMessage,
            "generation",
        ),
    ],
)
def test_bad_payloads_are_classed(payload: bytes, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        decode(payload, DesiredState)


def test_oversized_is_refused_before_parsing() -> None:
    with pytest.raises(OversizedMessage):
        decode(b" " * 1025, DesiredState, max_bytes=1024)


def test_reject_counter_counts_by_channel_and_reason() -> None:
    counter = RejectCounter()
    counter.reject("hello", "malformed", "x", topic="t")
    counter.reject("hello", "malformed", "y", topic="t")
    counter.reject("desired", "oversized", "z", topic="t")
    assert counter.snapshot() == {("hello", "malformed"): 2, ("desired", "oversized"): 1}
    assert counter.total() == 3
