"""Helpers for the agent's tests: fake clock, recording publisher, a "cloud" client,
agent subprocesses."""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from edge_agent.agent import Agent
from edge_agent.serving import ServingModel
from edge_agent.settings import EdgeSettings
from models.signing import SigningKey, public_path, save_signing_key
from protocol.codec import decode, encode
from protocol.inference import (
    EmbeddingBlock,
    InferRequest,
    InferResponse,
    InferStatus,
    PoolStatus,
    ResultAck,
    ResultBatch,
    ResultRecord,
    Tier,
)
from protocol.messages import (
    DesiredState,
    Envelope,
    Heartbeat,
    Hello,
    Presence,
    ReportedState,
    Telemetry,
)
from protocol.mqtt import InboundMessage, MqttClient, MqttError, MqttSettings, NotConnected
from protocol.signing import Signer, sign_desired
from protocol.topics import DeviceChannel, QoS, Topics
from sim.broker import MosquittoBroker

REPO_ROOT = Path(__file__).resolve().parents[2]
KEEPALIVE_S = 2


@functools.cache
def control_key() -> SigningKey:
    """The test cloud's desired-state key: ``Cloud`` signs with it, agents trust it."""
    return SigningKey.generate()


@functools.cache
def control_key_file() -> Path:
    """The public half of ``control_key`` as a PEM file (one per test session)."""
    path = Path(tempfile.mkdtemp(prefix="spillway-control-")) / "control.key"
    save_signing_key(control_key(), path)
    return public_path(path)


