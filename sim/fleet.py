"""A fleet of simulated agents speaking the real wire protocol, many per process.

A real agent is a process with a paho network thread, a model and an outbox; a thousand of
them do not fit on a 2-core host. A *simulated* agent keeps exactly what the controller
sees: its own MQTT connection (MQTT v5, a retained ``Presence(offline, "lost")`` as its Last
Will), ``Hello`` + retained ``Presence(online)`` after CONNACK, ``Heartbeat`` and
``Telemetry`` on its interval (QoS 0, ``protocol`` messages and topics), and an answer to
every ``DesiredState`` (a ``ReportedState`` with the generation applied). It has no model:
an assigned one is reported ``active`` at once (``installed_at_once``: nothing to download,
so a rollout measures the control plane alone), its telemetry numbers are synthetic, and
every report calls these agents "simulated".

``run_worker`` drives many such agents in one process on one thread with paho's manual
loop (``loop_read``/``loop_write``/``loop_misc`` over a selector), so a fleet of N costs
a few processes, not N threads. ``FleetProcesses`` starts the workers and collects their
counters. ``controller_http`` is the one place a benchmark builds its REST client (and
where the admin token is added: the one the benchmark gave its controller, else
``SPILLWAY_ADMIN_TOKEN``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import selectors
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from typing import Any

import httpx
import paho.mqtt.client as paho

from protocol.codec import DecodeError, decode, encode
from protocol.messages import (
    MODEL_POLICY_KEY,
    ApplyOutcome,
    DesiredState,
    DeviceStatus,
    Heartbeat,
    Hello,
    Presence,
    ReportedState,
    RuntimeCapabilities,
    Telemetry,
)
from protocol.topics import DeviceChannel, Topics
from sim.profiles import profile_for

AGENT_VERSION = "sim-1"
BOOT_EPOCH = 1


def installed_at_once(policy: dict[str, Any]) -> dict[str, Any]:
    """The document a simulated agent reports for ``policy``: applied as it stands, and an
    assigned model (it has none to download) reported ``active`` at once."""
    section = policy.get(MODEL_POLICY_KEY)
    if not isinstance(section, dict) or not section.get("artifact_sha256"):
        return policy
    return {**policy, MODEL_POLICY_KEY: {**section, "state": "active"}}


def controller_http(
    base_url: str, *, token: str | None = None, timeout_s: float = 30.0
) -> httpx.Client:
    """The REST client every simulator call goes through (auth header in one place):
    ``token``, else ``SPILLWAY_ADMIN_TOKEN`` from the environment, else none."""
    headers = {}
    token = token or os.environ.get("SPILLWAY_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)


@dataclass
class WorkerSpec:
    host: str
    port: int
    device_ids: list[str]
    first_index: int
    """Index of the first device in the fleet (picks its profile in turn)."""
    interval_s: float = 1.0
    keepalive_s: int = 30
    topic_root: str = "spillway/v1"
    seed: int = 0


@dataclass
class WorkerStats:
    worker: int
    connected: int = 0
    heartbeats: int = 0
    telemetry: int = 0
    reported: int = 0
    desired_bad: int = 0
    max_tick_lag_s: float = 0.0
    """How late the most-late periodic send was: > interval means the worker fell behind."""
    errors: list[str] = field(default_factory=list)


class _SimAgent:
    def __init__(self, device_id: str, index: int, spec: WorkerSpec, stats: WorkerStats) -> None:
        self.device_id = device_id
        self.topics = Topics(spec.topic_root)
        self.profile = profile_for(index)
        self.spec = spec
        self.stats = stats
        self.seq = 0
        self.started = time.monotonic()
        self.connected = False
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.max_queued_messages_set(0)
        will = Presence(
            device_id=device_id, status=DeviceStatus.OFFLINE, boot_epoch=BOOT_EPOCH, reason="lost"
        )
        self.client.will_set(
            self.topics.device(device_id, DeviceChannel.STATUS), encode(will), qos=1, retain=True
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _publish(self, channel: DeviceChannel, payload: bytes) -> None:
        spec = channel.spec
        self.client.publish(
            self.topics.device(self.device_id, channel),
            payload,
            qos=int(spec.qos),
            retain=spec.retain,
        )

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.stats.errors.append(f"{self.device_id}: CONNACK {reason}")
            return
        self.connected = True
        self.stats.connected += 1
        client.subscribe(self.topics.device(self.device_id, DeviceChannel.DESIRED), qos=1)
        hello = Hello(
            device_id=self.device_id,
            hardware_class=self.profile.hardware_class,
            labels={"fleet": "sim", "simulated": "true"},
            agent_version=AGENT_VERSION,
            capabilities=RuntimeCapabilities(
                execution_providers=["CPUExecutionProvider"],
                memory_mb=self.profile.memory_mb,
                cpu_count=self.profile.cpu_cores,
            ),
            boot_epoch=BOOT_EPOCH,
            keepalive_s=self.spec.keepalive_s,
        )
        self._publish(DeviceChannel.HELLO, encode(hello))
        online = Presence(
            device_id=self.device_id, status=DeviceStatus.ONLINE, boot_epoch=BOOT_EPOCH
        )
        self._publish(DeviceChannel.STATUS, encode(online))

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            desired = decode(msg.payload, DesiredState)
        except DecodeError as exc:
            self.stats.desired_bad += 1
            self.stats.errors.append(f"{self.device_id}: bad desired: {exc}"[:200])
            return
        reported = ReportedState(
            device_id=self.device_id,
            observed_generation=desired.generation,
            outcome=ApplyOutcome.APPLIED,
            policy=installed_at_once(desired.policy),
            boot_epoch=BOOT_EPOCH,
        )
        self._publish(DeviceChannel.REPORTED, encode(reported))
        self.stats.reported += 1

    def tick(self, rng: random.Random) -> None:
        """One heartbeat and one telemetry sample (synthetic numbers)."""
        beat = Heartbeat(
            device_id=self.device_id,
            seq=self.seq,
            uptime_s=time.monotonic() - self.started,
            boot_epoch=BOOT_EPOCH,
        )
        self.seq += 1
        self._publish(DeviceChannel.HEARTBEAT, encode(beat))
        self.stats.heartbeats += 1
        sample = Telemetry(
            device_id=self.device_id,
            boot_epoch=BOOT_EPOCH,
            metrics={
                "cpu_percent": rng.uniform(5, 60),
                "memory_used_mb": rng.uniform(0.2, 0.6) * self.profile.memory_mb,
                "queue_items": float(rng.randrange(0, 8)),
                "simulated": 1.0,
            },
        )
        self._publish(DeviceChannel.TELEMETRY, encode(sample))
        self.stats.telemetry += 1


def run_worker(
    index: int, spec: WorkerSpec, stop: EventType, reports: mp.Queue[WorkerStats]
) -> None:
    """Drive ``spec.device_ids`` until ``stop``; put a ``WorkerStats`` every second."""
    stats = WorkerStats(worker=index)
    rng = random.Random(spec.seed + index)
    agents = [
        _SimAgent(device_id, spec.first_index + k, spec, stats)
        for k, device_id in enumerate(spec.device_ids)
    ]
    selector = selectors.DefaultSelector()
    for agent in agents:
        try:
            agent.client.connect(spec.host, spec.port, keepalive=spec.keepalive_s)
        except OSError as exc:
            stats.errors.append(f"{agent.device_id}: connect: {exc}")
            continue
        sock = agent.client.socket()
        if sock is not None:
            selector.register(sock, selectors.EVENT_READ, agent)
    # Each agent's ticks are spread over the interval so the fleet sends evenly.
    start = time.monotonic()
    count = max(1, len(agents))
    due = [start + spec.interval_s * (k / count) for k in range(len(agents))]
    last_misc = last_report = start
    while not stop.is_set():
        now = time.monotonic()
        for k, agent in enumerate(agents):
            if agent.connected and now >= due[k]:
                stats.max_tick_lag_s = max(stats.max_tick_lag_s, now - due[k])
                agent.tick(rng)
                due[k] += spec.interval_s
                if due[k] < now:  # fell behind by more than an interval: skip, do not burst
                    due[k] = now + spec.interval_s
        for key, _ in selector.select(timeout=0.01):
            key.data.client.loop_read()
        for agent in agents:
            if agent.client.want_write():
                agent.client.loop_write()
        if now - last_misc >= 1.0:
            for agent in agents:
                agent.client.loop_misc()
            last_misc = now
        if now - last_report >= 1.0:
            reports.put(_copy(stats))
            stats.errors.clear()
            stats.max_tick_lag_s = 0.0
            last_report = now
    for agent in agents:
        agent.client.disconnect()
        agent.client.loop_write()
    reports.put(_copy(stats))


def _copy(stats: WorkerStats) -> WorkerStats:
    return WorkerStats(**{**stats.__dict__, "errors": list(stats.errors)})


class FleetProcesses:
    """N simulated agents in ``workers`` processes; ``totals()`` sums their latest counters."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        agents: int,
        workers: int,
        interval_s: float = 1.0,
        prefix: str = "sim",
    ) -> None:
        self.device_ids = [f"{prefix}-{i:05d}" for i in range(agents)]
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._reports: mp.Queue[WorkerStats] = ctx.Queue()
        self._latest: dict[int, WorkerStats] = {}
        self.errors: list[str] = []
        per = -(-agents // max(1, workers))
        self._procs = []
        for w in range(workers):
            ids = self.device_ids[w * per : (w + 1) * per]
            if not ids:
                continue
            spec = WorkerSpec(
                host=host, port=port, device_ids=ids, first_index=w * per, interval_s=interval_s
            )
            self._procs.append(
                ctx.Process(
                    target=run_worker,
                    args=(w, spec, self._stop, self._reports),
                    name=f"sim-fleet-{w}",
                    daemon=True,
                )
            )

    def start(self) -> None:
        for proc in self._procs:
            proc.start()

    def poll(self) -> None:
        while True:
            try:
                stats = self._reports.get_nowait()
            except queue.Empty:
                return
            self._latest[stats.worker] = stats
            self.errors.extend(stats.errors)

    def totals(self) -> dict[str, float]:
        self.poll()
        latest = list(self._latest.values())
        return {
            "connected": sum(s.connected for s in latest),
            "heartbeats": sum(s.heartbeats for s in latest),
            "telemetry": sum(s.telemetry for s in latest),
            "reported": sum(s.reported for s in latest),
            "desired_bad": sum(s.desired_bad for s in latest),
            "max_tick_lag_s": max((s.max_tick_lag_s for s in latest), default=0.0),
            "workers_alive": sum(p.is_alive() for p in self._procs),
        }

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.poll()
