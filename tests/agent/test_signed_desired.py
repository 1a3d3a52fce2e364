"""Signed desired state on a real broker with the real agent: only the controller's key is
obeyed, forged/unsigned/tampered/other-device/replayed messages change nothing (and are
counted and reported), and an accepted operating policy changes what the agent does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.agent import Agent
from models.signing import SigningKey
from protocol.codec import encode
from protocol.messages import DesiredState, ReportedState, Telemetry
from protocol.policy import POLICY_KEY, Policy, PolicySection, PolicySource
from protocol.signing import sign_desired
from protocol.topics import DeviceChannel
from sim.broker import MosquittoBroker
from tests.agent.helpers import (
    AgentFactory,
    Cloud,
    control_key,
    edge_settings,
    wait_for,
)


def operating(**document: Any) -> dict[str, Any]:
    """A desired document holding an operating policy section."""
    section = PolicySection(
        document=Policy.model_validate(document),
        sources=[PolicySource(name="test", version=1, priority=0)],
    )
    return {POLICY_KEY: section.model_dump(mode="json")}


def reports(cloud: Cloud, device_id: str = "dev-1") -> list[ReportedState]:
    return cloud.reports(device_id)


def observed(cloud: Cloud, generation: int, device_id: str = "dev-1") -> bool:
    return any(r.observed_generation == generation for r in reports(cloud, device_id))


def test_signed_policy_changes_the_telemetry_interval(
    cloud: Cloud, make_agent: AgentFactory
) -> None:
    agent = make_agent(telemetry_interval_s=60.0)
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
    before = len(cloud.seen("dev-1", DeviceChannel.TELEMETRY))
    assert before <= 1  # the first sample goes at start (if connected), the next in 60 s

    cloud.publish_desired("dev-1", 1, operating(telemetry={"interval_s": 0.2}))
    wait_for(lambda: observed(cloud, 1), 10, what="generation 1 reported")
    wait_for(
        lambda: len(cloud.seen("dev-1", DeviceChannel.TELEMETRY)) >= before + 4,
        10,
        what="telemetry every 0.2 s",
    )
    assert agent.operating_policy.current.telemetry.interval_s == 0.2
    assert agent.operating_policy.sources == ["test@1"]
    latest: Telemetry = cloud.seen("dev-1", DeviceChannel.TELEMETRY)[-1]
    assert latest.metrics["telemetry_interval_s"] == 0.2
    assert agent.counters()["policy_activations"] == 1


def test_forged_unsigned_tampered_and_misdirected_messages_are_rejected(
    cloud: Cloud, make_agent: AgentFactory
) -> None:
    agent = make_agent(telemetry_interval_s=30.0)
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
    cloud.publish_desired("dev-1", 1, operating(batching={"max_batch_size": 8}))
    wait_for(lambda: agent.applied_generations == [1], 10, what="generation 1 applied")
    before = agent.operating_policy.current

    # A rogue client with a key of its own, on the device's desired topic.
    rogue = SigningKey.generate()
    cloud.publish_desired("dev-1", 2, operating(telemetry={"interval_s": 0.1}), signer=rogue)
    cloud.publish_desired("dev-1", 3, operating(telemetry={"interval_s": 0.1}), signed=False)
    genuine = sign_desired(
        DesiredState(device_id="dev-1", generation=4, policy=operating()), control_key()
    )
    tampered = genuine.model_copy(update={"policy": operating(offload={"enabled": False})})
    cloud.publish_raw("dev-1", encode(tampered))
    # Signed for another device and relabelled for this one.
    other = sign_desired(DesiredState(device_id="dev-2", generation=5), control_key())
    cloud.publish_raw("dev-1", encode(other.model_copy(update={"device_id": "dev-1"})))

    def rejected() -> dict[str, int]:
        counts = agent.counters()
        return {k: v for k, v in counts.items() if k.startswith("desired_rejected_")}

    wait_for(lambda: sum(rejected().values()) == 4, 10, what="four rejections")
    assert rejected() == {
        "desired_rejected_unknown_key": 1,
        "desired_rejected_unsigned": 1,
        "desired_rejected_bad_signature": 2,
    }
    assert agent.counters()["desired_signature_rejected"] == 4
    assert agent.applied_generations == [1]
    assert agent.applied_state.generation == 1
    assert agent.operating_policy.current == before
    assert agent.counters()["desired_stale"] == 0  # never reached the generation check

    # Each rejection is reported: the controller sees the attempt, generation unchanged.
    def last_rejection() -> dict[str, Any]:
        section: dict[str, Any] = reports(cloud)[-1].policy.get("desired_rejected") or {}
        return section

    wait_for(lambda: last_rejection().get("count") == 4, 10, what="rejection reported")
    assert last_rejection()["generation"] == 5 and last_rejection()["reason"] == "bad_signature"
    assert reports(cloud)[-1].observed_generation == 1

    # The genuine generation 2 still applies: nothing was consumed by the forgeries.
    cloud.publish_desired("dev-1", 2, operating(batching={"max_batch_size": 2}))
    wait_for(lambda: agent.applied_generations == [1, 2], 10, what="generation 2 applied")
    assert agent.operating_policy.current.batching.max_batch_size == 2


def test_a_replayed_older_generation_is_ignored(cloud: Cloud, make_agent: AgentFactory) -> None:
    agent = make_agent()
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
    first = sign_desired(
        DesiredState(
            device_id="dev-1", generation=1, policy=operating(telemetry={"interval_s": 5})
        ),
        control_key(),
    )
    cloud.publish_raw("dev-1", encode(first))
    cloud.publish_desired("dev-1", 2, operating(telemetry={"interval_s": 7}))
    wait_for(lambda: agent.applied_generations == [1, 2], 10, what="1 and 2 applied")
    cloud.publish_raw("dev-1", encode(first))  # validly signed, but old
    wait_for(lambda: agent.counters()["desired_stale"] == 1, 10, what="replay seen as stale")
    assert agent.applied_generations == [1, 2]
    assert agent.operating_policy.current.telemetry.interval_s == 7
    assert agent.counters()["rejected"] == 0


def test_without_a_key_everything_is_refused_unless_unsigned_is_allowed(
    cloud: Cloud, make_agent: AgentFactory
) -> None:
    strict = make_agent(device_id="dev-1", desired_key_files=())
    lax = make_agent(device_id="dev-2", desired_key_files=(), allow_unsigned_desired=True)
    wait_for(lambda: cloud.seen("dev-2", DeviceChannel.HELLO), 10, what="hello")
    cloud.publish_desired("dev-1", 1, {"x": 1})
    cloud.publish_desired("dev-2", 1, {"x": 1}, signed=False)
    wait_for(lambda: lax.applied_generations == [1], 10, what="dev-2 applied unsigned")
    wait_for(
        lambda: strict.counters().get("desired_rejected_no_trusted_key") == 1, 10, what="refused"
    )
    assert strict.applied_generations == []


def test_the_policy_survives_a_restart(
    cloud: Cloud, broker: MosquittoBroker, tmp_path: Path
) -> None:
    settings = edge_settings(broker, tmp_path / "state", telemetry_interval_s=60.0)
    agent = Agent(settings)
    agent.start()
    try:
        cloud.publish_desired("dev-1", 1, operating(telemetry={"interval_s": 0.5}))
        wait_for(lambda: agent.applied_generations == [1], 10, what="applied")
    finally:
        agent.stop()
    again = Agent(settings)
    again.start()
    try:
        assert again.operating_policy.current.telemetry.interval_s == 0.5
        assert again.applied_generations == []  # restored, not re-applied
    finally:
        again.stop()


def test_a_serving_agent_takes_batching_and_offload_values(
    cloud: Cloud, serving_agent: AgentFactory
) -> None:
    agent = serving_agent()
    wait_for(lambda: cloud.seen("dev-1", DeviceChannel.HELLO), 10, what="hello")
    serving = agent.serving
    assert serving is not None
    assert serving.runtime.batcher_settings.max_batch_size == 32  # the settings' default
    cloud.publish_desired(
        "dev-1",
        1,
        operating(
            batching={"max_batch_size": 4, "max_queue_delay_ms": 1},
            offload={"slo_ms": 90, "enabled": False},
        ),
    )
    wait_for(lambda: agent.applied_generations == [1], 10, what="applied")
    assert serving.runtime.batcher_settings.max_batch_size == 4
    assert serving.runtime.batcher_settings.max_queue_delay_ms == 1
    assert serving.runtime.batch_limit <= 4
    assert serving.runtime.offload.policy.slo_ms == 90
    assert serving.runtime.offload.policy.enabled is False
    assert serving.telemetry()["max_batch_size"] == 4
