"""``spillway bench overflow``: edge-only vs edge + cloud overflow under a burst, one run.

The seed's headline table, measured on this machine and labelled for what it is:

* **cloud** - the real overflow pool (``PoolSupervisor``, one replica, TP=1, torch MiniLM
  FP32 on this host's cores) behind a real mosquitto. Its capacity is measured first
  (closed loop of single-text requests).
* **edge** - the real agent serving runtime (``ServingRuntime``: routing, the overflow
  policy, dynamic batching, the durable outbox, ``MqttCloudClient`` to the pool) with a
  **simulated** Jetson model: ``SimulatedModel`` sleeps the batch latency the calibrated
  service-time model gives (real INT8 ONNX Runtime measured here on 1 thread, divided by
  the profile's speed). Simulating the edge keeps it off the CPU the pool needs: on a 2-core
  host a real edge and a real pool would measure their contention, not overflow.
* **edge speed** - ``--edge-speed auto`` (default) scales the profile so the edge's modelled
  batch-1 capacity is ``--edge-share`` of the pool's measured capacity: the pool here is 2
  CPU cores, not GPUs, so the profile's own speed would make the "cloud" smaller than one
  edge. The report states the scale and the profile's unscaled capacity. A number instead
  of ``auto`` multiplies the profile's speed by it (1 = the profile as modelled).
* **capacity and trace** - the edge's capacity C is measured (closed loop, offload off); the
  trace is ``traces.bursts``: ``--base-factor`` x C, then one burst of ``--burst-factor`` x C
  for ``--burst-s``, then the base rate again. Every request carries a deadline of the
  trace's SLO.
* **modes** - the same trace, same run, replayed open loop (each request sent at its arrival
  time, however late the previous ones are) against edge-only (offload disabled) and
  edge + overflow, in that order.
* **impairment** - ``--impair SPEC`` (``sim.impair``: delay, jitter, loss, rate, partitions)
  puts the overflow edge's MQTT connection through an impaired link to the broker; the
  pool's own connection is not impaired. Partition times count from the start of the
  overflow replay. The report names the backend (netns + netem, or the userspace proxy)
  and why, the spec, and the link's counters. Without it nothing changes.

Goodput is requests answered ``ok`` within the SLO per second; latency is measured from
each request's scheduled arrival. Target: goodput with overflow >= 2.5x edge-only over the
burst, and p99 within the SLO.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from cloud_controller.pool import LocalProcessOrchestrator, PoolClient, PoolSettings, PoolSupervisor
from edge_agent.clock import SystemClock
from edge_agent.cloud import CloudClient, MqttCloudClient, NoCloud
from edge_agent.eventloop import LoopThread
from edge_agent.metrics import ServingMetrics
from edge_agent.outbox import Outbox, OutboxLimits
from edge_agent.results import ResultWriter
from edge_agent.serving import EmbedRequest, ServingRuntime
from edge_agent.settings import EdgeSettings
from protocol.codec import RejectCounter
from protocol.inference import InferStatus, Tier
from protocol.mqtt import MqttClient, MqttSettings
from protocol.topics import Topics
from sim.broker import BrokerError, MosquittoBroker
from sim.impair import (
    BackendName,
    ImpairedLink,
    Impairment,
    ImpairmentError,
    ImpairmentSpecError,
    backend_named,
    open_link,
    parse_impairment,
)
from sim.profiles import UnknownProfile, profile_named
from sim.report import BenchReport, progress
from sim.servicetime import (
    CalibrationError,
    ServiceTimeModel,
    SimulatedModel,
    load_or_calibrate,
    measure_int8,
)
from sim.traces import Trace, burst_windows, bursts

logger = logging.getLogger(__name__)

GOODPUT_TARGET = 2.5
ROOT = "bench/overflow"


class OverflowBenchError(RuntimeError):
    """The benchmark cannot run; the message says why."""


@dataclass(frozen=True)
class OverflowOptions:
    model_dir: Path
    out: Path
    profile: str = "jetson-orin-nano"
    edge_speed: str = "auto"
    edge_share: float = 1 / 3
    """``auto``: the edge's batch-1 capacity as a share of the pool's measured capacity."""
    slo_ms: float = 1500.0
    burst_factor: float = 3.0
    base_factor: float = 0.5
    lead_s: float = 4.0
    burst_s: float = 20.0
    tail_s: float = 4.0
    max_batch_size: int = 8
    capacity_s: float = 5.0
    seed: int = 0
    impair: Impairment | None = None
    """Impairment of the overflow edge's link to the broker; None: a direct connection."""
    impair_backend: BackendName = "auto"


