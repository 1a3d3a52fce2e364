"""Spillway's wire contract: topics, QoS conventions, versioned payloads and the MQTT adapter.

Both sides import this package; it imports neither side. Every topic string is built
here (``topics``), every payload is a versioned pydantic model (``messages``), every
inbound payload passes ``codec.decode`` which classes what is wrong with it, and every
MQTT conversation goes through the one paho adapter (``mqtt``).
"""

from protocol.codec import (
    DecodeError,
    MalformedMessage,
    OversizedMessage,
    RejectCounter,
    UnsupportedVersion,
    decode,
    encode,
)
from protocol.messages import (
    SCHEMA_VERSION,
    DesiredState,
    DeviceStatus,
    Heartbeat,
    Hello,
    Presence,
    ReportedState,
    Telemetry,
)
from protocol.topics import DeviceChannel, QoS, Topics

__all__ = [
    "SCHEMA_VERSION",
    "DecodeError",
    "DesiredState",
    "DeviceChannel",
    "DeviceStatus",
    "Heartbeat",
    "Hello",
    "MalformedMessage",
    "OversizedMessage",
    "Presence",
    "QoS",
    "RejectCounter",
    "ReportedState",
    "Telemetry",
    "Topics",
    "UnsupportedVersion",
    "decode",
    "encode",
]