def control_key_env() -> dict[str, str]:
    """Environment that makes an agent process trust ``control_key``."""
    return {"SPILLWAY_EDGE_DESIRED_KEY_FILES": json.dumps([str(control_key_file())])}


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, *, what: str = "") -> None:
    """Poll ``predicate`` (truthy = done) every 20 ms; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    if not predicate():
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


# -- virtual time ------------------------------------------------------------------


class FakeClock:
    """Virtual time: ``wait`` advances it instantly; past ``limit`` it blocks until stopped."""

    def __init__(self, *, limit_s: float | None = None) -> None:
        self.t = 0.0
        self.limit_s = limit_s
        self.waits: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self.t

    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.monotonic())

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds

    def wait(self, stop: threading.Event, timeout_s: float) -> bool:
        with self._lock:
            self.waits.append(timeout_s)
            target = self.t + max(0.0, timeout_s)
            frozen = self.limit_s is not None and target > self.limit_s
            if not frozen:
                self.t = target
        if frozen:
            stop.wait(10)
            return True
        return stop.is_set()


# -- a publisher that records ------------------------------------------------------


@dataclass
class RecordingPublisher:
    """A ``BrokerClient`` in memory; ``connected=False`` makes QoS 0 raise like the adapter."""

    connected: bool = True
    sent: list[tuple[str, bytes, QoS, bool]] = field(default_factory=list)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: QoS,
        retain: bool = False,
        expiry_s: int | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        wait_s: float | None = None,
    ) -> None:
        if not self.connected and qos == QoS.AT_MOST_ONCE:
            raise NotConnected("not connected")
        self.sent.append((topic, payload, qos, retain))

    def subscribe(
        self, topic_filter: str, handler: Callable[[InboundMessage], None], *, qos: QoS
    ) -> None:
        raise NotImplementedError

    def on(self, topic_suffix: str) -> list[bytes]:
        return [p for t, p, _, _ in self.sent if t.endswith(topic_suffix)]


# -- the "cloud" side --------------------------------------------------------------

_MODELS: dict[DeviceChannel, type[Envelope]] = {
    DeviceChannel.HELLO: Hello,
    DeviceChannel.STATUS: Presence,
    DeviceChannel.HEARTBEAT: Heartbeat,
    DeviceChannel.TELEMETRY: Telemetry,
    DeviceChannel.REPORTED: ReportedState,
}


class Cloud:
    """Plays the controller with the real adapter: records every upstream message."""

    def __init__(self, broker: MosquittoBroker, *, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        self.client = MqttClient(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                client_id=f"cloud-{uuid.uuid4().hex[:8]}",
                keepalive_s=5,
                backoff_initial_s=0.05,
                backoff_max_s=0.5,
            )
        )
        self._lock = threading.Lock()
        self._seen: list[tuple[str, DeviceChannel, Any]] = []
        for channel in _MODELS:
            self.client.subscribe(
                self.topics.all_devices(channel), self._record, qos=QoS.AT_LEAST_ONCE
            )
        self.client.start()
        assert self.client.wait_connected(10), "cloud client did not connect"
        time.sleep(0.1)  # let the SUBACKs land before agents start talking

    def _record(self, msg: InboundMessage) -> None:
        parsed = self.topics.parse_device(msg.topic)
        message = decode(msg.payload, _MODELS[parsed.channel])
        with self._lock:
            self._seen.append((parsed.device_id, parsed.channel, message))

    def seen(self, device_id: str, channel: DeviceChannel) -> list[Any]:
        with self._lock:
            return [m for d, c, m in self._seen if d == device_id and c == channel]

    def reports(self, device_id: str) -> list[ReportedState]:
        return self.seen(device_id, DeviceChannel.REPORTED)

    def publish_desired(
        self,
        device_id: str,
        generation: int,
        policy: dict[str, Any] | None = None,
        *,
        signer: Signer | None = None,
        signed: bool = True,
    ) -> None:
        """Publish desired state signed with ``signer`` (default ``control_key()``), or
        unsigned with ``signed=False``."""
        message = DesiredState(device_id=device_id, generation=generation, policy=policy or {})
        if signed:
            message = sign_desired(message, signer or control_key())
        self.publish_raw(device_id, encode(message))

    def publish_raw(self, device_id: str, payload: bytes) -> None:
        spec = DeviceChannel.DESIRED.spec
        self.client.publish(
            self.topics.device(device_id, DeviceChannel.DESIRED),
            payload,
            qos=spec.qos,
            retain=spec.retain,
            wait_s=10,
        )

    def close(self) -> None:
        self.client.stop()


def read_retained(broker: MosquittoBroker, topic: str, *, timeout_s: float = 5.0) -> bytes | None:
    """The retained payload on ``topic`` as a fresh subscriber sees it (None if none)."""
    got: list[bytes] = []
    client = MqttClient(
        MqttSettings(host=broker.host, port=broker.port, client_id=f"peek-{uuid.uuid4().hex[:8]}")
    )
    client.subscribe(topic, lambda m: got.append(m.payload) if m.retain else None, qos=QoS(1))
    client.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.stop()
    return got[0] if got else None


def retained_presence(broker: MosquittoBroker, device_id: str) -> Presence | None:
    payload = read_retained(broker, Topics().device(device_id, DeviceChannel.STATUS), timeout_s=1)
    return None if payload is None else decode(payload, Presence)


# -- agents ------------------------------------------------------------------------


def edge_settings(broker: MosquittoBroker, state_dir: Path, **overrides: Any) -> EdgeSettings:
    values: dict[str, Any] = {
        "device_id": "dev-1",
        "mqtt_host": broker.host,
        "mqtt_port": broker.port,
        "state_dir": state_dir,
        "keepalive_s": KEEPALIVE_S,
        "heartbeat_interval_s": 0.2,
        "telemetry_interval_s": 0.3,
        "reconnect_backoff_max_s": 0.5,
        "labels": {"site": "lab"},
        "desired_key_files": (control_key_file(),),
    }
    values.update(overrides)
    return EdgeSettings(**values)


AgentFactory = Callable[..., Agent]


class AgentProcess:
    """``python -m edge_agent`` as a child process, logging to a file."""

    def __init__(self, args: list[str], *, log_path: Path, env: dict[str, str]) -> None:
        self.args = args
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", *self.args],
                stdout=log,
                stderr=log,
                cwd=REPO_ROOT,
                env={**os.environ, **self.env},
            )

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


ProcessFactory = Callable[..., AgentProcess]


# -- serving ----------------------------------------------------------------------------


class GatedModel:
    """Wraps a ``ServingModel``'s embed: counts texts, and blocks while the gate is shut."""

    def __init__(self, model: ServingModel) -> None:
        self.inner = model
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        """Set once a batch is waiting at the shut gate."""
        self.seen: list[str] = []

    def embed(self, texts: list[str]) -> Any:
        if not self.gate.is_set():
            self.entered.set()
            assert self.gate.wait(30), "gate never opened"
        self.seen.extend(texts)
        return self.inner.embed(texts)

    def model(self) -> ServingModel:
        return ServingModel(variant=self.inner.variant, device=self.inner.device, embed=self.embed)


def post_embed(port: int, body: dict[str, Any], *, timeout_s: float = 30.0) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/embed", json=body, timeout=timeout_s)