@dataclass
class Served:
    arrival_s: float
    latency_ms: float
    status: str
    tier: str


# -- the pool ------------------------------------------------------------------------------


@contextmanager
def _pool(broker: MosquittoBroker, state: Path) -> Iterator[PoolSupervisor]:
    settings = PoolSettings(
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        topic_root=ROOT,
        replicas=1,
        tp=1,
        state_dir=state / "pool",
        client_id_prefix="bench-overflow-pool",
    )
    supervisor = PoolSupervisor(settings, LocalProcessOrchestrator(settings))
    stop = threading.Event()
    supervisor.start()
    thread = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield supervisor
    finally:
        stop.set()
        thread.join(timeout=5)
        supervisor.shutdown()


def _pool_capacity(
    broker: MosquittoBroker, texts: list[str], *, seconds: float, concurrency: int = 16
) -> tuple[float, float]:
    """(texts/s, p50 ms) of the pool under a closed loop of single-text requests."""
    client_id = f"bench-overflow-probe-{uuid.uuid4().hex[:6]}"
    client = PoolClient(
        MqttClient(MqttSettings(host=broker.host, port=broker.port, client_id=client_id)),
        client_id=client_id,
        topics=Topics(ROOT),
        default_timeout_s=120,
    )
    client.start()
    try:
        deadline = time.monotonic() + 300
        while client.status is None or client.status.replicas < 1:
            if time.monotonic() > deadline:
                raise OverflowBenchError("the pool did not become ready in 300 s")
            time.sleep(0.2)

        async def loop(duration: float) -> list[float]:
            latencies: list[float] = []
            stop_at = time.perf_counter() + duration

            async def worker(k: int) -> None:
                i = k
                while time.perf_counter() < stop_at:
                    began = time.perf_counter()
                    await client.embed([texts[i % len(texts)]], timeout_s=120)
                    latencies.append((time.perf_counter() - began) * 1000.0)
                    i += concurrency

            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            return latencies

        asyncio.run(loop(1.5))  # warm-up: first batches allocate
        began = time.perf_counter()
        latencies = asyncio.run(loop(seconds))
        return len(latencies) / (time.perf_counter() - began), float(np.median(latencies))
    finally:
        client.stop()


# -- the edge ------------------------------------------------------------------------------


class _Edge:
    """One edge runtime (simulated model, real serving) on a shared loop."""

    def __init__(
        self,
        name: str,
        model: SimulatedModel,
        *,
        loop: LoopThread,
        work: Path,
        options: OverflowOptions,
        mqtt: tuple[str, int] | None,
    ) -> None:
        """``mqtt``: where the edge reaches the broker (directly or through an impaired
        link); None: no cloud (edge-only)."""
        self.name = name
        self.loop = loop
        device_id = f"bench-edge-{name}"
        settings = EdgeSettings(
            device_id=device_id,
            state_dir=work / name,
            max_batch_size=options.max_batch_size,
            slo_ms=options.slo_ms,
            offload_enabled=mqtt is not None,
            outbox_synchronous="normal",
        )
        self.outbox = Outbox(
            settings.state_dir / "outbox.sqlite",
            boot_epoch=1,
            limits=OutboxLimits(synchronous=settings.outbox_synchronous),
        )
        clock = SystemClock()
        self.client: MqttClient | None = None
        cloud: CloudClient = NoCloud()
        self.mqtt_cloud: MqttCloudClient | None = None
        if mqtt is not None:
            self.client = MqttClient(MqttSettings(host=mqtt[0], port=mqtt[1], client_id=device_id))
            client = self.client
            self.mqtt_cloud = MqttCloudClient(
                client,
                device_id=device_id,
                topics=Topics(ROOT),
                connected=lambda: client.is_connected,
                clock=clock,
                cooldown_s=settings.cloud_cooldown_s,
                cooldown_min_s=settings.cloud_cooldown_min_s,
                rejects=RejectCounter(),
            )
            self.mqtt_cloud.attach()
            cloud = self.mqtt_cloud
            self.client.start()
        self.runtime = ServingRuntime(
            model.serving_model(),
            settings=settings,
            writer=ResultWriter(self.outbox, clock=clock),
            cloud=cloud,
            metrics=ServingMetrics(),
            clock=clock,
        )
        loop.call(self.runtime.start())

    def wait_cloud(self, timeout_s: float) -> None:
        if self.mqtt_cloud is None:
            return
        cloud = self.mqtt_cloud
        deadline = time.monotonic() + timeout_s
        while not cloud.view(time.monotonic()).available:
            if time.monotonic() > deadline:
                raise OverflowBenchError("the edge never saw the pool accepting")
            time.sleep(0.1)

    def close(self) -> None:
        self.loop.call(self.runtime.stop())
        if self.client is not None:
            self.client.stop()
        self.outbox.close()


