from __future__ import annotations

from types import ModuleType

import pytest

import protocol
from protocol.topics import DeviceChannel, InvalidTopic, QoS, Topics


def test_public_api_is_exactly_all() -> None:
    public = {
        name
        for name in dir(protocol)
        if not name.startswith("_") and not isinstance(getattr(protocol, name), ModuleType)
    }
    assert public == set(protocol.__all__)


def test_device_topics_round_trip() -> None:
    topics = Topics()
    for channel in DeviceChannel:
        topic = topics.device("jetson-01", channel)
        parsed = topics.parse_device(topic)
        assert (parsed.device_id, parsed.channel) == ("jetson-01", channel)


def test_wildcards_and_root() -> None:
    topics = Topics(root="acme/v1")
    assert topics.all_devices(DeviceChannel.HELLO) == "acme/v1/devices/+/hello"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x" * 65, "-lead"])
def test_bad_device_ids_rejected(bad: str) -> None:
    with pytest.raises(InvalidTopic):
        Topics().device(bad, DeviceChannel.HELLO)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/devices/a/hello",
        "spillway/v1/devices/a/unknown",
        "spillway/v1/devices/a/hello/extra",
        "spillway/v1/devices/a+b/hello",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(InvalidTopic):
        Topics().parse_device(topic)


def test_channel_conventions() -> None:
    assert DeviceChannel.DESIRED.spec.retain and DeviceChannel.STATUS.spec.retain
    assert DeviceChannel.REPORTED.spec.qos is QoS.AT_LEAST_ONCE
    assert not DeviceChannel.HEARTBEAT.spec.retain
