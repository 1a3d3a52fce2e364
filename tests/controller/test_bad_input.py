"""Garbage on device topics is rejected, logged and counted; the bridge keeps working."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from protocol.codec import encode
from protocol.messages import Hello, RuntimeCapabilities
from protocol.topics import DeviceChannel, QoS
from tests.controller.helpers import Controller, SimAgent, wait_for


def test_bad_payloads_are_counted_and_a_valid_hello_still_registers(
    make_controller: Callable[..., Controller],
    agents: Callable[..., SimAgent],
    database_url: str,
) -> None:
    controller = make_controller(database_url, max_payload_bytes=4096)
    sender = agents("dev-a")
    hello_topic = sender.topic(DeviceChannel.HELLO)
    valid = json.loads(encode(_hello_of(sender)))

    def send(topic: str, payload: bytes) -> None:
        sender.client.publish(topic, payload, qos=QoS.AT_LEAST_ONCE, wait_s=5)

    send(hello_topic, b"{not json")
    send(hello_topic, b"[1, 2, 3]")
    send(hello_topic, json.dumps({**valid, "padding": "x" * 5000}).encode())
    send(hello_topic, json.dumps({**valid, "schema_version": 99}).encode())
    send(hello_topic, json.dumps({**valid, "device_id": "dev-b"}).encode())
    send(hello_topic, json.dumps({**valid, "boot_epoch": -1}).encode())
    send(sender.topic(DeviceChannel.HEARTBEAT), b"\xff\xfe")
    send("spillway/v1/devices/dev-a/extra/hello", b"{}")  # not a device topic: not ours

    expected = {
        ("hello", "malformed"): 3,
        ("hello", "oversized"): 1,
        ("hello", "unsupported_version"): 1,
        ("hello", "device_mismatch"): 1,
        ("heartbeat", "malformed"): 1,
    }

    def counted() -> bool:
        return all(
            controller.metric("spillway_mqtt_rejected_total", channel=c, reason=r) == n
            for (c, r), n in expected.items()
        )

    assert wait_for(counted), controller.bridge.rejects.snapshot()
    assert controller.bridge.rejects.snapshot() == expected
    assert controller.http.get("/api/v1/devices").json()["total"] == 0

    sender.hello()
    assert wait_for(lambda: controller.has_device("dev-a", status="online"))
    assert controller.bridge.rejects.total() == sum(expected.values())
    assert controller.bridge._client.handler_errors == 0


def test_a_cleared_retained_status_is_not_an_error(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    agent = agents("dev-a")
    agent.hello()
    assert wait_for(lambda: controller.has_device("dev-a", status="online"))
    agent.client.publish(
        agent.topic(DeviceChannel.STATUS), b"", qos=QoS.AT_LEAST_ONCE, retain=True, wait_s=5
    )
    agent.heartbeat()
    assert wait_for(
        lambda: controller.metric("spillway_mqtt_messages_total", channel="heartbeat") == 1
    )
    assert controller.bridge.rejects.total() == 0
    assert controller.device("dev-a")["status"] == "online"


def test_storage_failure_is_counted_not_raised(
    make_controller: Callable[..., Controller],
    agents: Callable[..., SimAgent],
    tmp_path: Path,
) -> None:
    controller = make_controller(f"sqlite:///{tmp_path / 'c.db'}", ingest_retry_s=0.2)
    with controller.app.state.runtime.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE device_labels")
    agent = agents("dev-a")
    agent.hello(labels={"site": "lab"})
    assert wait_for(
        lambda: (
            controller.metric(
                "spillway_mqtt_rejected_total", channel="hello", reason="storage_error"
            )
            == 1
        )
    )
    agent.heartbeat()  # the device was never stored: ignored, not an error
    assert wait_for(
        lambda: (
            controller.metric(
                "spillway_mqtt_ignored_total", channel="heartbeat", reason="unknown_device"
            )
            == 1
        )
    )
    assert controller.bridge.is_connected


def _hello_of(agent: SimAgent) -> Hello:
    return Hello(
        device_id=agent.device_id,
        hardware_class="orin",
        agent_version="0.1.0",
        capabilities=RuntimeCapabilities(memory_mb=1024, cpu_count=2),
        boot_epoch=1,
        keepalive_s=5,
    )


def test_a_busy_database_delays_messages_without_blocking_mqtt_or_losing_them(
    make_controller: Callable[..., Controller],
    agents: Callable[..., SimAgent],
    tmp_path: Path,
) -> None:
    database = tmp_path / "c.db"
    controller = make_controller(f"sqlite:///{database}")
    agent = agents("dev-a")
    locker = sqlite3.connect(database, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # every writer now waits
        agent.hello()
        agent.heartbeat()
        agent.client.publish(
            agent.topic(DeviceChannel.TELEMETRY), b"garbage", qos=QoS.AT_LEAST_ONCE, wait_s=5
        )
        # Decoding and rejecting go on while the database is held ...
        assert wait_for(lambda: controller.bridge.rejects.total() == 1)
        assert not controller.bridge.wait_idle(0.2)
    finally:
        locker.execute("COMMIT")
        locker.close()
    # ... and what waited is applied, in order, once it is free.
    assert controller.bridge.wait_idle(10)
    assert controller.has_device("dev-a", status="online")
    assert controller.metric("spillway_mqtt_messages_total", channel="heartbeat") == 1
    assert controller.metric("spillway_mqtt_rejected_total", channel="hello") == 0