async def _edge_capacity(runtime: ServingRuntime, texts: list[str], seconds: float) -> float:
    """Texts/s of a closed loop of 64 single-text clients (no deadlines)."""
    done = [0]
    measuring = asyncio.Event()
    stop = asyncio.Event()

    async def client(k: int) -> None:
        i = k
        while not stop.is_set():
            outcome = await runtime.serve(
                EmbedRequest(request_id=uuid.uuid4().hex, texts=[texts[i % len(texts)]])
            )
            if measuring.is_set() and not stop.is_set() and outcome.status is InferStatus.OK:
                done[0] += 1
            i += 64

    tasks = [asyncio.create_task(client(k)) for k in range(64)]
    await asyncio.sleep(1.0)
    measuring.set()
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - began
    await asyncio.gather(*tasks)
    return done[0] / elapsed


async def _replay(runtime: ServingRuntime, trace: Trace, texts: list[str]) -> list[Served]:
    """Open loop: each request starts at its arrival time, with a deadline of the SLO."""
    served: list[Served] = []
    start = time.monotonic() + 0.2
    slo_s = trace.slo_ms / 1000.0

    async def one(k: int, at: float) -> None:
        arrival = start + at
        delay = arrival - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        outcome = await runtime.serve(
            EmbedRequest(
                request_id=uuid.uuid4().hex,
                texts=[texts[k % len(texts)]],
                deadline=arrival + slo_s,
            )
        )
        served.append(
            Served(
                arrival_s=at,
                latency_ms=(time.monotonic() - arrival) * 1000.0,
                status=outcome.status.value,
                tier=outcome.tier.value,
            )
        )

    await asyncio.gather(*(one(k, float(at)) for k, at in enumerate(trace.arrivals_s)))
    return served


# -- metrics -------------------------------------------------------------------------------


def summarize(
    served: list[Served], *, slo_ms: float, duration_s: float, window: tuple[float, float]
) -> dict[str, Any]:
    """The table's row for one mode (pure: unit-tested)."""
    ok = [s for s in served if s.status == InferStatus.OK.value]
    good = [s for s in ok if s.latency_ms <= slo_ms]
    lo, hi = window
    in_window = [s for s in served if lo <= s.arrival_s < hi]
    good_window = [
        s for s in in_window if s.status == InferStatus.OK.value and s.latency_ms <= slo_ms
    ]
    lat = np.asarray([s.latency_ms for s in ok]) if ok else np.asarray([np.nan])
    cloud = [s for s in ok if s.tier == Tier.CLOUD.value]
    return {
        "requests": len(served),
        "ok": len(ok),
        "within_slo": len(good),
        "rejected_or_late": len(served) - len(ok),
        "mean_ms": float(np.mean(lat)),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "throughput_per_s": len(ok) / duration_s,
        "goodput_per_s": len(good) / duration_s,
        "burst_goodput_per_s": len(good_window) / (hi - lo) if hi > lo else 0.0,
        "slo_attainment": len(good) / len(served) if served else 0.0,
        "offload_ratio": len(cloud) / len(ok) if ok else 0.0,
    }


def _per_second(
    served: list[Served], slo_ms: float, duration_s: float
) -> tuple[list[float], list[float]]:
    bins = np.arange(0, int(np.ceil(duration_s)) + 1)
    good = [s.arrival_s for s in served if s.status == "ok" and s.latency_ms <= slo_ms]
    counts, _ = np.histogram(good, bins=bins)
    return [float(b) for b in bins[:-1]], [float(c) for c in counts]


