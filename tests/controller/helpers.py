"""Helpers for the controller's tests: a settable clock, a simulated agent speaking the
protocol through ``protocol.mqtt.MqttClient``, metric reading and polling, and API tokens:
a controller's ``http`` client is admin (``TEST_ADMIN_TOKEN``), ``client(role)`` gives one
with a fresh token of any role."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session

from cloud_controller.auth import Role, tokens
from cloud_controller.bridge import Bridge
from cloud_controller.settings import CloudSettings
from protocol.codec import decode, encode
from protocol.inference import (
    EmbeddingBlock,
    InferStatus,
    ResultAck,
    ResultBatch,
    ResultRecord,
    Tier,
)
from protocol.messages import (
    ApplyOutcome,
    DeviceStatus,
    Heartbeat,
    Hello,
    Presence,
    ReportedState,
    RuntimeCapabilities,
    Telemetry,
)
from protocol.mqtt import InboundMessage, MqttClient, MqttSettings, Will
from protocol.topics import DeviceChannel, QoS, Topics
from sim.broker import MosquittoBroker

TEST_ADMIN_TOKEN = "spw_test-admin-token-not-a-secret"
"""The bootstrap admin token of every test controller (``settings_for``)."""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class ManualClock:
    """A clock the test moves; thread-safe because the bridge reads it on paho's thread."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


def mqtt_client(
    broker: MosquittoBroker, client_id: str, *, keepalive_s: int = 5, will: Will | None = None
) -> MqttClient:
    client = MqttClient(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            keepalive_s=keepalive_s,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        ),
        will=will,
    )
    client.start()
    assert client.wait_connected(5), f"{client_id} did not connect"
    return client


class SimAgent:
    """What an edge agent says on the wire, without the agent: hello, presence, beats."""

    def __init__(
        self,
        broker: MosquittoBroker,
        device_id: str,
        *,
        boot_epoch: int = 1,
        keepalive_s: int = 5,
        topics: Topics | None = None,
    ) -> None:
        self.device_id = device_id
        self.boot_epoch = boot_epoch
        self.keepalive_s = keepalive_s
        self.topics = topics or Topics()
        self._seq = 0
        will = Will(
            self.topic(DeviceChannel.STATUS),
            encode(self.presence_message(DeviceStatus.OFFLINE, reason="lost")),
            QoS.AT_LEAST_ONCE,
            retain=True,
        )
        self.client = mqtt_client(broker, device_id, keepalive_s=keepalive_s, will=will)

    def topic(self, channel: DeviceChannel) -> str:
        return self.topics.device(self.device_id, channel)

    def presence_message(
        self, status: DeviceStatus, *, reason: str = "connected", boot_epoch: int | None = None
    ) -> Presence:
        return Presence(
            device_id=self.device_id,
            status=status,
            boot_epoch=self.boot_epoch if boot_epoch is None else boot_epoch,
            reason=reason,
        )

    def send(self, channel: DeviceChannel, message: Any) -> None:
        spec = channel.spec
        self.client.publish(
            self.topic(channel), encode(message), qos=spec.qos, retain=spec.retain, wait_s=5
        )

    def hello(
        self,
        *,
        hardware_class: str = "jetson-orin-nano",
        labels: dict[str, str] | None = None,
    ) -> None:
        self.send(
            DeviceChannel.STATUS, self.presence_message(DeviceStatus.ONLINE, reason="connected")
        )
        self.send(
            DeviceChannel.HELLO,
            Hello(
                device_id=self.device_id,
                hardware_class=hardware_class,
                labels=labels or {},
                agent_version="0.1.0",
                capabilities=RuntimeCapabilities(
                    execution_providers=["CPUExecutionProvider"], memory_mb=8192, cpu_count=6
                ),
                boot_epoch=self.boot_epoch,
                keepalive_s=self.keepalive_s,
            ),
        )

    def heartbeat(self) -> None:
        self._seq += 1
        self.send(
            DeviceChannel.HEARTBEAT,
            Heartbeat(
                device_id=self.device_id, seq=self._seq, uptime_s=1.0, boot_epoch=self.boot_epoch
            ),
        )

    def telemetry(self, **metrics: float) -> None:
        self.send(
            DeviceChannel.TELEMETRY,
            Telemetry(device_id=self.device_id, boot_epoch=self.boot_epoch, metrics=metrics),
        )

    def report(self, generation: int, *, error: str | None = None) -> None:
        self.send(
            DeviceChannel.REPORTED,
            ReportedState(
                device_id=self.device_id,
                observed_generation=generation,
                outcome=ApplyOutcome.FAILED if error else ApplyOutcome.APPLIED,
                error=error,
                boot_epoch=self.boot_epoch,
            ),
        )

    def results(self, records: list[ResultRecord], *, boot_epoch: int | None = None) -> None:
        """Publish one ``ResultBatch`` as the agent's outbox would (QoS 1)."""
        self.send(
            DeviceChannel.RESULTS,
            ResultBatch(
                device_id=self.device_id,
                boot_epoch=self.boot_epoch if boot_epoch is None else boot_epoch,
                records=records,
            ),
        )

    def die(self) -> None:
        """Lose the link without DISCONNECT, as a crash or a cut cable would."""
        self.client._stopping.set()  # no reconnect
        sock = self.client._client.socket()
        assert sock is not None
        sock.close()

    def stop(self) -> None:
        self.client.stop()


