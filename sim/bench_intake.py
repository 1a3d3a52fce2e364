"""``spillway bench intake``: what one inbound message costs the controller's MQTT intake.

``bench fleet`` measures the whole control plane under a simulated fleet, with the
simulator, mosquitto and the controller sharing the host; this bench isolates the part that
gave out at 1,000 agents: the controller's MQTT intake (paho's network thread, topic
routing, checked decoding, queueing) with the real ingest worker applying behind it.

One real mosquitto (``queue_qos0_messages`` on), one real ``Bridge`` (its ``MqttClient``,
``ingest`` worker and SQLite database, the devices registered) in a spawned child process.
The run first subscribes the controller's session and disconnects it, then one publisher
sends ``--devices`` x ``--rounds`` heartbeats and as many telemetry samples (the messages
``sim.fleet`` agents send, QoS 0 as the protocol says, one topic per device) while the
controller is away, so mosquitto holds the whole backlog; then the controller connects and
drains it as fast as it can, with nothing else on the host busy but mosquitto. That is the
1,000-agent situation (a backlog in the broker and the socket) without the publishers'
CPU in the measurement. Measured in the child:

* **intake msgs/s** - messages decoded, checked and queued for the database
  (``spillway_ingest_received_total``) from CONNACK to the last one;
* **CPU per message** - of paho's network thread (``/proc/self/task/<tid>/stat``), of the
  ingest worker, and of the whole process (``time.process_time``) until all are applied.

``intake_messages`` (pure) builds the payloads; the decode alone is timed in the parent for
comparison.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import tempfile
import threading
import time
import timeit
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import typer
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlmodel import Session

from cloud_controller import ingest
from cloud_controller.app import create_app
from cloud_controller.bridge import Bridge
from cloud_controller.clock import system_clock
from cloud_controller.database import make_engine, migrate
from cloud_controller.heap import long_lived_frozen
from cloud_controller.metrics import ControllerMetrics
from cloud_controller.settings import CloudSettings
from protocol.codec import decode, encode
from protocol.messages import Heartbeat, Hello, RuntimeCapabilities, Telemetry
from protocol.topics import DeviceChannel, Topics
from sim.broker import BrokerError, MosquittoBroker
from sim.report import BenchReport, progress

CLIENT_ID = "spillway-bench-intake"
"""The controller's client id: its session is primed, then resumed."""
_CHANNELS: dict[str, type[Heartbeat | Telemetry]] = {"heartbeat": Heartbeat, "telemetry": Telemetry}
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class IntakeBenchError(RuntimeError):
    """The benchmark could not run; the message says why."""


@dataclass(frozen=True)
class IntakeOptions:
    devices: int = 1000
    rounds: int = 10
    """Heartbeat + telemetry per device: 2 x devices x rounds messages in all."""
    timeout_s: float = 60.0


@dataclass(frozen=True)
class IntakeResult:
    """What the controller child measured (seconds are wall or CPU, as named)."""

    messages: int
    received: int
    rejected: int
    applied: int
    intake_s: float
    """CONNACK to the last message queued for the database."""
    apply_s: float
    """CONNACK to the last message applied."""
    network_cpu_s: float
    worker_cpu_s: float
    process_cpu_s: float
    batches: int
    batched: int
    gc_s: float
    """Wall seconds spent in the garbage collector (every thread), CONNACK to applied."""
    gc_full: int
    """Full (generation 2) collections in that time."""


def device_ids(devices: int) -> list[str]:
    return [f"sim-{i:05d}" for i in range(devices)]


def intake_messages(
    devices: int, rounds: int, *, root: str, seed: int = 0
) -> list[tuple[str, bytes]]:
    """(topic, payload) of ``rounds`` heartbeats and telemetry samples per device, round by
    round, as ``sim.fleet`` agents send them (pure)."""
    topics = Topics(root)
    rng = random.Random(seed)
    sent_at = datetime(2026, 1, 1, tzinfo=UTC)
    out: list[tuple[str, bytes]] = []
    for seq in range(rounds):
        for device_id in device_ids(devices):
            beat = Heartbeat(
                device_id=device_id, seq=seq, uptime_s=float(seq), boot_epoch=1, sent_at=sent_at
            )
            sample = Telemetry(
                device_id=device_id,
                boot_epoch=1,
                sent_at=sent_at,
                metrics={
                    "cpu_percent": rng.uniform(5, 60),
                    "memory_used_mb": rng.uniform(800, 4000),
                    "queue_items": float(rng.randrange(0, 8)),
                    "simulated": 1.0,
                },
            )
            out.append((topics.device(device_id, DeviceChannel.HEARTBEAT), encode(beat)))
            out.append((topics.device(device_id, DeviceChannel.TELEMETRY), encode(sample)))
    return out


