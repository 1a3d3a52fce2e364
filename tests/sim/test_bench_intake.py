"""``spillway bench intake``: its messages are the protocol's, and a small run drains them all."""

from __future__ import annotations

from protocol.codec import decode
from protocol.messages import Heartbeat, Telemetry
from protocol.topics import Topics
from sim.bench_intake import IntakeOptions, intake_messages, run_intake_bench


def test_the_backlog_is_heartbeats_and_telemetry_of_every_device_round_by_round() -> None:
    messages = intake_messages(3, 2, root="spillway/v1")
    topics = Topics("spillway/v1")
    parsed = [topics.parse_device(topic) for topic, _ in messages]
    assert [(p.device_id, p.channel.value) for p in parsed[:2]] == [
        ("sim-00000", "heartbeat"),
        ("sim-00000", "telemetry"),
    ]
    assert len(messages) == 12 and len({p.device_id for p in parsed}) == 3
    for (_, payload), topic in zip(messages, parsed, strict=True):
        model = Heartbeat if topic.channel.value == "heartbeat" else Telemetry
        assert decode(payload, model).device_id == topic.device_id


def test_a_small_backlog_is_received_and_applied_whole() -> None:
    report = run_intake_bench(IntakeOptions(devices=20, rounds=3, timeout_s=30))
    result = report.data["result"]
    assert result["messages"] == 120
    assert (result["received"], result["rejected"], result["applied"]) == (120, 0, 120)
    assert result["network_cpu_s"] >= 0 and result["process_cpu_s"] > 0
