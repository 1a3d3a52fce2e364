"""Devices register over MQTT and appear in REST; presence follows hellos, Wills and epochs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from protocol.codec import encode
from protocol.messages import DeviceStatus
from protocol.topics import DeviceChannel, QoS
from tests.controller.helpers import Controller, SimAgent, wait_for


def test_hello_registers_a_device_shown_in_rest(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    agent = agents("dev-1", boot_epoch=3)
    agent.hello(labels={"site": "lab", "zone": "a"})
    assert wait_for(lambda: controller.has_device("dev-1", status="online"))

    body = controller.device("dev-1")
    assert body["hardware_class"] == "jetson-orin-nano"
    assert body["labels"] == {"site": "lab", "zone": "a"}
    assert body["capabilities"]["cpu_count"] == 6
    assert body["boot_epoch"] == 3 and body["keepalive_s"] == 5
    assert body["stale"] is False and body["staleness_age_s"] == 0
    assert body["desired"] is None and body["reported"] is None

    listing = controller.http.get("/api/v1/devices").json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == "dev-1"
    assert listing["page"] == 1 and listing["page_size"] == 50
    assert controller.metric("spillway_devices", status="online") == 1


def test_staleness_follows_the_clock_and_heartbeats(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    agent = agents("dev-1")
    agent.hello()
    assert wait_for(lambda: controller.has_device("dev-1", status="online"))

    controller.clock.advance(controller.settings.stale_after_s + 1)
    body = controller.device("dev-1")
    assert body["stale"] is True
    assert body["staleness_age_s"] == controller.settings.stale_after_s + 1

    agent.heartbeat()
    assert wait_for(lambda: controller.has_device("dev-1", stale=False, staleness_age_s=0.0))
    assert controller.metric("spillway_mqtt_messages_total", channel="heartbeat") == 1


def test_last_will_marks_the_device_offline(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    keepalive_s = 1
    agent = agents("dev-1", keepalive_s=keepalive_s)
    agent.hello()
    assert wait_for(lambda: controller.has_device("dev-1", status="online"))

    agent.die()
    assert wait_for(
        lambda: controller.has_device("dev-1", status="offline"), timeout_s=1.5 * keepalive_s + 2
    )
    assert controller.device("dev-1")["stale"] is False  # offline devices are not "stale"
    assert controller.metric("spillway_devices", status="offline") == 1


def test_an_old_boot_epochs_will_does_not_mark_a_restarted_agent_offline(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    restarted = agents("dev-1", boot_epoch=2)
    restarted.hello()
    assert wait_for(lambda: controller.has_device("dev-1", status="online", boot_epoch=2))

    # The Last Will of the previous boot, as the broker publishes it on a session takeover.
    old_will = restarted.presence_message(DeviceStatus.OFFLINE, reason="lost", boot_epoch=1)
    other = agents("someone-else")
    other.client.publish(
        restarted.topic(DeviceChannel.STATUS), encode(old_will), qos=QoS.AT_LEAST_ONCE, wait_s=5
    )
    assert wait_for(
        lambda: (
            controller.metric(
                "spillway_mqtt_ignored_total", channel="status", reason="stale_boot_epoch"
            )
            == 1
        )
    )
    assert controller.device("dev-1")["status"] == "online"

    # A Will of the current boot still counts.
    restarted.die()
    assert wait_for(lambda: controller.has_device("dev-1", status="offline"))


def test_session_takeover_by_a_restarted_agent_ends_online(
    controller: Controller, agents: Callable[..., SimAgent]
) -> None:
    """The real takeover: same client id, new boot; the old Will fires, the new hello wins."""
    first = agents("dev-1", boot_epoch=1)
    first.hello()
    assert wait_for(lambda: controller.has_device("dev-1", status="online", boot_epoch=1))
    first.client._stopping.set()  # the old process is gone: it must not fight back

    second = agents("dev-1", boot_epoch=2)
    second.hello()
    assert wait_for(lambda: controller.has_device("dev-1", status="online", boot_epoch=2))
    # Whatever order the old Will and the new hello arrived in, the end state holds.
    second.heartbeat()
    assert wait_for(
        lambda: controller.metric("spillway_mqtt_messages_total", channel="heartbeat") == 1
    )
    assert controller.device("dev-1")["status"] == "online"


def test_filters_and_paging(controller: Controller, agents: Callable[..., SimAgent]) -> None:
    specs = {
        "a-1": ("orin", {"site": "lab", "tier": "gold"}),
        "a-2": ("orin", {"site": "lab"}),
        "b-1": ("rpi5", {"site": "field", "tier": "gold"}),
        "b-2": ("rpi5", {"site": "lab", "tier": "gold"}),
        "c-1": ("x86", {}),
    }
    for device_id, (hardware_class, labels) in specs.items():
        agents(device_id).hello(hardware_class=hardware_class, labels=labels)
    assert wait_for(lambda: controller.http.get("/api/v1/devices").json()["total"] == 5)
    agent = agents("c-2")
    agent.hello(hardware_class="x86")
    assert wait_for(lambda: controller.has_device("c-2", status="online"))
    agent.die()
    assert wait_for(lambda: controller.has_device("c-2", status="offline"))

    def ids(**params: object) -> list[str]:
        response = controller.http.get("/api/v1/devices", params=params)  # type: ignore[arg-type]
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert ids(hardware_class="rpi5") == ["b-1", "b-2"]
    assert ids(label="site=lab") == ["a-1", "a-2", "b-2"]
    assert ids(label=["site=lab", "tier=gold"]) == ["a-1", "b-2"]
    assert ids(label="site=lab", hardware_class="rpi5") == ["b-2"]
    assert ids(status="offline") == ["c-2"]
    assert ids(status="online", hardware_class="x86") == ["c-1"]
    assert ids(label="site=nowhere") == []

    first = controller.http.get("/api/v1/devices", params={"page_size": 4}).json()
    second = controller.http.get("/api/v1/devices", params={"page_size": 4, "page": 2}).json()
    assert [i["id"] for i in first["items"]] == ["a-1", "a-2", "b-1", "b-2"]
    assert [i["id"] for i in second["items"]] == ["c-1", "c-2"]
    assert first["total"] == second["total"] == 6
    assert (second["page"], second["page_size"]) == (2, 4)


def test_page_size_above_the_cap_is_422(controller: Controller) -> None:
    cap = controller.settings.max_page_size
    assert controller.http.get("/api/v1/devices", params={"page_size": cap}).status_code == 200
    response = controller.http.get("/api/v1/devices", params={"page_size": cap + 1})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["query", "page_size"]
    assert f"exceeds the maximum of {cap}" in detail["msg"]
    bad_label = controller.http.get("/api/v1/devices", params={"label": "no-equals"})
    assert bad_label.status_code == 422
    assert controller.http.get("/api/v1/devices", params={"status": "asleep"}).status_code == 422


def test_unknown_device_is_404(controller: Controller) -> None:
    response = controller.http.get("/api/v1/devices/ghost")
    assert response.status_code == 404
    assert response.json() == {"detail": "device 'ghost' not found"}
    put = controller.http.put("/api/v1/devices/ghost/desired", json={"policy": {}})
    assert put.status_code == 404 and put.json() == {"detail": "device 'ghost' not found"}


def test_telemetry_history_is_bounded_and_reports_are_recorded(
    make_controller: Callable[..., Controller],
    agents: Callable[..., SimAgent],
    tmp_path: Path,
) -> None:
    controller = make_controller(f"sqlite:///{tmp_path / 'c.db'}", telemetry_history=3)
    agent = agents("dev-1")
    agent.hello()
    assert wait_for(lambda: controller.has_device("dev-1", status="online"))
    for i in range(5):
        agent.telemetry(cpu_percent=float(i))
    assert wait_for(
        lambda: controller.metric("spillway_mqtt_messages_total", channel="telemetry") == 5
    )
    history = controller.http.get("/api/v1/devices/dev-1/telemetry", params={"limit": 10}).json()
    assert [s["metrics"]["cpu_percent"] for s in history] == [4.0, 3.0, 2.0]
    assert controller.device("dev-1")["latest_telemetry"]["metrics"] == {"cpu_percent": 4.0}

    agent.report(0, error="model not found")
    assert wait_for(lambda: controller.device("dev-1")["reported"] is not None)
    reported = controller.device("dev-1")["reported"]
    assert reported["observed_generation"] == 0
    assert reported["outcome"] == "failed" and reported["error"] == "model not found"
