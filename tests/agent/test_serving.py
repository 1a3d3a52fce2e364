"""Local serving through the agent's ingresses, with the real INT8 model and a real broker."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from edge_agent.serving import ServingModel
from protocol.codec import decode, encode
from protocol.inference import InferRequest, InferResponse, InferStatus, ResultRecord, Tier
from protocol.mqtt import InboundMessage
from protocol.topics import DeviceChannel, QoS, Topics
from sim.broker import MosquittoBroker
from tests.agent.helpers import (
    AgentFactory,
    GatedModel,
    _test_client,
    outbox_rows,
    post_embed,
    wait_for,
)
from tests.agent.test_agent_process import run_cli


def test_embed_answers_with_tier_variant_timings_and_stores_the_result_first(
    serving_agent: AgentFactory, int8_model: ServingModel
) -> None:
    agent = serving_agent()
    port = agent.http_port
    assert port is not None
    texts = ["The quick brown fox.", "An entirely different sentence about databases."]
    r = post_embed(port, {"texts": texts, "request_id": "req-1", "priority": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["request_id"], body["status"], body["tier"]) == ("req-1", "ok", "edge")
    assert body["variant"] == "int8-onnx" and body["offload_reason"] is None
    assert body["queued_ms"] >= 0 and body["compute_ms"] > 0
    rows = np.asarray(body["embeddings"], dtype=np.float32)
    assert rows.shape == (2, 384)
    np.testing.assert_allclose(rows, int8_model.embed(texts), atol=1e-5)  # the right rows back
    # Outbox first: the record is there (or already acked and gone: no acker here).
    serving = agent.serving
    assert serving is not None
    stored = [r for _, _, r in outbox_rows(agent.settings.state_dir) if r.request_id == "req-1"]
    assert len(stored) == 1 and stored[0].tier is Tier.EDGE
    assert stored[0].embeddings is not None and stored[0].embeddings.count == 2

    health = httpx.get(f"http://127.0.0.1:{port}/healthz").json()
    assert health["status"] == "ok" and health["variant"] == "int8-onnx"
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'spillway_agent_model_info{device="CPUExecutionProvider",variant="int8-onnx"}' in metrics
    assert 'spillway_agent_request_latency_seconds_count{tier="edge"} 1.0' in metrics
    assert "spillway_agent_batch_items_bucket" in metrics
    assert "spillway_agent_outbox_records 1.0" in metrics
    telemetry = serving.telemetry()
    assert telemetry["latency_p50_ms"] > 0 and telemetry["outbox_records"] == 1.0


def test_bad_input_is_422_with_a_message(serving_agent: AgentFactory) -> None:
    agent = serving_agent()
    port = agent.http_port
    assert port is not None
    cases = [
        ({"texts": []}, "texts"),
        ({"texts": ["ok"], "priority": 10}, "priority"),
        ({"texts": "not a list"}, "texts"),
        ({"texts": ["x" * 9000]}, "8192"),
        ({"texts": ["ok"], "deadline_ms": -1}, "deadline_ms"),
        ({"texts": ["ok"], "surprise": 1}, "surprise"),
    ]
    for body, needle in cases:
        r = post_embed(port, body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["status"] == "invalid" and needle in r.json()["detail"], r.json()
    garbage = httpx.post(f"http://127.0.0.1:{port}/v1/embed", content=b"{not json")
    assert garbage.status_code == 422 and "JSON" in garbage.json()["detail"], garbage.text


def test_a_full_queue_answers_429_and_expired_requests_504_without_computing(
    serving_agent: AgentFactory, int8_model: ServingModel
) -> None:
    gated = GatedModel(int8_model)
    agent = serving_agent(model=gated.model(), max_batch_size=1, max_queue_items=3)
    port = agent.http_port
    assert port is not None
    gated.gate.clear()
    with ThreadPoolExecutor(max_workers=8) as pool:
        blocker = pool.submit(post_embed, port, {"texts": ["blocks the model"]})
        assert gated.entered.wait(20), "the first request never reached the model"
        # The model is busy; these wait in the queue: 1 + 2 texts = 3, the limit.
        doomed = pool.submit(post_embed, port, {"texts": ["expires"], "deadline_ms": 150})
        queued = pool.submit(post_embed, port, {"texts": ["waits", "patiently"]})
        serving = agent.serving
        assert serving is not None
        wait_for(lambda: serving.runtime.queued_items == 3, 10, what="3 texts queued")
        over = post_embed(port, {"texts": ["one too many"]})
        assert over.status_code == 429
        assert over.json()["status"] == "overloaded" and over.headers["Retry-After"] == "1"
        time.sleep(0.3)  # past the doomed request's deadline while it is still queued
        gated.gate.set()
        assert blocker.result().status_code == 200
        late = doomed.result()
        assert late.status_code == 504 and late.json()["status"] == "deadline_exceeded"
        assert late.json()["embeddings"] == []
        assert queued.result().status_code == 200
    assert "expires" not in gated.seen and "one too many" not in gated.seen
    assert post_embed(port, {"texts": ["past"], "deadline_ms": 0}).status_code == 504
    names = {r.request_id for _, _, r in outbox_rows(agent.settings.state_dir)}
    assert len(names) == 2  # only the two served requests were stored


def test_mqtt_ingress_answers_on_the_response_topic_and_survives_garbage(
    serving_agent: AgentFactory, broker: MosquittoBroker
) -> None:
    agent = serving_agent()
    assert agent.wait_connected(10)
    topics = Topics()
    app = _test_client(broker, "app")
    answers: list[tuple[InferResponse, bytes | None]] = []
    got = threading.Event()

    def on_answer(msg: InboundMessage) -> None:
        answers.append(
            (decode(msg.payload, InferResponse, max_bytes=1 << 22), msg.correlation_data)
        )
        got.set()

    reply_to = topics.replies("app-1")
    app.subscribe(reply_to, on_answer, qos=QoS.AT_LEAST_ONCE)
    app.start()
    try:
        assert app.wait_connected(10)
        time.sleep(0.1)
        infer = topics.device("dev-1", DeviceChannel.INFER)
        app.publish(infer, b"{not json", qos=QoS(1), response_topic=reply_to, wait_s=5)
        request = InferRequest(device_id="dev-1", request_id="mq-1", texts=["over mqtt"])
        app.publish(infer, encode(request), qos=QoS(1), wait_s=5)  # no response topic
        correlation = uuid.uuid4().bytes
        app.publish(
            infer,
            encode(request),
            qos=QoS(1),
            response_topic=reply_to,
            correlation_data=correlation,
            wait_s=5,
        )
        assert got.wait(20), "no answer"
    finally:
        app.stop()
    (response, corr), *_ = answers
    assert corr == correlation
    assert (response.request_id, response.status, response.tier) == (
        "mq-1",
        InferStatus.OK,
        Tier.EDGE,
    )
    assert response.embeddings is not None and response.embeddings.to_array().shape == (1, 384)
    counts = agent.counters()
    assert counts["infer_rejected_malformed"] == 1
    assert counts["infer_rejected_no_response_topic"] == 1
    assert counts["infer_answered"] == 1


def test_cli_serving_start_up_problems_are_one_line_exit_2(tmp_path: Path, model_dir: Path) -> None:
    base = ("--device-id", "d", "--mqtt-port", "1")
    done = run_cli(*base, "--model-dir", str(tmp_path / "nowhere"), state_dir=tmp_path / "s")
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("spillway agent: no manifest.json in ")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run_cli(
            *base, "--model-dir", str(model_dir), "--http-port", str(port), state_dir=tmp_path / "s"
        )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "HTTP ingress: cannot listen on 127.0.0.1:" in line
    done = run_cli(
        *base,
        "--model-dir",
        str(model_dir),
        "--trusted-key",
        str(tmp_path / "missing.pub"),
        state_dir=tmp_path / "s",
    )
    assert done.returncode == 2 and "missing.pub not found" in done.stderr


def test_a_lone_request_is_committed_by_the_model_thread_a_queued_one_by_the_commit_thread(
    tmp_path: Path,
) -> None:
    """Both are answered only once stored; only the idle case skips the commit thread."""
    import asyncio

    from edge_agent.clock import SystemClock
    from edge_agent.cloud import NoCloud
    from edge_agent.metrics import ServingMetrics
    from edge_agent.outbox import Outbox, OutboxLimits, Record
    from edge_agent.results import ResultWriter
    from edge_agent.serving import EmbedRequest, ServingRuntime
    from edge_agent.settings import EdgeSettings

    gate = threading.Event()
    entered = threading.Event()

    def embed(texts: list[str]) -> np.ndarray:
        entered.set()
        assert gate.wait(30), "gate never opened"
        return np.ones((len(texts), 4), dtype=np.float32)

    committed_by: dict[str, str] = {}  # request id -> the thread that committed it

    class WatchedOutbox(Outbox):
        def append_many(
            self, kind: str, payloads: Sequence[Callable[[int], bytes]], *, now: float
        ) -> list[Record]:
            records = super().append_many(kind, payloads, now=now)
            for record in records:
                request_id = ResultRecord.model_validate_json(record.payload).request_id
                committed_by[request_id] = threading.current_thread().name
            return records

    outbox = WatchedOutbox(tmp_path / "outbox.sqlite", boot_epoch=1, limits=OutboxLimits())

    clock = SystemClock()
    settings = EdgeSettings(
        device_id="d", state_dir=tmp_path, max_batch_size=1, offload_enabled=False
    )
    runtime = ServingRuntime(
        ServingModel(variant="v", device="cpu", embed=embed),
        settings=settings,
        writer=ResultWriter(outbox, clock=clock),
        cloud=NoCloud(),
        metrics=ServingMetrics(),
        clock=clock,
    )

    async def scenario() -> list[tuple[str, int | None, int]]:
        await runtime.start()
        try:
            first = asyncio.create_task(runtime.serve(EmbedRequest("first", ["a"])))
            await asyncio.to_thread(entered.wait, 30)  # the model holds "first" ...
            second = asyncio.create_task(runtime.serve(EmbedRequest("second", ["b"])))
            while runtime.queued_items == 0:  # ... while "second" queues behind it
                await asyncio.sleep(0.001)
            gate.set()
            answers = [await first, await second]
            gate.clear()
            entered.clear()
            lone = asyncio.create_task(runtime.serve(EmbedRequest("lone", ["c"])))
            await asyncio.to_thread(entered.wait, 30)
            gate.set()
            answers.append(await lone)
        finally:
            await runtime.stop()
        return [
            (o.status.value, o.seq, o.embeddings.shape[0] if o.embeddings is not None else 0)
            for o in answers
        ]

    answers = asyncio.run(scenario())
    assert [status for status, _, _ in answers] == ["ok"] * 3
    assert sorted(seq for _, seq, _ in answers) == [1, 2, 3]  # type: ignore[type-var]
    # "first" finished with "second" waiting: its record went to the commit thread so the
    # model could go on; "second" and "lone" found nobody waiting and were committed where
    # they were computed. Either way the answer came after the commit (seq is its key).
    assert committed_by["first"] == "result-commit"
    assert committed_by["second"] != "result-commit"
    assert committed_by["lone"] != "result-commit"
    assert {r.seq for r in outbox.pending()} == {1, 2, 3}
    outbox.close()
