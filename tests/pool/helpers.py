"""A pool of real replica processes on a test's own broker, and a client that counts answers."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cloud_controller.pool.orchestrator import LocalProcessOrchestrator
from cloud_controller.pool.settings import PoolSettings
from cloud_controller.pool.supervisor import PoolSupervisor
from protocol.codec import decode, encode
from protocol.inference import InferRequest, InferResponse, PoolStatus
from protocol.mqtt import InboundMessage, MqttClient, MqttSettings
from protocol.topics import QoS, Topics

SENTENCES = [
    "The cat sat on the mat.",
    "Tensor parallelism splits attention heads across ranks.",
    "Overflow requests land in the cloud pool.",
    "short",
    "A longer sentence about brokers, sessions and acknowledgements that arrive late.",
    "Edge devices offload when their queue is too long.",
]


def wait_for(predicate: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class Answer:
    response: InferResponse
    correlation: bytes | None
    at: float


@dataclass
class Requester:
    """Publishes InferRequests with a response topic and records every answer."""

    mqtt: MqttClient
    topics: Topics
    client_id: str
    answers: dict[str, list[Answer]] = field(default_factory=lambda: defaultdict(list))
    statuses: list[PoolStatus] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.mqtt.subscribe(self.topics.replies(self.client_id), self._on_reply, qos=QoS(1))
        self.mqtt.subscribe(self.topics.pool_status(), self._on_status, qos=QoS(1))
        self.mqtt.start()
        assert self.mqtt.wait_connected(10)

    def _on_reply(self, msg: InboundMessage) -> None:
        response = decode(msg.payload, InferResponse, max_bytes=8 * 1024 * 1024)
        with self.lock:
            self.answers[response.request_id].append(
                Answer(response, msg.correlation_data, time.monotonic())
            )

    def _on_status(self, msg: InboundMessage) -> None:
        with self.lock:
            self.statuses.append(decode(msg.payload, PoolStatus))

    def send(
        self,
        texts: list[str],
        *,
        request_id: str | None = None,
        deadline: datetime | None = None,
        raw: bytes | None = None,
    ) -> InferRequest:
        request = InferRequest(
            device_id="tester",
            request_id=request_id or uuid.uuid4().hex,
            texts=texts,
            deadline=deadline,
        )
        self.mqtt.publish(
            self.topics.pool_requests(),
            raw if raw is not None else encode(request),
            qos=QoS.AT_LEAST_ONCE,
            response_topic=self.topics.replies(self.client_id),
            correlation_data=request.request_id.encode(),
            wait_s=10,
        )
        return request

    def answered(self, request_id: str) -> list[Answer]:
        with self.lock:
            return list(self.answers.get(request_id, []))

    def latest_status(self) -> PoolStatus | None:
        with self.lock:
            return self.statuses[-1] if self.statuses else None


@dataclass
class RunningPool:
    settings: PoolSettings
    supervisor: PoolSupervisor
    orchestrator: LocalProcessOrchestrator
    requester: Requester

    def ready(self, replicas: int) -> bool:
        loads = self.supervisor.loads()
        return sum(1 for load in loads.values() if load.ready) >= replicas

    def log_tail(self) -> str:
        parts = []
        for path in sorted(self.orchestrator.log_dir.glob("*.log")):
            parts.append(f"== {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


@contextmanager
def running_pool(
    *, host: str, port: int, state_dir: Path, replicas: int, tp: int, **overrides: object
) -> Iterator[RunningPool]:
    settings = PoolSettings(
        mqtt_host=host,
        mqtt_port=port,
        replicas=replicas,
        tp=tp,
        state_dir=state_dir,
        threads_per_rank=1,
        load_interval_s=0.2,
        status_interval_s=0.5,
        client_id_prefix=f"pool-{uuid.uuid4().hex[:6]}",
        **overrides,  # type: ignore[arg-type]
    )
    orchestrator = LocalProcessOrchestrator(settings)
    supervisor = PoolSupervisor(settings, orchestrator)
    topics = Topics(settings.topic_root)
    client_id = f"tester-{uuid.uuid4().hex[:8]}"
    requester = Requester(
        MqttClient(MqttSettings(host=host, port=port, client_id=client_id)), topics, client_id
    )
    requester.start()
    stop = threading.Event()
    supervisor.start()
    thread = threading.Thread(target=supervisor.run, args=(stop,), kwargs={"tick_s": 0.1})
    thread.start()
    pool = RunningPool(settings, supervisor, orchestrator, requester)
    try:
        try:
            wait_for(lambda: pool.ready(replicas), timeout_s=120, what=f"{replicas} replicas")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{pool.log_tail()}") from None
        yield pool
    finally:
        stop.set()
        thread.join(timeout=10)
        supervisor.shutdown()
        requester.mqtt.stop()
