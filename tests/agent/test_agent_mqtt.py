"""In-process agents against a real mosquitto, with the real adapter as the cloud side."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.settings import EdgeSettings
from protocol.messages import ApplyOutcome, DeviceStatus, Hello
from protocol.topics import DeviceChannel
from sim.broker import MosquittoBroker
from tests.agent.helpers import (
    KEEPALIVE_S,
    AgentFactory,
    Cloud,
    edge_settings,
    retained_presence,
    wait_for,
)


def applied_reports(cloud: Cloud, device_id: str = "dev-1") -> list[int]:
    return [
        r.observed_generation for r in cloud.reports(device_id) if r.outcome == ApplyOutcome.APPLIED
    ]


def test_hello_then_retained_online_presence(
    cloud: Cloud, make_agent: AgentFactory, broker: MosquittoBroker
) -> None:
    agent = make_agent(labels={"site": "lab", "rack": "3"}, hardware_class="jetson-orin-nx")
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.STATUS), 10, what="presence")
    (hello,) = cloud.seen("dev-1", DeviceChannel.HELLO)
    assert isinstance(hello, Hello)
    assert hello.hardware_class == "jetson-orin-nx"
    assert hello.labels == {"site": "lab", "rack": "3"}
    assert (hello.boot_epoch, hello.keepalive_s) == (1, KEEPALIVE_S)
    assert hello.agent_version and hello.capabilities.cpu_count >= 1
    assert hello.capabilities.memory_mb > 0
    presence = retained_presence(broker, "dev-1")
    assert presence is not None
    assert (presence.status, presence.reason, presence.boot_epoch) == (
        DeviceStatus.ONLINE,
        "connected",
        1,
    )
    wait_for(lambda: len(cloud.seen("dev-1", DeviceChannel.HEARTBEAT)) >= 2, 10, what="beats")
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.TELEMETRY), 10, what="telemetry")
    sample = cloud.seen("dev-1", DeviceChannel.TELEMETRY)[0]
    assert "cpu_percent" in sample.metrics and "memory_used_mb" in sample.metrics
    assert agent.counters()["heartbeats_sent"] >= 2


def test_generations_once_in_order_duplicates_re_reported(
    cloud: Cloud, make_agent: AgentFactory
) -> None:
    agent = make_agent()
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
    for generation in (1, 2, 3):
        cloud.publish_desired("dev-1", generation, {"g": generation})
    wait_for(lambda: applied_reports(cloud) == [1, 2, 3], 10, what="1,2,3 reported")
    cloud.publish_desired("dev-1", 2, {"g": 2})
    cloud.publish_desired("dev-1", 1, {"g": 1})
    wait_for(lambda: len(applied_reports(cloud)) == 5, 10, what="two re-reports")
    assert applied_reports(cloud) == [1, 2, 3, 3, 3]
    assert agent.applied_generations == [1, 2, 3]
    assert agent.applied_state.policy == {"g": 3}
    counts = agent.counters()
    assert counts["desired_applied"] == 3 and counts["desired_stale"] == 2


def test_restart_does_not_re_apply_but_re_reports_with_a_new_boot_epoch(
    cloud: Cloud, broker: MosquittoBroker, tmp_path: Path
) -> None:
    settings = edge_settings(broker, tmp_path / "state")
    first = Agent(settings)
    first.start()
    try:
        wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
        for generation in (1, 2, 3):
            cloud.publish_desired("dev-1", generation, {"g": generation})
        wait_for(lambda: applied_reports(cloud) == [1, 2, 3], 10, what="applied 1..3")
    finally:
        first.stop()
    assert first.applied_generations == [1, 2, 3]
    assert first.boot_epoch == 1

    second = Agent(settings)  # same state_dir; the broker still retains generation 3
    second.start()
    try:
        wait_for(
            lambda: any(r.boot_epoch == 2 for r in cloud.reports("dev-1")), 10, what="re-report"
        )
        again = [r for r in cloud.reports("dev-1") if r.boot_epoch == 2]
        assert {(r.observed_generation, r.outcome) for r in again} == {(3, ApplyOutcome.APPLIED)}
        assert second.applied_generations == []
        assert second.boot_epoch == 2
        hellos = cloud.seen("dev-1", DeviceChannel.HELLO)
        assert [h.boot_epoch for h in hellos] == [1, 2]
    finally:
        second.stop()


def test_failed_apply_is_reported_and_later_generations_still_apply(
    cloud: Cloud, make_agent: AgentFactory
) -> None:
    agent = make_agent()
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
    cloud.publish_desired("dev-1", 1, {"ok": True})
    cloud.publish_desired("dev-1", 2, {"fail": True})
    wait_for(lambda: len(cloud.reports("dev-1")) == 2, 10, what="two reports")
    failed = cloud.reports("dev-1")[1]
    assert (failed.observed_generation, failed.outcome) == (2, ApplyOutcome.FAILED)
    assert failed.error and failed.policy == {"ok": True}
    assert agent.applied_state.generation == 1
    cloud.publish_desired("dev-1", 3, {"ok": 3})
    wait_for(lambda: applied_reports(cloud) == [1, 3], 10, what="generation 3 applied")
    assert agent.applied_generations == [1, 3]


def test_bad_desired_payloads_are_counted_and_the_agent_keeps_working(
    cloud: Cloud, make_agent: AgentFactory
) -> None:
    agent = make_agent()
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
    cloud.publish_raw("dev-1", b"\x00garbage")
    cloud.publish_raw("dev-1", b"{" + b" " * (300 * 1024) + b"}")
    cloud.publish_raw("dev-1", b'{"schema_version": 99, "device_id": "dev-1", "generation": 1}')
    cloud.publish_desired("dev-1", 1, {"meant": "for someone else"})  # device_id below
    cloud.publish_raw(
        "dev-1", b'{"schema_version": 1, "device_id": "dev-2", "generation": 1, "policy": {}}'
    )
    wait_for(lambda: agent.counters()["rejected"] == 4, 10, what="four rejects")
    cloud.publish_desired("dev-1", 2, {"still": "alive"})
    wait_for(lambda: 2 in applied_reports(cloud), 10, what="generation 2 applied")
    counts = agent.counters()
    assert counts["desired_rejected_malformed"] == 1
    assert counts["desired_rejected_oversized"] == 1
    assert counts["desired_rejected_unsupported_version"] == 1
    assert counts["desired_rejected_device_mismatch"] == 1
    assert counts["mqtt_handler_errors"] == 0
    assert agent.applied_generations == [1, 2]


@pytest.mark.parametrize("how", ["restart", "crash_losing_store"])
def test_broker_restart_reconnects_re_reports_and_applies_new_generations(
    cloud: Cloud, make_agent: AgentFactory, broker: MosquittoBroker, how: str
) -> None:
    agent = make_agent()
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
    cloud.publish_desired("dev-1", 1, {"v": 1})
    wait_for(lambda: applied_reports(cloud) == [1], 10, what="generation 1")

    if how == "restart":
        broker.restart()  # SIGTERM: mosquitto saves sessions and retained messages
    else:
        broker.kill()  # a crash that loses the store: no sessions, nothing retained
        (broker.data_dir / "mosquitto.db").unlink(missing_ok=True)
        broker.start()
    wait_for(lambda: agent.counters()["mqtt_connects"] >= 2, 20, what="agent reconnected")
    wait_for(lambda: len(cloud.seen("dev-1", DeviceChannel.HELLO)) >= 2, 20, what="hello again")
    wait_for(lambda: applied_reports(cloud).count(1) >= 2, 20, what="re-report of generation 1")

    cloud.publish_desired("dev-1", 2, {"v": 2})
    wait_for(lambda: 2 in applied_reports(cloud), 20, what="generation 2 after restart")
    assert agent.applied_generations == [1, 2]
    presence = retained_presence(broker, "dev-1")
    assert presence is not None and presence.status == DeviceStatus.ONLINE


def test_offline_broker_at_start_is_not_fatal(broker: MosquittoBroker, tmp_path: Path) -> None:
    broker.stop()
    agent = Agent(edge_settings(broker, tmp_path / "state"))
    agent.start()
    try:
        assert not agent.wait_connected(0.5)
        wait_for(lambda: agent.counters()["heartbeats_skipped"] >= 1, 10, what="skipped beat")
        broker.start()
        assert agent.wait_connected(15)
        cloud = Cloud(broker)
        try:
            wait_for(
                lambda: len(cloud.seen("dev-1", DeviceChannel.HEARTBEAT)) >= 1, 10, what="beat"
            )
        finally:
            cloud.close()
    finally:
        agent.stop()


def test_graceful_stop_leaves_retained_offline_shutdown(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    settings: EdgeSettings = edge_settings(broker, tmp_path / "state")
    agent = Agent(settings)
    agent.start()
    assert agent.wait_connected(10)
    wait_for(
        lambda: (p := retained_presence(broker, "dev-1")) is not None and p.status == "online",
        10,
        what="online",
    )
    agent.stop()
    presence = retained_presence(broker, "dev-1")
    assert presence is not None
    assert (presence.status, presence.reason) == (DeviceStatus.OFFLINE, "shutdown")