def run_overflow_bench(
    options: OverflowOptions, *, step: Callable[[str], None] | None = None
) -> BenchReport:
    notify = step or (lambda what: None)
    from models.corpus import stdlib_sentences

    try:
        profile = profile_named(options.profile)
    except UnknownProfile as exc:
        raise OverflowBenchError(str(exc)) from exc
    report = BenchReport("overflow", "Overflow: edge-only vs edge + cloud pool under a burst")
    notify("calibrating the INT8 service time (1 thread)")
    try:
        calibration, reused = load_or_calibrate(
            options.out / "calibration.json", lambda: measure_int8(options.model_dir, threads=1)
        )
    except CalibrationError as exc:
        raise OverflowBenchError(str(exc)) from exc
    texts = stdlib_sentences(evaluation=600).evaluation
    with (
        tempfile.TemporaryDirectory(prefix="spillway-bench-overflow-") as tmp,
        ExitStack() as stack,
    ):
        work = Path(tmp)
        broker = stack.enter_context(MosquittoBroker(work / "broker"))
        notify("starting the pool (model load)")
        stack.enter_context(_pool(broker, work))
        pool_capacity, pool_p50 = _pool_capacity(broker, texts, seconds=options.capacity_s)
        notify(f"pool: {pool_capacity:.1f} texts/s")
        unscaled = ServiceTimeModel.for_profile(calibration, profile)
        if options.edge_speed == "auto":
            scale = options.edge_share * pool_capacity / unscaled.capacity_per_s(1)
        else:
            try:
                scale = float(options.edge_speed)
            except ValueError as exc:
                raise OverflowBenchError(
                    f"--edge-speed must be 'auto' or a number, got {options.edge_speed!r}"
                ) from exc
            if not scale > 0:
                raise OverflowBenchError(f"--edge-speed must be > 0, got {scale}")
        service = ServiceTimeModel.for_profile(calibration, profile, scale=scale)
        loop = LoopThread("bench-overflow")
        loop.start()
        stack.callback(loop.stop)
        edge_only = _Edge(
            "edge-only",
            SimulatedModel(service, label=profile.hardware_class),
            loop=loop,
            work=work,
            options=options,
            mqtt=None,
        )
        stack.callback(edge_only.close)
        link: ImpairedLink | None = None
        if options.impair is not None:
            link = stack.enter_context(
                open_link(
                    options.impair,
                    upstream=(broker.host, broker.port),
                    backend=options.impair_backend,
                    seed=options.seed,
                    schedule_on_start=False,
                )
            )
        overflow = _Edge(
            "overflow",
            SimulatedModel(service, label=profile.hardware_class),
            loop=loop,
            work=work,
            options=options,
            mqtt=link.endpoint if link is not None else (broker.host, broker.port),
        )
        stack.callback(overflow.close)
        overflow.wait_cloud(60)
        edge_capacity = loop.call(_edge_capacity(edge_only.runtime, texts, options.capacity_s))
        notify(f"edge: {edge_capacity:.1f} texts/s")
        if edge_capacity <= 0:
            raise OverflowBenchError("the edge served nothing while its capacity was measured")
        trace = bursts(
            base_rate_per_s=options.base_factor * edge_capacity,
            burst_rate_per_s=options.burst_factor * edge_capacity,
            burst_s=options.burst_s,
            period_s=options.burst_s + options.tail_s + options.lead_s,
            first_burst_s=options.lead_s,
            duration_s=options.lead_s + options.burst_s + options.tail_s,
            slo_ms=options.slo_ms,
            seed=options.seed,
        )
        (window,) = burst_windows(trace)
        results: dict[str, list[Served]] = {}
        for edge in (edge_only, overflow):
            if edge is overflow and link is not None:
                link.start_schedule()
            results[edge.name] = loop.call(_replay(edge.runtime, trace, texts))
            notify(f"{edge.name}: {len(results[edge.name])} requests replayed")
        decisions, offloads, kept, fell_back = overflow.runtime.offload.snapshot()
        impairment = link.describe() if link is not None else None
    rows: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, Any]] = {}
    for name, served in results.items():
        summary = summarize(served, slo_ms=trace.slo_ms, duration_s=trace.duration_s, window=window)
        summaries[name] = summary
        rows.append(
            {
                "mode": name,
                "edge": f"{profile.hardware_class} (simulated)",
                "cloud": "-"
                if name != "overflow"
                else "real pool" + (" (impaired link)" if impairment else ""),
                "requests": summary["requests"],
                "mean ms": summary["mean_ms"],
                "p50 ms": summary["p50_ms"],
                "p99 ms": summary["p99_ms"],
                "throughput /s": summary["throughput_per_s"],
                "goodput /s": summary["goodput_per_s"],
                "burst goodput /s": summary["burst_goodput_per_s"],
                "SLO attainment": summary["slo_attainment"],
                "offload ratio": summary["offload_ratio"],
            }
        )
        xs, ys = _per_second(served, trace.slo_ms, trace.duration_s)
        report.series(
            "goodput per second (by arrival)", name, xs, ys, xlabel="s", ylabel="/s", kind="step"
        )
        report.series(
            "latency by arrival time (ok answers)",
            name,
            [s.arrival_s for s in served if s.status == "ok"],
            [s.latency_ms for s in served if s.status == "ok"],
            xlabel="arrival s",
            ylabel="ms",
            kind="scatter",
        )
    t = np.arange(0, trace.duration_s, 0.1)
    report.series(
        "goodput per second (by arrival)",
        "offered",
        t.tolist(),
        trace.rate(t).tolist(),
        kind="line",
    )
    report.series(
        "latency by arrival time (ok answers)",
        f"SLO {trace.slo_ms:.0f} ms",
        [0, trace.duration_s],
        [trace.slo_ms, trace.slo_ms],
        kind="line",
    )
    columns = list(rows[0].keys())
    report.table(
        f"Burst of {options.burst_factor:g}x edge capacity for {options.burst_s:g} s "
        f"(SLO {options.slo_ms:g} ms, {len(trace)} requests per mode"
        + (f"; overflow link impaired: {impairment['impairment']['spec']}" if impairment else "")
        + ")",
        columns,
        rows,
    )
    ratio = summaries["overflow"]["burst_goodput_per_s"] / max(
        summaries["edge-only"]["burst_goodput_per_s"], 1e-9
    )
    report.ratio("burst goodput, overflow / edge-only", ratio, target=GOODPUT_TARGET)
    report.ratio(
        "burst goodput with overflow / edge capacity (strict: the best edge-only could do)",
        summaries["overflow"]["burst_goodput_per_s"] / edge_capacity,
        target=GOODPUT_TARGET,
    )
    report.ratio(
        "whole-trace goodput, overflow / edge-only",
        summaries["overflow"]["goodput_per_s"] / max(summaries["edge-only"]["goodput_per_s"], 1e-9),
    )
    report.ratio(
        "p99 ms with overflow",
        summaries["overflow"]["p99_ms"],
        target=options.slo_ms,
        higher_is_better=False,
    )
    report.table(
        "Capacities measured in this run",
        ["what", "texts/s", "note"],
        [
            {
                "what": "cloud pool (real, 1 replica TP=1 FP32 torch)",
                "texts/s": pool_capacity,
                "note": f"closed loop, 16 single-text requests in flight, p50 {pool_p50:.0f} ms",
            },
            {
                "what": f"edge {profile.hardware_class} (simulated, x{scale:.3f})",
                "texts/s": edge_capacity,
                "note": "closed loop, 64 clients, offload off",
            },
            {
                "what": f"edge {profile.hardware_class}, profile speed (b{options.max_batch_size})",
                "texts/s": unscaled.capacity_per_s(options.max_batch_size),
                "note": f"relative speed {profile.relative_speed:.2f} x calibration core",
            },
        ],
    )
    report.note(
        "Edge rows are **simulated**: the agent's serving runtime is real, the model is the "
        f"service-time model (INT8 ONNX Runtime measured here on 1 thread: "
        f"{', '.join(f'b{b} {ms:.1f} ms' for b, ms in sorted(calibration.batch_ms.items()))}"
        f"{' (cached calibration)' if reused else ''}), divided by the profile's speed "
        f"({profile.relative_speed:.2f}; {profile.speed_source}) x {scale:.3f}."
    )
    if options.edge_speed == "auto":
        report.note(
            f"Edge speed scaled x{scale:.3f} so its batch-1 capacity is "
            f"{options.edge_share:.2f} of the pool's measured capacity: the pool on this host is "
            "CPU cores, not GPUs; at the profile's own speed one edge outruns the whole pool."
        )
    report.note(
        "Cloud rows are real: the pool's torch workers on this host's CPUs, over a real "
        "mosquitto; latency is from each request's scheduled arrival, every request carries "
        "a deadline of the SLO; an edge-only request that cannot meet it is dropped "
        "(deadline exceeded), not served late."
    )
    if impairment is not None:
        report.note(impairment_note(impairment))
    report.data.update(
        {
            "impairment": impairment,
            "options": {k: str(v) for k, v in options.__dict__.items()},
            "calibration": calibration.to_json(),
            "edge_scale": scale,
            "pool_capacity_per_s": pool_capacity,
            "edge_capacity_per_s": edge_capacity,
            "trace": {"name": trace.name, "params": trace.params, "requests": len(trace)},
            "summaries": summaries,
            "offload": {
                "decisions": decisions,
                "offloads": offloads,
                "kept_local": kept,
                "fell_back": fell_back,
            },
        }
    )
    return report