class Recorder:
    """Collects what arrives on one topic filter."""

    def __init__(self, client: MqttClient, topic_filter: str) -> None:
        self.messages: list[InboundMessage] = []
        self._lock = threading.Lock()
        client.subscribe(topic_filter, self._add, qos=QoS.AT_LEAST_ONCE)

    def _add(self, message: InboundMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def snapshot(self) -> list[InboundMessage]:
        with self._lock:
            return list(self.messages)


SERVED_AT = datetime(2030, 1, 1, tzinfo=UTC)


def record(
    seq: int,
    *,
    request_id: str | None = None,
    served_at: datetime | None = None,
    embeddings: list[list[float]] | None = None,
    **fields: Any,
) -> ResultRecord:
    """A result record; ``served_at`` defaults to ``SERVED_AT`` plus ``seq`` seconds."""
    block = None
    if embeddings is not None:
        import numpy as np

        block = EmbeddingBlock.from_array(np.array(embeddings, dtype=np.float32))
    return ResultRecord(
        seq=seq,
        request_id=request_id or f"req-{seq}",
        status=fields.pop("status", InferStatus.OK),
        tier=fields.pop("tier", Tier.EDGE),
        served_at=served_at or SERVED_AT + timedelta(seconds=seq),
        embeddings=block,
        **fields,
    )


def records(seqs: range | list[int], **fields: Any) -> list[ResultRecord]:
    return [record(seq, **fields) for seq in seqs]


def acks(recorder: Recorder) -> list[ResultAck]:
    return [decode(m.payload, ResultAck) for m in recorder.snapshot()]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0.0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@dataclass
class Controller:
    app: FastAPI
    http: TestClient
    clock: ManualClock
    settings: CloudSettings

    @property
    def bridge(self) -> Bridge:
        return self.app.state.runtime.bridge

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.http.get("/metrics").text, name, **labels)

    def token(self, role: Role | str, *, name: str | None = None) -> str:
        """A fresh token of ``role``, stored straight in the controller's database."""
        role = Role(role)
        with Session(self.app.state.runtime.engine) as session:
            _, secret = tokens.create(
                session, name=name or f"test-{role.value}", role=role, now=self.clock()
            )
            session.commit()
        return secret

    def client(self, role: Role | str | None = None, *, token: str | None = None) -> TestClient:
        """A client of the running app that sends ``token``, or a fresh token of ``role``,
        or no token at all when given neither."""
        if token is None and role is not None:
            token = self.token(role)
        return TestClient(self.app, headers=bearer(token) if token is not None else None)

    def device(self, device_id: str) -> dict[str, Any]:
        response = self.http.get(f"/api/v1/devices/{device_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def has_device(self, device_id: str, **fields: Any) -> bool:
        response = self.http.get(f"/api/v1/devices/{device_id}")
        if response.status_code != 200:
            return False
        body = response.json()
        return all(body.get(k) == v for k, v in fields.items())


def settings_for(broker: MosquittoBroker, database_url: str, **overrides: Any) -> CloudSettings:
    overrides.setdefault("admin_token", TEST_ADMIN_TOKEN)
    return CloudSettings(
        database_url=database_url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_reconnect_backoff_max_s=0.5,
        mqtt_keepalive_s=5,
        **overrides,
    )


def wait_subscribed(broker: MosquittoBroker, controller: Controller) -> None:
    """Wait until the bridge's subscriptions are live: a report from an unknown device
    (the last channel subscribed) comes back as ignored."""
    probe = mqtt_client(broker, "subscription-probe")
    try:
        message = ReportedState(
            device_id="probe",
            observed_generation=0,
            outcome=ApplyOutcome.APPLIED,
            boot_epoch=0,
        )
        topic = Topics(controller.settings.topic_root).device("probe", DeviceChannel.REPORTED)

        def ignored() -> bool:
            probe.publish(topic, encode(message), qos=QoS.AT_LEAST_ONCE, wait_s=5)
            return wait_for(
                lambda: (
                    controller.metric(
                        "spillway_mqtt_ignored_total", channel="reported", reason="unknown_device"
                    )
                    > 0
                ),
                timeout_s=0.5,
            )

        assert wait_for(ignored, timeout_s=10), "bridge subscriptions never became live"
    finally:
        probe.stop()
