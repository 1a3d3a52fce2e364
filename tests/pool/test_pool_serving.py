"""A real pool (two TP=1 replicas) answering InferRequests over a real mosquitto."""

from __future__ import annotations

import uuid
from datetime import timedelta

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cloud_controller.auth import Principal, Role
from cloud_controller.auth.dependencies import require_viewer
from cloud_controller.pool.gateway import PoolClient, pool_router
from cloud_controller.pool.tensor_parallel import embed_reference
from protocol.codec import encode
from protocol.inference import InferStatus, PoolStatus, Tier
from protocol.messages import utc_now
from protocol.mqtt import MqttClient, MqttSettings
from protocol.topics import QoS, Topics
from sim.broker import MosquittoBroker
from tests.pool.helpers import SENTENCES, RunningPool, wait_for


def _computed(pool: RunningPool) -> int:
    return sum(load.computed for load in pool.supervisor.loads().values())


def test_answers_match_the_reference_on_the_response_topic(pool: RunningPool) -> None:
    requester = pool.requester
    requests = [requester.send(SENTENCES[i : i + 2]) for i in range(0, len(SENTENCES), 2)]
    wait_for(
        lambda: all(requester.answered(r.request_id) for r in requests),
        timeout_s=60,
        what="answers",
    )
    reference = embed_reference(SENTENCES)
    served_by = set()
    for i, request in enumerate(requests):
        (answer,) = requester.answered(request.request_id)
        response = answer.response
        assert answer.correlation == request.request_id.encode()
        assert response.status == InferStatus.OK
        assert response.tier == Tier.CLOUD
        assert response.variant == "minilm-tp1-float32"
        assert response.embeddings is not None
        rows = response.embeddings.to_array()
        assert np.abs(rows - reference[2 * i : 2 * i + 2]).max() < 1e-4
        served_by.add(response.device_id)
    assert served_by <= {pool.settings.replica_client_id(i) for i in range(2)}


def test_expired_request_is_answered_without_computing(pool: RunningPool) -> None:
    requester = pool.requester
    wait_for(lambda: _computed(pool) >= 0, timeout_s=5, what="loads")
    request = requester.send(["too late"], deadline=utc_now() - timedelta(seconds=1))
    wait_for(lambda: bool(requester.answered(request.request_id)), timeout_s=30, what="answer")
    (answer,) = requester.answered(request.request_id)
    assert answer.response.status == InferStatus.DEADLINE_EXCEEDED
    assert answer.response.embeddings is None
    assert answer.response.compute_ms == 0


def test_duplicate_request_id_is_answered_from_cache(pool: RunningPool) -> None:
    requester = pool.requester
    first = requester.send(SENTENCES[:2])
    wait_for(lambda: bool(requester.answered(first.request_id)), timeout_s=30, what="first")
    wait_for(  # the replica's load report has counted the computation
        lambda: any(load.answered for load in pool.supervisor.loads().values()),
        timeout_s=10,
        what="load report",
    )
    computed_before = _computed(pool)
    # A client retry: same request id, new message. Both replicas may get it (round robin),
    # so send it twice: each replica either computes it once or answers from its cache.
    requester.send(SENTENCES[:2], request_id=first.request_id)
    wait_for(lambda: len(requester.answered(first.request_id)) == 2, timeout_s=30, what="retry")
    (original, retry) = requester.answered(first.request_id)
    assert retry.response.status == InferStatus.OK
    assert retry.response.embeddings == original.response.embeddings
    if retry.response.device_id == original.response.device_id:
        assert retry.response.detail == "answered from cache"
        wait_for(lambda: _computed(pool) == computed_before, timeout_s=5, what="loads")
        assert _computed(pool) == computed_before


def test_invalid_request_is_answered_invalid(pool: RunningPool) -> None:
    requester = pool.requester
    requester.send(["x"], request_id="bad-1", raw=b'{"schema_version": 1, "kind": "nonsense"}')
    wait_for(lambda: bool(requester.answered("unknown")), timeout_s=30, what="refusal")
    assert requester.answered("unknown")[0].response.status == InferStatus.INVALID


