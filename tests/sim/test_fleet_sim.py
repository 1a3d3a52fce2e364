"""Simulated agents speak the real protocol to a real broker: what the controller would see."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from protocol.codec import decode, encode
from protocol.messages import DesiredState, Hello, Presence, ReportedState
from protocol.mqtt import InboundMessage, MqttClient, MqttSettings
from protocol.topics import DeviceChannel, QoS, Topics
from sim.broker import MosquittoBroker
from sim.fleet import FleetProcesses


def _wait(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_simulated_fleet_announces_beats_and_answers_desired_state(
    broker: MosquittoBroker,
) -> None:
    seen: dict[str, list[bytes]] = defaultdict(list)
    lock = threading.Lock()

    def record(msg: InboundMessage) -> None:
        with lock:
            seen[msg.topic.rsplit("/", 1)[1]].append(msg.payload)

    watcher = MqttClient(MqttSettings(host=broker.host, port=broker.port, client_id="watcher"))
    watcher.subscribe("spillway/v1/devices/+/+", record, qos=QoS.AT_LEAST_ONCE)
    watcher.start()
    assert watcher.wait_connected(10)
    time.sleep(0.3)  # SUBACK before the fleet starts
    fleet = FleetProcesses(
        host=broker.host, port=broker.port, agents=6, workers=2, interval_s=0.2, prefix="t"
    )
    fleet.start()
    try:
        assert _wait(lambda: fleet.totals()["connected"] == 6, 30), fleet.errors
        assert _wait(lambda: len(seen["heartbeat"]) >= 12 and len(seen["telemetry"]) >= 12, 15)
        hellos = [decode(p, Hello) for p in seen["hello"]]
        assert sorted(h.device_id for h in hellos) == [f"t-{i:05d}" for i in range(6)]
        assert {h.hardware_class for h in hellos} == {
            "jetson-orin-nano",
            "jetson-orin-nx",
            "jetson-agx-orin",
        }
        assert all(h.labels["simulated"] == "true" for h in hellos)
        assert {decode(p, Presence).status.value for p in seen["status"]} == {"online"}
        desired = DesiredState(device_id="t-00003", generation=7, policy={"slo_ms": 100})
        watcher.publish(
            Topics().device("t-00003", DeviceChannel.DESIRED),
            encode(desired),
            qos=QoS.AT_LEAST_ONCE,
            retain=True,
        )
        assert _wait(lambda: len(seen["reported"]) == 1, 10)
        reported = decode(seen["reported"][0], ReportedState)
        assert (reported.device_id, reported.observed_generation) == ("t-00003", 7)
        assert reported.policy == {"slo_ms": 100}
    finally:
        fleet.stop()
        watcher.stop()
    totals = fleet.totals()
    assert totals["reported"] == 1 and totals["desired_bad"] == 0


def test_an_assigned_model_is_reported_active_and_the_rest_as_applied() -> None:
    from protocol.messages import MODEL_POLICY_KEY
    from sim.fleet import installed_at_once

    plain = {"slo_ms": 250}
    assert installed_at_once(plain) == plain
    assigned = {"slo_ms": 250, MODEL_POLICY_KEY: {"artifact_sha256": "ab" * 32, "variant": "x"}}
    reported = installed_at_once(assigned)
    assert reported[MODEL_POLICY_KEY] == {
        "artifact_sha256": "ab" * 32,
        "variant": "x",
        "state": "active",
    }
    assert reported["slo_ms"] == 250 and "state" not in assigned[MODEL_POLICY_KEY]
    removed = {MODEL_POLICY_KEY: None}
    assert installed_at_once(removed) == removed