def _thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process."""
    if native_id is None:
        return float("nan")
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _native_id(name: str) -> int | None:
    for thread in threading.enumerate():
        if thread.name == name:
            return thread.native_id
    return None


class _GcTimer:
    """Time spent in garbage collections while it is open (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._began
        self.full += info["generation"] == 2

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def _count(registry: Any, name: str) -> int:
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return int(total)


def _controller_child(
    host: str, port: int, work: str, devices: int, messages: int, timeout_s: float, pipe: Connection
) -> None:
    """The controller: set up, wait for "go", drain the backlog, send an ``IntakeResult``."""
    try:
        settings = CloudSettings(
            database_url=f"sqlite:///{work}/controller.db",
            mqtt_host=host,
            mqtt_port=port,
            mqtt_client_id=CLIENT_ID,
            signing_key_path=Path(work) / "keys" / "signing.key",
            ingest_queue_max=messages + 1,
        )
        engine = make_engine(settings.database_url)
        migrate(engine)
        now = system_clock()
        hellos: list[tuple[ingest.Inbound, datetime]] = [
            (
                Hello(
                    device_id=device_id,
                    hardware_class="jetson-orin-nano",
                    agent_version="sim-1",
                    capabilities=RuntimeCapabilities(memory_mb=8192, cpu_count=6),
                    boot_epoch=1,
                    keepalive_s=30,
                ),
                now,
            )
            for device_id in device_ids(devices)
        ]
        with Session(engine) as session:
            ingest.apply_batch(session, hellos, keep=settings.telemetry_history)
            session.commit()
        # The REST app (built, not served) makes the heap the garbage collector walks as
        # large as a controller process's.
        app = create_app(settings)
        metrics = ControllerMetrics()
        bridge = Bridge(settings=settings, engine=engine, metrics=metrics, clock=system_clock)
        connected: list[float] = []
        bridge.client.add_connect_hook(lambda present: connected.append(time.perf_counter()))
        pipe.send("ready")
        if pipe.recv() != "go":
            return
        with long_lived_frozen():  # as the controller's app does once it has started
            result = _drain(bridge, metrics, connected, messages, timeout_s)
        engine.dispose()
        del app
        pipe.send(result)
    except Exception as exc:  # reported to the parent, which raises it as a bench error
        pipe.send(f"controller failed: {exc!r}")


def _drain(
    bridge: Bridge,
    metrics: ControllerMetrics,
    connected: list[float],
    messages: int,
    timeout_s: float,
) -> IntakeResult:
    """Start the bridge, wait until every message is queued and then applied, stop it."""
    collector = _GcTimer()
    try:
        cpu0 = time.process_time()
        bridge.start()
        network = _native_id(f"mqtt-{CLIENT_ID}")
        worker = _native_id("controller-ingest")
        net0, work0 = _thread_cpu_s(network), _thread_cpu_s(worker)
        deadline = time.monotonic() + timeout_s
        received = rejected = 0
        last = time.perf_counter()
        while time.monotonic() < deadline:
            got = _count(metrics.registry, "spillway_ingest_received_total")
            rejected = _count(metrics.registry, "spillway_mqtt_rejected_total")
            if got != received:
                received, last = got, time.perf_counter()
            if received + rejected >= messages:
                break
            time.sleep(0.005)
        net1 = _thread_cpu_s(network)
        bridge.wait_idle(max(1.0, deadline - time.monotonic()))
        applied_at = time.perf_counter()
        result = IntakeResult(
            messages=messages,
            received=received,
            rejected=rejected,
            applied=_count(metrics.registry, "spillway_mqtt_messages_total"),
            intake_s=last - connected[0] if connected else float("nan"),
            apply_s=applied_at - connected[0] if connected else float("nan"),
            network_cpu_s=net1 - net0,
            worker_cpu_s=_thread_cpu_s(worker) - work0,
            process_cpu_s=time.process_time() - cpu0,
            gc_s=collector.seconds,
            gc_full=collector.full,
            batches=_count(metrics.registry, "spillway_ingest_batch_messages_count"),
            batched=_count(metrics.registry, "spillway_ingest_batch_messages_sum"),
        )
    finally:
        collector.close()
        bridge.stop()
    return result


def _prime_session(broker: MosquittoBroker, root: str) -> None:
    """Subscribe the controller's session to what the bridge subscribes to (every upward
    channel), then leave: mosquitto queues what arrives for it until it comes back."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, protocol=paho.MQTTv5
    )
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    subscribed: list[int] = []
    client.on_subscribe = lambda client, userdata, mid, *rest: subscribed.append(mid)
    client.connect(broker.host, broker.port, clean_start=True, properties=props)
    client.loop_start()
    topics = Topics(root)
    try:
        mids = [
            client.subscribe(topics.all_devices(channel), qos=int(channel.spec.qos))[1]
            for channel in DeviceChannel
            if channel.spec.direction == "up"
        ]
        deadline = time.monotonic() + 10
        while set(mids) - set(subscribed) and time.monotonic() < deadline:
            time.sleep(0.01)
        if set(mids) - set(subscribed):
            raise IntakeBenchError("the controller's session was not subscribed in 10 s")
    finally:
        client.disconnect()
        client.loop_stop()


def _publish(broker: MosquittoBroker, messages: list[tuple[str, bytes]], root: str) -> float:
    """Publish everything (QoS 0), then one QoS 1 message whose PUBACK says the broker has
    routed all before it; seconds it took."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id="bench-intake-publisher", protocol=paho.MQTTv5
    )
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    began = time.perf_counter()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=0)
        info = client.publish(f"{root}/bench/intake-done", b"", qos=1)
        info.wait_for_publish(timeout=60)
        if not info.is_published():
            raise IntakeBenchError("the broker did not acknowledge the backlog in 60 s")
    finally:
        client.disconnect()
        client.loop_stop()
    return time.perf_counter() - began