def test_pool_status_is_retained_and_reflects_the_queue(pool: RunningPool) -> None:
    requester = pool.requester
    wait_for(
        lambda: (s := requester.latest_status()) is not None and s.replicas == 2,
        timeout_s=30,
        what="status with two replicas",
    )
    burst = [requester.send(SENTENCES * 4) for _ in range(12)]
    wait_for(
        lambda: all(requester.answered(r.request_id) for r in burst), timeout_s=90, what="burst"
    )
    with requester.lock:
        depths = [s.queue_depth for s in requester.statuses]
        waits = [s.est_wait_ms for s in requester.statuses]
    assert max(depths) > 0 and max(waits) > 0  # the burst was visible
    wait_for(
        lambda: (s := requester.latest_status()) is not None and s.queue_depth == 0,
        timeout_s=30,
        what="queue drained in the status",
    )
    status = requester.latest_status()
    assert status is not None and status.accepting and status.device_id == "pool"


# -- the gateway: POST /api/v1/embed through the same queue ----------------------------------


def _app(pool_client: PoolClient) -> FastAPI:
    app = FastAPI()
    app.include_router(pool_router)
    app.state.pool_client = pool_client
    # No controller here to look tokens up in: the route sees a viewer (auth is tested in
    # tests/controller/test_auth.py).
    app.dependency_overrides[require_viewer] = lambda: Principal("test", Role.VIEWER, 0)
    return app


def _pool_client(host: str, port: int, root: str) -> PoolClient:
    client_id = f"gw-{uuid.uuid4().hex[:8]}"
    client = PoolClient(
        MqttClient(MqttSettings(host=host, port=port, client_id=client_id)),
        client_id=client_id,
        topics=Topics(root),
    )
    client.start()
    return client


def test_gateway_embeds_through_the_pool(pool: RunningPool) -> None:
    settings = pool.settings
    client = _pool_client(settings.mqtt_host, settings.mqtt_port, settings.topic_root)
    try:
        wait_for(lambda: client.status is not None, timeout_s=10, what="pool status")
        with TestClient(_app(client)) as http:
            ok = http.post("/api/v1/embed", json={"texts": SENTENCES[:3], "deadline_ms": 30000})
            assert ok.status_code == 200, ok.text
            body = ok.json()
            assert body["status"] == "ok" and body["dim"] == 384
            rows = np.asarray(body["embeddings"], dtype=np.float32)
            assert np.abs(rows - embed_reference(SENTENCES[:3])).max() < 1e-4

            assert http.post("/api/v1/embed", json={"texts": []}).status_code == 422
            assert (
                http.post("/api/v1/embed", json={"texts": ["a"], "priority": 12}).status_code == 422
            )
            assert http.post("/api/v1/embed", json={"text": "a"}).status_code == 422
    finally:
        client.stop()


def test_gateway_says_429_when_the_pool_is_not_accepting_and_504_on_silence(
    module_broker: MosquittoBroker,
) -> None:
    root = f"spillway-test-{uuid.uuid4().hex[:6]}"  # a tree no pool serves
    client = _pool_client(module_broker.host, module_broker.port, root)
    try:
        with TestClient(_app(client)) as http:
            silent = http.post("/api/v1/embed", json={"texts": ["a"], "deadline_ms": 300})
            assert silent.status_code == 504

            closed = PoolStatus(
                device_id="pool", accepting=False, queue_depth=900, est_wait_ms=9000, replicas=1
            )
            client._mqtt.publish(
                Topics(root).pool_status(), encode(closed), qos=QoS(1), retain=True
            )
            wait_for(
                lambda: client.status is not None and not client.status.accepting,
                timeout_s=10,
                what="the closed status",
            )
            refused = http.post("/api/v1/embed", json={"texts": ["a"]})
            assert refused.status_code == 429
            assert "not accepting" in refused.json()["detail"]
    finally:
        client.stop()
