"""Desired state: PUT bumps the generation, the retained message carries it, and the
controller republishes it after reconnecting to a broker that lost everything."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from protocol.codec import decode
from protocol.messages import DesiredState
from protocol.topics import DeviceChannel
from sim.broker import MosquittoBroker
from tests.controller.helpers import Controller, Recorder, SimAgent, mqtt_client, wait_for


def _retained_generation(broker: MosquittoBroker, topic: str, client_id: str) -> int | None:
    """What a fresh subscriber gets as the retained message on ``topic`` (None: nothing)."""
    client = mqtt_client(broker, client_id)
    try:
        recorder = Recorder(client, topic)
        if not wait_for(lambda: bool(recorder.snapshot()), timeout_s=3):
            return None
        message = recorder.snapshot()[-1]
        desired = decode(message.payload, DesiredState)
        return desired.generation
    finally:
        client.stop()


def test_put_bumps_generation_and_publishes_retained(
    controller: Controller, broker: MosquittoBroker, agents: Callable[..., SimAgent]
) -> None:
    agent = agents("dev-1")
    agent.hello()
    assert wait_for(lambda: controller.has_device("dev-1", status="online"))
    topic = agent.topic(DeviceChannel.DESIRED)

    first = controller.http.put("/api/v1/devices/dev-1/desired", json={"policy": {"a": 1}})
    assert first.status_code == 200, first.text
    assert first.json() == {"device_id": "dev-1", "generation": 1, "policy": {"a": 1}}
    second = controller.http.put("/api/v1/devices/dev-1/desired", json={"policy": {"a": 2}})
    assert second.json()["generation"] == 2

    assert _retained_generation(broker, topic, "watcher-1") == 2
    body = controller.device("dev-1")
    assert body["desired"]["generation"] == 2 and body["desired"]["policy"] == {"a": 2}

    agent.report(2)
    assert wait_for(
        lambda: (controller.device("dev-1")["reported"] or {}).get("outcome") == "applied"
    )
    reported = controller.device("dev-1")["reported"]
    assert reported["observed_generation"] == 2 and reported["error"] is None

    agent.report(1)  # a late report about an older generation does not go backwards
    assert wait_for(
        lambda: (
            controller.metric(
                "spillway_mqtt_ignored_total", channel="reported", reason="stale_generation"
            )
            == 1
        )
    )
    assert controller.device("dev-1")["reported"]["observed_generation"] == 2


def test_put_rejects_unknown_fields(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    agents("dev-1").hello()
    assert wait_for(lambda: controller.has_device("dev-1"))
    extra = controller.http.put(
        "/api/v1/devices/dev-1/desired", json={"policy": {}, "generation": 99}
    )
    assert extra.status_code == 422
    assert extra.json()["detail"][0]["loc"] == ["body", "generation"]
    assert controller.http.put("/api/v1/devices/dev-1/desired", json={}).status_code == 200
    assert controller.device("dev-1")["desired"]["generation"] == 1


def test_desired_state_is_republished_after_the_broker_loses_it(
    make_controller: Callable[..., Controller],
    database_url: str,
    broker: MosquittoBroker,
    agents: Callable[..., SimAgent],
) -> None:
    controller = make_controller(database_url)
    agent = agents("dev-1")
    agent.hello()
    assert wait_for(lambda: controller.has_device("dev-1"))
    generation = controller.http.put(
        "/api/v1/devices/dev-1/desired", json={"policy": {"model": "m1"}}
    ).json()["generation"]
    topic = agent.topic(DeviceChannel.DESIRED)
    assert _retained_generation(broker, topic, "watcher-1") == generation

    broker.stop()
    (broker.data_dir / "mosquitto.db").unlink(missing_ok=True)  # the retained store is gone
    assert wait_for(lambda: not controller.bridge.is_connected)
    assert controller.http.get("/readyz").status_code == 503
    broker.start()

    assert wait_for(lambda: controller.bridge.is_connected, timeout_s=15)
    assert wait_for(lambda: controller.http.get("/readyz").status_code == 200)
    assert controller.metric("spillway_mqtt_reconnects_total") >= 1
    assert wait_for(
        lambda: _retained_generation(broker, topic, "watcher-2") == generation, timeout_s=10
    )


def test_readyz_says_which_dependency_failed(
    controller: Controller, broker: MosquittoBroker
) -> None:
    ready = controller.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "mqtt": "ok"}
    health = controller.http.get("/healthz").json()
    assert health["status"] == "ok" and health["timestamp"].startswith("2030-01-01")

    broker.stop()
    assert wait_for(lambda: controller.http.get("/readyz").status_code == 503)
    body = controller.http.get("/readyz").json()
    assert body["failed"] == ["mqtt"] and body["checks"]["database"] == "ok"
    assert controller.metric("spillway_mqtt_connected") == 0
    assert controller.http.get("/healthz").status_code == 200

    broker.start()
    assert wait_for(lambda: controller.http.get("/readyz").status_code == 200, timeout_s=15)


def test_metrics_are_per_app(make_controller: Callable[..., Controller], tmp_path: Path) -> None:
    one = make_controller(f"sqlite:///{tmp_path / 'one.db'}", mqtt_client_id="controller-one")
    two = make_controller(f"sqlite:///{tmp_path / 'two.db'}", mqtt_client_id="controller-two")
    text = one.http.get("/metrics").text
    assert "spillway_mqtt_connects_total 1.0" in text
    assert "spillway_devices" in text and "spillway_mqtt_rejected_total" in text
    assert two.metric("spillway_mqtt_connects_total") == 1


def test_many_devices_are_amended_in_one_go_and_each_published(
    controller: Controller, broker: MosquittoBroker, agents: Callable[..., SimAgent]
) -> None:
    for device_id in ("dev-m1", "dev-m2"):
        agents(device_id).hello()
    assert wait_for(lambda: controller.has_device("dev-m2", status="online"))
    controller.http.put("/api/v1/devices/dev-m1/desired", json={"policy": {"keep": 1}})

    sent = controller.bridge.amend_desired_many(
        ["dev-m1", "dev-m2", "nobody"], lambda current: {**current, "model": "m"}
    )
    assert sent["dev-m1"] == 2 and sent["dev-m2"] == 1
    assert "nobody" in str(sent["nobody"]) and not isinstance(sent["nobody"], int)
    body = controller.http.get("/api/v1/devices/dev-m1").json()
    assert body["desired"]["policy"] == {"keep": 1, "model": "m"}, body
    topic = agents("dev-m2").topic(DeviceChannel.DESIRED)
    assert _retained_generation(broker, topic, "amend-many-reader") == 1
