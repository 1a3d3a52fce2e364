"""The topic tree, built in one place.

No other module formats a topic string: callers ask ``Topics`` for a topic and
``Topics.parse_device`` to take one apart. Each channel carries its QoS and retain
conventions, so a publisher cannot pick them by accident.

Tree (``{root}`` defaults to ``spillway/v1``)::

    {root}/devices/{device_id}/hello      agent -> cloud   QoS 1
    {root}/devices/{device_id}/status     agent -> cloud   QoS 1, retained, Last Will
    {root}/devices/{device_id}/heartbeat  agent -> cloud   QoS 0
    {root}/devices/{device_id}/telemetry  agent -> cloud   QoS 0
    {root}/devices/{device_id}/reported   agent -> cloud   QoS 1
    {root}/devices/{device_id}/desired    cloud -> agent   QoS 1, retained
    {root}/devices/{device_id}/results    agent -> cloud   QoS 1   (outbox uplink)
    {root}/devices/{device_id}/acks       cloud -> agent   QoS 1   (after the cloud's commit)
    {root}/devices/{device_id}/infer      local app -> agent, QoS 1, answer on response topic
    {root}/pool/requests                  edge/gateway -> pool, QoS 1, shared subscription
    {root}/pool/status                    pool -> edges, QoS 1, retained back-pressure
    {root}/models/chunks                  agent -> controller, QoS 1, chunk requests (shared)
    {root}/replies/{client_id}            answers to a client's requests (response topic)
    {root}/replies/{client_id}/chunks     a client's artifact chunks (framed ChunkResponse)
    {root}/artifacts/{sha256}/chunks      controller -> agents downloading that artifact, QoS 1,
                                          framed ChunkResponse (broadcast: the broker fans out)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum

DEFAULT_ROOT = "spillway/v1"

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class QoS(IntEnum):
    """MQTT delivery guarantees as used by Spillway."""

    AT_MOST_ONCE = 0
    AT_LEAST_ONCE = 1


@dataclass(frozen=True)
class ChannelSpec:
    """How messages on one channel travel."""

    qos: QoS
    retain: bool
    direction: str  # "up" (agent -> cloud) or "down" (cloud -> agent)


class DeviceChannel(StrEnum):
    """Per-device channels; the value is the last topic level."""

    HELLO = "hello"
    STATUS = "status"
    HEARTBEAT = "heartbeat"
    TELEMETRY = "telemetry"
    REPORTED = "reported"
    DESIRED = "desired"
    RESULTS = "results"
    ACKS = "acks"
    INFER = "infer"

    @property
    def spec(self) -> ChannelSpec:
        return _SPECS[self]


_SPECS: dict[DeviceChannel, ChannelSpec] = {
    DeviceChannel.HELLO: ChannelSpec(QoS.AT_LEAST_ONCE, retain=False, direction="up"),
    DeviceChannel.STATUS: ChannelSpec(QoS.AT_LEAST_ONCE, retain=True, direction="up"),
    DeviceChannel.HEARTBEAT: ChannelSpec(QoS.AT_MOST_ONCE, retain=False, direction="up"),
    DeviceChannel.TELEMETRY: ChannelSpec(QoS.AT_MOST_ONCE, retain=False, direction="up"),
    DeviceChannel.REPORTED: ChannelSpec(QoS.AT_LEAST_ONCE, retain=False, direction="up"),
    DeviceChannel.DESIRED: ChannelSpec(QoS.AT_LEAST_ONCE, retain=True, direction="down"),
    DeviceChannel.RESULTS: ChannelSpec(QoS.AT_LEAST_ONCE, retain=False, direction="up"),
    DeviceChannel.ACKS: ChannelSpec(QoS.AT_LEAST_ONCE, retain=False, direction="down"),
    DeviceChannel.INFER: ChannelSpec(QoS.AT_LEAST_ONCE, retain=False, direction="down"),
}


class InvalidTopic(ValueError):
    """A topic or device id that does not fit the tree."""


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is usable as one topic level, else raise ``InvalidTopic``."""
    if not _DEVICE_ID.match(device_id):
        raise InvalidTopic(
            f"device id {device_id!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return device_id


@dataclass(frozen=True)
class DeviceTopic:
    """A parsed per-device topic."""

    device_id: str
    channel: DeviceChannel


@dataclass(frozen=True)
class Topics:
    """Builds and parses every topic under one root."""

    root: str = DEFAULT_ROOT

    def device(self, device_id: str, channel: DeviceChannel) -> str:
        return f"{self.root}/devices/{validate_device_id(device_id)}/{channel.value}"

    def all_devices(self, channel: DeviceChannel) -> str:
        """Wildcard subscription for one channel of every device."""
        return f"{self.root}/devices/+/{channel.value}"

    def pool_requests(self) -> str:
        return f"{self.root}/pool/requests"

    def pool_requests_shared(self, group: str = "pool") -> str:
        """What pool workers subscribe to: each request goes to one of them."""
        return f"$share/{group}/{self.pool_requests()}"

    def pool_status(self) -> str:
        return f"{self.root}/pool/status"

    def model_chunks(self) -> str:
        return f"{self.root}/models/chunks"

    def model_chunks_shared(self, group: str = "controllers") -> str:
        """What controllers subscribe to, so several replicas share transfers."""
        return f"$share/{group}/{self.model_chunks()}"

    def replies(self, client_id: str) -> str:
        """A client's own response topic for request/response."""
        return f"{self.root}/replies/{validate_device_id(client_id)}"

    def chunk_replies(self, client_id: str) -> str:
        """Where a client's chunk answers come: below its reply topic, apart from the
        inference answers on the reply topic itself."""
        return f"{self.replies(client_id)}/chunks"

    def artifact_chunks(self, sha256: str) -> str:
        """Where the chunks of one artifact are published once for every agent downloading
        it (each subscribes while it downloads and names this topic as its response topic)."""
        if not _SHA256.match(sha256):
            raise InvalidTopic(f"{sha256!r} is not a lowercase hex sha256")
        return f"{self.root}/artifacts/{sha256}/chunks"

    def parse_device(self, topic: str) -> DeviceTopic:
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            raise InvalidTopic(f"topic {topic!r} is not under {prefix!r}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2:
            raise InvalidTopic(f"topic {topic!r} is not {prefix}<device>/<channel>")
        device_id, channel = parts
        try:
            return DeviceTopic(validate_device_id(device_id), DeviceChannel(channel))
        except ValueError as exc:
            raise InvalidTopic(f"topic {topic!r}: {exc}") from exc
