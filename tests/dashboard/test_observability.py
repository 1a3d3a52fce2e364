"""Observability end to end: one offloaded request carries its request id through the agent's
and the pool replica's JSON logs, and both processes serve Prometheus ``/metrics`` with the
series the shipped alert rules query.

A real pool replica (``running_pool``, TP=1) with its metrics port, and a real agent process
serving the INT8 model with every request offloaded by policy.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_controller.pool.orchestrator import rank_log
from sim.broker import MosquittoBroker, free_port
from sim.processes import ChildProcess
from tests.dashboard.rules import rule_metric_names
from tests.integration.fleet import wait_for
from tests.pool.helpers import RunningPool, running_pool

MODELS = Path(__import__("os").environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from models.build import BuildOptions, build_all

    build_all(BuildOptions(out=MODELS, eval_sentences=200, variants=("fp32-onnx", "int8-onnx")))
    work = tmp_path_factory.mktemp("observability")
    with MosquittoBroker(work / "broker") as broker:
        pool_port = free_port()
        with running_pool(
            host=broker.host,
            port=broker.port,
            state_dir=work / "pool",
            replicas=1,
            tp=1,
            metrics_port=pool_port,
            metrics_host="127.0.0.1",
        ) as pool:
            agent_port = free_port()
            agent = ChildProcess(
                "obs-agent",
                [
                    "agent",
                    "run",
                    "--device-id",
                    "obs-agent",
                    "--hardware-class",
                    "jetson-orin-nx",
                    "--mqtt-port",
                    str(broker.port),
                    "--state-dir",
                    str(work / "agent"),
                ],
                log_path=work / "agent.log",
                env={
                    "SPILLWAY_EDGE_MODEL_DIR": str(MODELS.resolve()),
                    "SPILLWAY_EDGE_HTTP_PORT": str(agent_port),
                    "SPILLWAY_EDGE_HTTP_HOST": "127.0.0.1",
                    "SPILLWAY_EDGE_OFFLOAD_POLICY_FRACTION": "1.0",
                    "SPILLWAY_EDGE_INTRA_OP_THREADS": "1",
                },
            )
            agent.start()
            try:
                yield {
                    "broker": broker,
                    "pool": pool,
                    "pool_url": f"http://127.0.0.1:{pool_port}",
                    "agent": agent,
                    "agent_url": f"http://127.0.0.1:{agent_port}",
                }
            finally:
                agent.stop()


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            lines.append(entry)
    return lines


def _offload(agent_url: str, request_id: str) -> dict[str, Any]:
    def ready() -> bool:
        return httpx.get(f"{agent_url}/healthz", timeout=2).status_code == 200

    wait_for(ready, 90, what="the agent's HTTP ingress")
    body: dict[str, Any] = {}

    def offloaded() -> bool:
        nonlocal body
        response = httpx.post(
            f"{agent_url}/v1/embed",
            json={"texts": ["Where does this request go?"], "request_id": request_id},
            timeout=30,
        )
        body = response.json()
        return body.get("tier") == "cloud"

    # Until the agent has seen the pool's status it serves locally; a new id each try.
    wait_for(offloaded, 60, what="an answer from the cloud tier")
    return body


def test_request_id_is_in_the_agent_and_pool_logs(stack: dict[str, Any]) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    body = _offload(stack["agent_url"], request_id)
    assert (body["status"], body["request_id"]) == ("ok", request_id)
    pool: RunningPool = stack["pool"]
    replica_log = rank_log(pool.settings, pool.settings.replica_client_id(0), 0)

    def logged_on_both_sides() -> bool:
        agent_lines = [
            e for e in _json_lines(stack["agent"].log_path) if e.get("request_id") == request_id
        ]
        pool_lines = [e for e in _json_lines(replica_log) if e.get("request_id") == request_id]
        return bool(agent_lines) and bool(pool_lines)

    wait_for(logged_on_both_sides, 10, what=f"{request_id} in both logs")
    (agent_line,) = [
        e for e in _json_lines(stack["agent"].log_path) if e.get("request_id") == request_id
    ]
    pool_lines = [e for e in _json_lines(replica_log) if e.get("request_id") == request_id]
    assert agent_line["msg"] == "request offloaded"
    assert agent_line["reason"] == "policy"
    assert pool_lines[-1]["msg"] == "request answered"
    assert pool_lines[-1]["device_id"] == "obs-agent"
    assert pool_lines[-1]["status"] == "ok"
    assert agent_line["replica"] == pool.settings.replica_client_id(0)


def _families(url: str) -> dict[str, set[str]]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}


def test_metrics_endpoints_export_what_the_alert_rules_query(stack: dict[str, Any]) -> None:
    _offload(stack["agent_url"], f"metrics-{uuid.uuid4().hex[:8]}")
    agent = _families(stack["agent_url"])
    pool = _families(stack["pool_url"])
    samples = set().union(*agent.values(), *pool.values())
    for name in (
        "spillway_agent_request_latency_seconds_bucket",
        "spillway_agent_queue_items",
        "spillway_agent_offload_ratio",
        "spillway_agent_outbox_records",
        "spillway_agent_outbox_bytes",
        "spillway_agent_mqtt_reconnects_total",
        "spillway_pool_request_latency_seconds_bucket",
        "spillway_pool_requests_total",
        "spillway_pool_queue_items",
        "spillway_pool_batch_items_bucket",
        "spillway_pool_mqtt_reconnects_total",
    ):
        assert name in samples, f"{name} not exported"
    missing = rule_metric_names() - samples
    assert not missing, f"the alert rules query series nobody exports: {missing}"