def _decode_us(messages: list[tuple[str, bytes]]) -> float:
    """Microseconds one ``codec.decode`` of these payloads takes, on average (parent)."""
    sample = messages[:2000]
    topics = Topics()
    models = [_CHANNELS[topics.parse_device(topic).channel.value] for topic, _ in sample]

    def run() -> None:
        for (_, payload), model in zip(sample, models, strict=True):
            decode(payload, model)

    best = min(timeit.repeat(run, number=1, repeat=5))
    return best / len(sample) * 1e6


def run_intake_bench(options: IntakeOptions, *, step: Any = None) -> BenchReport:
    notify = step or (lambda what: None)
    root = Topics().root
    messages = intake_messages(options.devices, options.rounds, root=root)
    report = BenchReport(
        "intake",
        f"Controller MQTT intake: a backlog of {len(messages)} heartbeats + telemetry "
        f"from {options.devices} devices",
    )
    decode_us = _decode_us(messages)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="spillway-bench-intake-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "broker", extra_config="queue_qos0_messages true")
        broker.start()
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_controller_child,
            args=(
                broker.host,
                broker.port,
                str(work),
                options.devices,
                len(messages),
                options.timeout_s,
                child,
            ),
            name="bench-intake-controller",
            daemon=True,
        )
        try:
            proc.start()
            if not parent.poll(120) or (answer := parent.recv()) != "ready":
                raise IntakeBenchError(f"controller not ready: {locals().get('answer')}")
            notify(f"controller ready ({options.devices} devices registered)")
            _prime_session(broker, root)
            publish_s = _publish(broker, messages, root)
            notify(f"{len(messages)} messages waiting in the broker")
            parent.send("go")
            if not parent.poll(options.timeout_s + 30):
                raise IntakeBenchError("the controller did not answer")
            result = parent.recv()
            if not isinstance(result, IntakeResult):
                raise IntakeBenchError(str(result))
            notify("backlog drained")
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            broker.stop()
    _fill(report, result, decode_us=decode_us, publish_s=publish_s)
    return report


def _fill(report: BenchReport, result: IntakeResult, *, decode_us: float, publish_s: float) -> None:
    n = max(1, result.received)
    report.table(
        "Intake of the backlog (controller in its own process, SQLite)",
        ["measure", "value"],
        [
            {"measure": "messages in the backlog", "value": result.messages},
            {"measure": "decoded and queued (received)", "value": result.received},
            {"measure": "rejected", "value": result.rejected},
            {"measure": "applied to the database", "value": result.applied},
            {"measure": "intake msgs/s (CONNACK to last queued)", "value": n / result.intake_s},
            {"measure": "applied msgs/s (CONNACK to last applied)", "value": n / result.apply_s},
            {"measure": "network thread CPU us/msg", "value": result.network_cpu_s / n * 1e6},
            {"measure": "ingest worker CPU us/msg", "value": result.worker_cpu_s / n * 1e6},
            {"measure": "whole process CPU us/msg", "value": result.process_cpu_s / n * 1e6},
            {"measure": "garbage collection us/msg", "value": result.gc_s / n * 1e6},
            {"measure": "full garbage collections", "value": result.gc_full},
            {
                "measure": "messages per transaction, mean",
                "value": result.batched / result.batches if result.batches else float("nan"),
            },
            {"measure": "codec.decode alone us/msg (parent)", "value": decode_us},
            {"measure": "publishing the backlog s (not measured above)", "value": publish_s},
        ],
    )
    report.ratio("intake msgs/s", n / result.intake_s, target=2000.0)
    report.note(
        "The backlog waits in mosquitto (queue_qos0_messages) while the controller is away; "
        "then the controller drains it with no publisher running. CPU times come from "
        "/proc (10 ms ticks)."
    )
    report.data.update({"result": asdict(result), "decode_us": decode_us})


def bench_intake(
    out: Path = typer.Option(Path("var/bench"), "--out", help="Where the reports go."),
    devices: int = typer.Option(1000, "--devices", min=1, max=20000, help="Distinct devices."),
    rounds: int = typer.Option(
        10, "--rounds", min=1, max=1000, help="Heartbeat + telemetry per device."
    ),
) -> None:
    """A backlog of heartbeats + telemetry drained by the controller: msgs/s, CPU per message."""
    options = IntakeOptions(devices=devices, rounds=rounds)
    try:
        with progress(3, "bench intake") as step:
            report = run_intake_bench(options, step=step)
    except (IntakeBenchError, BrokerError) as exc:
        typer.echo(f"spillway bench intake: {exc}", err=True)
        raise typer.Exit(1) from exc
    paths = report.write(out)
    typer.echo(report.markdown())
    typer.echo(f"reports     {paths['json']} {paths['md']} {paths['png']}")
