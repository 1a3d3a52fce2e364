"""Offloading to the cloud pool over MQTT, and serving locally when the pool is not there."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edge_agent.serving import ServingModel
from protocol.codec import encode
from protocol.inference import OffloadReason, PoolStatus, Tier
from protocol.topics import QoS, Topics
from sim.broker import MosquittoBroker
from tests.agent.helpers import (
    AgentFactory,
    GatedModel,
    PoolResponder,
    _test_client,
    outbox_rows,
    post_embed,
    wait_for,
)


@pytest.fixture
def pool(broker: MosquittoBroker, fp32_model: ServingModel) -> Iterator[PoolResponder]:
    p = PoolResponder(broker, fp32_model)
    yield p
    p.close()


def test_policy_offload_comes_back_from_the_cloud_tier(
    serving_agent: AgentFactory, pool: PoolResponder, int8_model: ServingModel
) -> None:
    agent = serving_agent(offload_policy_fraction=1.0)
    assert agent.wait_connected(10)
    serving = agent.serving
    assert serving is not None
    wait_for(lambda: serving.runtime._cloud.view(0.0).available, 10, what="pool status seen")
    port = agent.http_port
    assert port is not None
    texts = ["Sent to the pool by policy."]
    body = post_embed(port, {"texts": texts, "request_id": "p-1"}).json()
    assert (body["status"], body["tier"], body["variant"]) == ("ok", "cloud", "fp32-onnx")
    assert body["offload_reason"] == "policy"
    cloud_rows = np.asarray(body["embeddings"], dtype=np.float32)
    local_rows = int8_model.embed(texts)
    assert float((cloud_rows * local_rows).sum()) > 0.95  # same sentence, other precision
    assert [r.request_id for r in pool.requests] == ["p-1"]
    assert pool.requests[0].offload_reason is OffloadReason.POLICY
    (record,) = [r for _, _, r in outbox_rows(agent.settings.state_dir)]
    assert (record.tier, record.offload_reason, record.variant) == (
        Tier.CLOUD,
        OffloadReason.POLICY,
        "fp32-onnx",
    )
    assert agent.counters()["offloads_policy"] == 1


def test_overflow_offload_records_its_reason(
    serving_agent: AgentFactory, pool: PoolResponder
) -> None:
    # SLO 0.01 ms: once one request measured the service time, every prediction misses it.
    agent = serving_agent(slo_ms=0.01, offload_exit_ratio=0.5)
    serving = agent.serving
    assert serving is not None and agent.wait_connected(10)
    wait_for(lambda: serving.runtime._cloud.view(0.0).available, 10, what="pool status seen")
    port = agent.http_port
    assert port is not None
    first = post_embed(port, {"texts": ["measures the service time"]}).json()
    assert first["tier"] == "edge"  # nothing measured yet: no prediction, no offload
    second = post_embed(port, {"texts": ["now predicted to miss the SLO"]}).json()
    assert (second["tier"], second["offload_reason"]) == ("cloud", "overflow")
    reasons = [r.offload_reason for _, _, r in outbox_rows(agent.settings.state_dir)]
    assert reasons == [None, OffloadReason.OVERFLOW]


def test_deadline_offload_when_the_queue_ahead_is_too_long(
    serving_agent: AgentFactory, pool: PoolResponder, int8_model: ServingModel
) -> None:
    gated = GatedModel(int8_model)
    agent = serving_agent(model=gated.model(), slo_ms=600_000.0)  # no overflow: deadlines only
    serving = agent.serving
    assert serving is not None and agent.wait_connected(10)
    wait_for(lambda: serving.runtime._cloud.view(0.0).available, 10, what="pool status seen")
    port = agent.http_port
    assert port is not None
    post_embed(port, {"texts": ["measures the service time"]})
    gated.gate.clear()
    with ThreadPoolExecutor(max_workers=4) as workers:
        ahead = [
            workers.submit(post_embed, port, {"texts": [f"t{k} {i}" for i in range(256)]})
            for k in range(3)
        ]
        # 768 texts queued (or one batch at the gate): >= 1.5 s at any plausible speed.
        wait_for(lambda: serving.runtime.queued_items >= 512, 10, what="a long queue")
        hurried = post_embed(port, {"texts": ["in a hurry"], "deadline_ms": 1000}).json()
        gated.gate.set()
        assert all(f.result().status_code == 200 for f in ahead)
    assert (hurried["status"], hurried["tier"]) == ("ok", "cloud")
    assert hurried["offload_reason"] == "deadline"
    assert pool.requests[0].deadline is not None  # the pool is told the deadline too


def test_pool_unreachable_serves_locally_and_stops_trying_for_a_cooldown(
    serving_agent: AgentFactory, broker: MosquittoBroker
) -> None:
    """The pool's retained status says "accepting", but no worker answers: a dead pool."""
    ghost = _test_client(broker, "ghost-pool")
    ghost.start()
    assert ghost.wait_connected(10)
    status = PoolStatus(device_id="pool", accepting=True, queue_depth=0, est_wait_ms=1, replicas=1)
    ghost.publish(Topics().pool_status(), encode(status), qos=QoS(1), retain=True, wait_s=5)
    try:
        agent = serving_agent(
            offload_policy_fraction=1.0,
            cloud_timeout_ms=300,
            cloud_cooldown_s=600,
            cloud_cooldown_min_s=600,
        )
        serving = agent.serving
        assert serving is not None and agent.wait_connected(10)
        wait_for(lambda: serving.runtime._cloud.view(0.0).available, 10, what="status seen")
        port = agent.http_port
        assert port is not None
        bodies = [post_embed(port, {"texts": [f"text {i}"]}).json() for i in range(4)]
    finally:
        ghost.publish(Topics().pool_status(), b"", qos=QoS(1), retain=True, wait_s=5)
        ghost.stop()
    assert [(b["status"], b["tier"]) for b in bodies] == [("ok", "edge")] * 4
    counts = agent.counters()
    assert counts["offload_fallback_timeout"] == 1  # tried once, timed out, served locally
    assert counts["offload_skipped_cloud_unavailable"] == 3  # then did not try again


def test_back_pressure_and_a_lost_broker_keep_serving_locally(
    serving_agent: AgentFactory, pool: PoolResponder, broker: MosquittoBroker
) -> None:
    agent = serving_agent(offload_policy_fraction=1.0)
    serving = agent.serving
    assert serving is not None and agent.wait_connected(10)
    wait_for(lambda: serving.runtime._cloud.view(0.0).available, 10, what="pool status seen")
    pool.set_status(accepting=False)
    wait_for(lambda: not serving.runtime._cloud.view(0.0).available, 10, what="back-pressure")
    port = agent.http_port
    assert port is not None
    body = post_embed(port, {"texts": ["pool is full"]}).json()
    assert (body["status"], body["tier"]) == ("ok", "edge")
    assert agent.counters()["offload_skipped_cloud_back_pressure"] == 1

    pool.set_status(accepting=True)
    wait_for(lambda: serving.runtime._cloud.view(0.0).available, 10, what="accepting again")
    broker.stop()
    wait_for(lambda: not agent.is_connected, 10, what="agent notices the broker is gone")
    bodies = [post_embed(port, {"texts": [f"offline {i}"]}).json() for i in range(3)]
    assert [(b["status"], b["tier"]) for b in bodies] == [("ok", "edge")] * 3
    assert agent.counters()["offload_skipped_cloud_unavailable"] == 3
    assert pool.requests == []