def impairment_note(described: dict[str, Any]) -> str:
    """The report's line on the impaired link (pure: ``ImpairedLink.describe()`` in)."""
    stats = described["stats"]
    return (
        f"Network impairment on the overflow edge's MQTT link to the broker (the pool's link "
        f"is not impaired): {described['impairment']['spec']}; backend **{described['backend']}**"
        f" ({described['reason']}). Partitions count from the start of the overflow replay. "
        f"Link counters: {stats['connections']} connections, {stats['bytes_up']} B up, "
        f"{stats['bytes_down']} B down, {stats['cuts']} cuts, {stats['partitioned_s']:.1f} s "
        f"partitioned, {stats['retransmits_modelled']} modelled retransmissions."
    )


def bench_overflow(
    out: Path = typer.Option(Path("var/bench"), "--out", help="Where the reports go."),
    model_dir: Path = typer.Option(
        Path("var/models"), "--model-dir", help="Directory `spillway models build` wrote."
    ),
    profile: str = typer.Option("jetson-orin-nano", "--profile", help="Simulated edge profile."),
    edge_speed: str = typer.Option(
        "auto", "--edge-speed", help="'auto' (scale to --edge-share of the pool) or a factor."
    ),
    edge_share: float = typer.Option(1 / 3, "--edge-share", min=0.01, max=10.0),
    slo_ms: float = typer.Option(1500.0, "--slo-ms", min=1.0, help="Every request's SLO."),
    burst_factor: float = typer.Option(3.0, "--burst-factor", min=0.1),
    burst_s: float = typer.Option(20.0, "--burst-s", min=1.0),
    seed: int = typer.Option(0, "--seed"),
    impair: str | None = typer.Option(
        None,
        "--impair",
        help="Impair the overflow edge's link to the broker, e.g. "
        "'delay=50ms,jitter=10ms,loss=1%,rate=2mbit,partition=5s@10s' (partitions count "
        "from the start of the overflow replay).",
    ),
    impair_backend: str = typer.Option(
        "auto",
        "--impair-backend",
        help="auto (netns + tc netem as root when the kernel has netem, else the userspace "
        "proxy), proxy or netns.",
    ),
) -> None:
    """Edge-only vs edge + cloud overflow under a burst of N x edge capacity, side by side."""
    logging.getLogger("edge_agent").setLevel(logging.ERROR)
    try:
        impairment = parse_impairment(impair) if impair is not None else None
        backend = backend_named(impair_backend)
    except ImpairmentSpecError as exc:
        typer.echo(f"spillway bench overflow: --impair: {exc}", err=True)
        raise typer.Exit(2) from exc
    options = OverflowOptions(
        model_dir=model_dir,
        out=out,
        profile=profile,
        edge_speed=edge_speed,
        edge_share=edge_share,
        slo_ms=slo_ms,
        burst_factor=burst_factor,
        burst_s=burst_s,
        seed=seed,
        impair=impairment,
        impair_backend=backend,
    )
    try:
        with progress(6, "bench overflow") as step:
            report = run_overflow_bench(options, step=step)
    except (OverflowBenchError, BrokerError, ImpairmentError) as exc:
        typer.echo(f"spillway bench overflow: {exc}", err=True)
        raise typer.Exit(1) from exc
    paths = report.write(out)
    typer.echo(report.markdown())
    typer.echo(f"reports     {paths['json']} {paths['md']} {paths['png']}")
