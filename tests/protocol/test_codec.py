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
from protocol.messages import DesiredState, Heartbeat, Hello, RuntimeCapabilities


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


def _beat(**changes: object) -> bytes:
    raw: dict[str, object] = {
        "schema_version": 1,
        "device_id": "d1",
        "seq": 3,
        "uptime_s": 2.5,
        "boot_epoch": 1,
    }
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (_beat(), {"seq": 3, "uptime_s": 2.5}),
        (_beat(uptime_s=2), {"uptime_s": 2.0}),  # an integer where a float is expected
        (_beat(seq=3.0), {"seq": 3}),  # a float with an integral value
        (_beat(schema_version=1.0), {"schema_version": 1}),
        (_beat(schema_version=True), {"schema_version": 1}),  # True == 1, as json.loads sees it
        (_beat(seq="3"), {"seq": 3}),  # a numeric string
        ("\ufeff".encode() + _beat(), {"seq": 3}),  # a UTF-8 byte order mark
        (_beat().decode().encode("utf-16"), {"seq": 3}),  # UTF-16, as json.loads detects it
    ],
)
def test_lax_payloads_are_accepted_as_before(payload: bytes, expected: dict[str, object]) -> None:
    """What strict parsing refuses takes the checked path, which accepts what it always did."""
    beat = decode(payload, Heartbeat)
    assert {key: getattr(beat, key) for key in expected} == expected
    assert type(beat.uptime_s) is float and type(beat.seq) is int


@pytest.mark.parametrize(
    ("payload", "error", "says"),
    [
        (_beat(schema_version="1"), UnsupportedVersion, "'1'"),  # not coerced to 1
        (_beat(schema_version=None), UnsupportedVersion, "None"),
        (_beat(schema_version=2), UnsupportedVersion, "2"),
        (_beat(seq=-1), MalformedMessage, "seq"),
        (_beat(device_id="x" * 65), MalformedMessage, "device_id"),
        (b'{"schema_version": 1, "device_id": "d1\ud800"}', MalformedMessage, "device_id"),
    ],
)
def test_the_fast_path_refuses_and_classes_as_before(
    payload: bytes, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        decode(payload, Heartbeat)


def test_a_message_without_schema_version_is_refused_though_the_model_has_a_default() -> None:
    payload = json.dumps({"device_id": "d1", "seq": 1, "uptime_s": 1.0, "boot_epoch": 1})
    with pytest.raises(UnsupportedVersion, match="None"):
        decode(payload.encode(), Heartbeat)


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