def outbox_rows(state_dir: Path) -> list[tuple[int, int, ResultRecord]]:
    """(boot_epoch, seq, record) pending in an agent's outbox, read from its SQLite file."""
    path = state_dir / "outbox.sqlite"
    if not path.exists():
        return []
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT boot_epoch, seq, payload FROM outbox ORDER BY 1, 2").fetchall()
    return [(int(b), int(s), ResultRecord.model_validate_json(p)) for b, s, p in rows]


def _test_client(broker: MosquittoBroker, prefix: str) -> MqttClient:
    return MqttClient(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=f"{prefix}-{uuid.uuid4().hex[:8]}",
            keepalive_s=5,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        )
    )


class Acker:
    """Plays the controller's result ingest: records every key, acks after "committing"."""

    def __init__(self, broker: MosquittoBroker, *, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        self.client = _test_client(broker, "acker")
        self.acking = True
        self._lock = threading.Lock()
        self.records: dict[tuple[str, int, int], ResultRecord] = {}
        self.deliveries = 0
        self.client.subscribe(
            self.topics.all_devices(DeviceChannel.RESULTS), self._on_batch, qos=QoS.AT_LEAST_ONCE
        )
        self.client.start()
        assert self.client.wait_connected(10), "acker did not connect"
        time.sleep(0.1)

    def _on_batch(self, msg: InboundMessage) -> None:
        device_id = self.topics.parse_device(msg.topic).device_id
        batch = decode(msg.payload, ResultBatch, max_bytes=4 * 1024 * 1024)
        with self._lock:
            for record in batch.records:
                self.records.setdefault((device_id, batch.boot_epoch, record.seq), record)
            self.deliveries += len(batch.records)
            acking = self.acking
        if acking:  # "after the commit": the dict above is our database
            ack = ResultAck(
                device_id=device_id,
                boot_epoch=batch.boot_epoch,
                seqs=[r.seq for r in batch.records],
            )
            self.client.publish(
                self.topics.device(device_id, DeviceChannel.ACKS), encode(ack), qos=QoS(1)
            )

    def keys(self, device_id: str = "dev-1") -> set[tuple[int, int]]:
        with self._lock:
            return {(b, s) for d, b, s in self.records if d == device_id}

    def by_request(self, request_id: str) -> list[tuple[tuple[str, int, int], ResultRecord]]:
        with self._lock:
            return [(k, r) for k, r in self.records.items() if r.request_id == request_id]

    def close(self) -> None:
        self.client.stop()


class PoolResponder:
    """A test-only cloud pool: answers pool requests with a real model, says it accepts."""

    def __init__(
        self, broker: MosquittoBroker, model: ServingModel, *, topics: Topics | None = None
    ) -> None:
        self.topics = topics or Topics()
        self.model = model
        self.client = _test_client(broker, "pool")
        self.requests: list[InferRequest] = []
        self.client.subscribe(
            self.topics.pool_requests_shared(), self._on_request, qos=QoS.AT_LEAST_ONCE
        )
        self.client.start()
        assert self.client.wait_connected(10), "pool did not connect"
        self.set_status(accepting=True)
        time.sleep(0.1)

    def set_status(self, *, accepting: bool) -> None:
        status = PoolStatus(
            device_id="pool", accepting=accepting, queue_depth=0, est_wait_ms=1.0, replicas=1
        )
        self.client.publish(
            self.topics.pool_status(), encode(status), qos=QoS(1), retain=True, wait_s=10
        )

    def _on_request(self, msg: InboundMessage) -> None:
        request = decode(msg.payload, InferRequest, max_bytes=4 * 1024 * 1024)
        self.requests.append(request)
        assert msg.response_topic is not None
        rows = self.model.embed(request.texts)
        response = InferResponse(
            device_id="pool",
            request_id=request.request_id,
            status=InferStatus.OK,
            tier=Tier.CLOUD,
            variant=self.model.variant,
            compute_ms=1.0,
            embeddings=EmbeddingBlock.from_array(rows),
        )
        self.client.publish(
            msg.response_topic,
            encode(response),
            qos=QoS(1),
            correlation_data=msg.correlation_data,
        )

    def close(self) -> None:
        with suppress(MqttError):  # the test may have stopped the broker
            self.client.publish(self.topics.pool_status(), b"", qos=QoS(1), retain=True, wait_s=2)
        self.client.stop()


def serving_settings(
    broker: MosquittoBroker, state_dir: Path, model_dir: Path, **overrides: Any
) -> EdgeSettings:
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "http_port": 0,
        "intra_op_threads": 1,
        "uplink_resend_after_s": 1.0,
        "telemetry_interval_s": 1.0,
    }
    values.update(overrides)
    return edge_settings(broker, state_dir, **values)
