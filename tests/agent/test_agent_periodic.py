"""Clocked loops on virtual time: fixed slots, skipped ticks counted while offline."""

from __future__ import annotations

from edge_agent.periodic import PeriodicTask
from edge_agent.telemetry import HeartbeatSender, TelemetrySender
from protocol.codec import decode
from protocol.messages import Heartbeat, RuntimeCapabilities, Telemetry
from protocol.topics import QoS, Topics
from tests.agent.helpers import FakeClock, RecordingPublisher, wait_for


def test_runs_on_fixed_slots_of_the_injected_clock() -> None:
    clock = FakeClock(limit_s=5.0)
    times: list[float] = []
    task = PeriodicTask("t", lambda: times.append(clock.monotonic()), interval_s=1.0, clock=clock)
    task.start()
    wait_for(lambda: task.runs == 6, 5, what="six runs")
    task.stop()
    assert times == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_a_slow_run_skips_missed_slots_instead_of_bursting() -> None:
    clock = FakeClock(limit_s=6.0)
    times: list[float] = []

    def job() -> None:
        times.append(clock.monotonic())
        if len(times) == 2:
            clock.advance(2.5)  # this run takes 2.5 s of a 1 s interval

    task = PeriodicTask("t", job, interval_s=1.0, clock=clock)
    task.start()
    wait_for(lambda: len(times) == 5, 5, what="five runs")
    task.stop()
    assert times == [0.0, 1.0, 4.0, 5.0, 6.0]


def test_a_failing_job_does_not_stop_the_loop() -> None:
    clock = FakeClock(limit_s=3.0)

    def job() -> None:
        raise RuntimeError("sensor gone")

    task = PeriodicTask("t", job, interval_s=1.0, clock=clock)
    task.start()
    wait_for(lambda: task.runs == 4, 5, what="four runs")
    task.stop()
    assert task.errors == 4


def test_heartbeats_skip_and_count_while_disconnected(publisher: RecordingPublisher) -> None:
    clock = FakeClock()
    beats = HeartbeatSender(
        device_id="dev-1",
        topics=Topics(),
        publisher=publisher,
        boot_epoch=4,
        clock=clock,
        started_monotonic=0.0,
    )
    beats.beat()
    publisher.connected = False
    clock.advance(1)
    beats.beat()
    beats.beat()
    publisher.connected = True
    clock.advance(1)
    beats.beat()
    assert (beats.sent, beats.skipped) == (2, 2)
    sent = [decode(p, Heartbeat) for p in publisher.on("/heartbeat")]
    assert [h.seq for h in sent] == [0, 3]  # the gap shows the two skipped
    assert [h.uptime_s for h in sent] == [0.0, 2.0]
    assert {h.boot_epoch for h in sent} == {4}
    assert sent[1].sent_at == clock.now()
    assert all(qos == QoS.AT_MOST_ONCE and not retain for _, _, qos, retain in publisher.sent)


class StaticProbe:
    def capabilities(self) -> RuntimeCapabilities:
        return RuntimeCapabilities(memory_mb=8192, cpu_count=6)

    def metrics(self) -> dict[str, float]:
        return {"cpu_percent": 12.5, "memory_used_mb": 900.0}


def test_telemetry_merges_host_and_agent_metrics(publisher: RecordingPublisher) -> None:
    sender = TelemetrySender(
        device_id="dev-1",
        topics=Topics(),
        publisher=publisher,
        boot_epoch=1,
        clock=FakeClock(),
        probe=StaticProbe(),
        agent_metrics=lambda: {"rejected_total": 3.0},
    )
    sender.report()
    publisher.connected = False
    sender.report()
    assert (sender.sent, sender.skipped) == (1, 1)
    (only,) = [decode(p, Telemetry) for p in publisher.on("/telemetry")]
    assert only.metrics == {"cpu_percent": 12.5, "memory_used_mb": 900.0, "rejected_total": 3.0}


def test_host_probe_reports_real_numbers() -> None:
    from edge_agent.probe import HostProbe

    probe = HostProbe()
    caps = probe.capabilities()
    assert caps.cpu_count >= 1 and caps.memory_mb > 0
    metrics = probe.metrics()
    assert {"cpu_percent", "memory_used_mb", "memory_available_mb"} <= set(metrics)
