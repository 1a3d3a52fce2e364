"""``spillway bench agent``: the edge runtime against a raw ONNX Runtime loop, in one run.

Everything is measured side by side in one process, on one loaded session (same variant,
same intra-op thread count), so the machine's noise hits both sides of each ratio alike:

* **saturation** - items/s of the better of two raw loops (tokenize + ``session.run``, at
  the agent's ``max_batch_size`` with the same length-grouped padding the agent uses, and
  at batch 1) vs the agent
  end to end (``ServingRuntime.serve``: routing, dynamic batching with length-grouped
  padding, the model on its worker thread, the durable outbox commit) under enough
  concurrent single-text clients to keep its queue full. Target: ratio >= 0.9.
* **batch-1 latency** - p50 of one text through a raw ``session.run`` (with tokenization)
  vs through the agent, interleaved sample by sample. Target: added p50 <= 1 ms. Shown for
  the default outbox (``synchronous=full``: an fsync per commit) and for ``normal``. The
  agent commits every answer's record before answering, so with ``full`` the added time
  includes one flush of the disk; a probe interleaved with the samples (a 4 KiB write +
  ``fdatasync`` in the outbox's directory, after the same idle gap) shows what that flush
  alone costs on this machine.
* **dynamic batching** - items/s at concurrency 16 of the agent with dynamic batching vs the
  same agent serving batch 1 (``max_batch_size=1``). Target: ratio >= 1.3.

Phases run in rounds, in a shuffled order each round; ratios are computed per round and the
median is reported. The agent is driven in-process (no HTTP, no broker): the benchmark is
about the runtime, not the loopback network.

``run_agent_bench`` measures and returns the raw result (what ``--json`` writes);
``agent_report`` turns it into the shared ``BenchReport`` (pure: unit-tested).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import typer

from edge_agent.clock import SystemClock
from edge_agent.cloud import NoCloud
from edge_agent.eventloop import LoopThread
from edge_agent.metrics import ServingMetrics
from edge_agent.outbox import Outbox, OutboxLimits
from edge_agent.probe import LoadSampler
from edge_agent.results import ResultWriter
from edge_agent.serving import EmbedRequest, ServingModel, ServingRuntime, serving_model
from edge_agent.settings import EdgeSettings
from sim.report import BenchReport
from sim.report import progress as progress_bar

logger = logging.getLogger(__name__)

SATURATION_TARGET = 0.9
ADDED_P50_TARGET_MS = 1.0
BATCHING_TARGET = 1.3
WARMUP_S = 0.5


class BenchError(RuntimeError):
    """The benchmark cannot run (no built variant, no key); the message says why."""


@dataclass(frozen=True)
class AgentBenchOptions:
    model_dir: Path
    variant: str = "int8-onnx"
    threads: int = 2
    """Intra-op threads of the one ONNX Runtime session both sides use."""
    rounds: int = 3
    phase_s: float = 4.0
    """Measured seconds of each throughput phase per round (after a short warm-up)."""
    concurrency: int = 16
    saturation_clients: int = 64
    latency_samples: int = 300
    """Batch-1 samples per side, spread over the rounds."""
    max_batch_size: int = 32
    seed: int = 0


def _load(options: AgentBenchOptions) -> tuple[Any, list[str]]:
    from models.corpus import stdlib_sentences
    from models.errors import ModelError
    from models.loader import load_model
    from models.signing import keyring, load_public_key

    variant_dir = options.model_dir / options.variant
    key_path = options.model_dir / "keys" / "signing.key.pub"
    if not (variant_dir / "manifest.json").is_file() or not key_path.is_file():
        raise BenchError(
            f"no built {options.variant} in {options.model_dir}; "
            f"run: spillway models build --out {options.model_dir}"
        )
    try:
        loaded = load_model(
            variant_dir,
            trusted_keys=keyring([load_public_key(key_path)]),
            intra_op_threads=options.threads,
        )
    except ModelError as exc:
        raise BenchError(f"{options.variant}: {exc}") from exc
    texts = stdlib_sentences(evaluation=1200).evaluation
    random.Random(options.seed).shuffle(texts)
    return loaded, texts


class _FsyncProbe:
    """What one flush of the outbox's disk costs: a 4 KiB write + ``fdatasync``, the least
    a durable commit does (SQLite's WAL commit writes a few pages, then the same sync)."""

    BLOCK = 4096
    SLOTS = 16

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._block = os.urandom(self.BLOCK)
        os.write(self._fd, b"\0" * self.BLOCK * self.SLOTS)  # overwrite in place, like WAL reuse
        os.fsync(self._fd)

    def flush(self, k: int) -> None:
        os.pwrite(self._fd, self._block, (k % self.SLOTS) * self.BLOCK)
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class _Runtimes:
    """The agent runtimes under test, on one serving loop, sharing one model."""

    def __init__(self, model: ServingModel, options: AgentBenchOptions, work: Path) -> None:
        self.probe = _FsyncProbe(work / "fsync-probe")
        self.loop = LoopThread("bench-serving")
        self.loop.start()
        self._outboxes: list[Outbox] = []
        sampler = LoadSampler()
        self.dynamic = self._make(model, options, work / "dynamic", sampler, batch=None)
        self.batch1 = self._make(model, options, work / "batch1", sampler, batch=1)
        self.normal = self._make(
            model, options, work / "normal", sampler, batch=None, synchronous="normal"
        )

    def _make(
        self,
        model: ServingModel,
        options: AgentBenchOptions,
        state_dir: Path,
        sampler: LoadSampler,
        *,
        batch: int | None,
        synchronous: Literal["full", "normal"] = "full",
    ) -> ServingRuntime:
        settings = EdgeSettings(
            device_id="bench",
            state_dir=state_dir,
            max_batch_size=batch or options.max_batch_size,
            max_queue_items=max(1024, options.saturation_clients * 4),
            outbox_synchronous=synchronous,
            offload_enabled=False,
        )
        outbox = Outbox(
            state_dir / "outbox.sqlite",
            boot_epoch=1,
            limits=OutboxLimits(synchronous=settings.outbox_synchronous),
        )
        self._outboxes.append(outbox)
        clock = SystemClock()
        runtime = ServingRuntime(
            model,
            settings=settings,
            writer=ResultWriter(outbox, clock=clock),
            cloud=NoCloud(),
            metrics=ServingMetrics(),
            clock=clock,
            host_load=sampler.load,
        )
        self.loop.call(runtime.start())
        return runtime

    def close(self) -> None:
        for runtime in (self.dynamic, self.batch1, self.normal):
            self.loop.call(runtime.stop())
        self.loop.stop()
        for outbox in self._outboxes:
            outbox.close()
        self.probe.close()


def _raw_saturation(
    embed: Callable[[list[str]], Any], texts: list[str], batch: int, duration_s: float
) -> float:
    i = done = 0
    end_warmup = time.perf_counter() + WARMUP_S
    while time.perf_counter() < end_warmup:
        embed(texts[i % len(texts) : i % len(texts) + batch])
        i += batch
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration_s:
        chunk = texts[i % len(texts) : i % len(texts) + batch]
        embed(chunk)
        i += batch
        done += len(chunk)
    return done / elapsed


async def _closed_loop(
    runtime: ServingRuntime, texts: list[str], clients: int, duration_s: float
) -> tuple[float, float]:
    """Single-text requests from ``clients`` concurrent callers; (items/s, mean batch items)."""
    counter = {"i": 0, "done": 0}
    measuring = asyncio.Event()
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            i = counter["i"] = counter["i"] + 1
            outcome = await runtime.serve(
                EmbedRequest(request_id=uuid.uuid4().hex, texts=[texts[i % len(texts)]])
            )
            if measuring.is_set() and not stop.is_set() and outcome.status.value == "ok":
                counter["done"] += 1

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(WARMUP_S)
    batches_before, items_before = _batch_count(runtime)
    measuring.set()
    start = time.perf_counter()
    await asyncio.sleep(duration_s)
    stop.set()
    elapsed = time.perf_counter() - start
    done = counter["done"]
    batches_after, items_after = _batch_count(runtime)
    await asyncio.gather(*tasks)
    batches = batches_after - batches_before
    mean_batch = (items_after - items_before) / batches if batches else 0.0
    return done / elapsed, mean_batch


def _batch_count(runtime: ServingRuntime) -> tuple[int, int]:
    """(batches, items) seen so far by the runtime's batch histogram."""
    hist = runtime.metrics.batch_items
    count = total = 0.0
    for metric in hist.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return int(count), int(total)


async def _latency_round(
    loaded: Any, runtimes: _Runtimes, texts: list[str], samples: int, offset: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"raw": [], "agent": [], "agent_normal": [], "fsync": []}

    def raw(text: str) -> None:
        loaded.embed_texts([text])

    async def through(runtime: ServingRuntime, text: str) -> None:
        await runtime.serve(EmbedRequest(request_id=uuid.uuid4().hex, texts=[text]))

    for k in range(samples):
        text = texts[(offset + k) % len(texts)]
        order = ["raw", "agent", "agent_normal", "fsync"]
        random.Random(offset + k).shuffle(order)
        for side in order:
            t0 = time.perf_counter()
            if side == "raw":
                raw(text)
            elif side == "fsync":
                runtimes.probe.flush(k)
            elif side == "agent":
                await through(runtimes.dynamic, text)
            else:
                await through(runtimes.normal, text)
            out[side].append((time.perf_counter() - t0) * 1000.0)
    return out


def run_agent_bench(
    options: AgentBenchOptions, *, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure everything; returns the JSON-ready report."""
    notify = progress or (lambda step: None)
    notify("loading model")
    loaded, texts = _load(options)
    model = serving_model(loaded)
    load_before = os.getloadavg()[0]
    rng = random.Random(options.seed)
    sat: dict[str, list[float]] = {"raw": [], "raw_b1": [], "agent": [], "ratio": []}
    dyn: dict[str, list[float]] = {"batch1": [], "dynamic": [], "ratio": [], "mean_batch": []}
    lat: dict[str, list[float]] = {"raw": [], "agent": [], "agent_normal": [], "fsync": []}
    per_round_samples = max(1, options.latency_samples // options.rounds)
    with tempfile.TemporaryDirectory(prefix="spillway-bench-agent-") as tmp:
        runtimes = _Runtimes(model, options, Path(tmp))
        try:
            for r in range(options.rounds):
                phases = ["raw_sat", "raw_b1", "agent_sat", "batch1", "dynamic", "latency"]
                rng.shuffle(phases)
                got: dict[str, float] = {}
                for phase in phases:
                    notify(f"round {r + 1}/{options.rounds}: {phase}")
                    if phase == "raw_sat":
                        # Same length-grouped padding as the agent (``model.embed``):
                        # tokenize + session.run, no scheduler, no outbox.
                        got[phase] = _raw_saturation(
                            model.embed, texts, options.max_batch_size, options.phase_s
                        )
                    elif phase == "raw_b1":
                        got[phase] = _raw_saturation(loaded.embed_texts, texts, 1, options.phase_s)
                    elif phase == "agent_sat":
                        got[phase], _ = runtimes.loop.call(
                            _closed_loop(
                                runtimes.dynamic,
                                texts,
                                options.saturation_clients,
                                options.phase_s,
                            )
                        )
                    elif phase == "batch1":
                        got[phase], _ = runtimes.loop.call(
                            _closed_loop(
                                runtimes.batch1, texts, options.concurrency, options.phase_s
                            )
                        )
                    elif phase == "dynamic":
                        got[phase], mean_batch = runtimes.loop.call(
                            _closed_loop(
                                runtimes.dynamic, texts, options.concurrency, options.phase_s
                            )
                        )
                        dyn["mean_batch"].append(mean_batch)
                    else:
                        samples = runtimes.loop.call(
                            _latency_round(
                                loaded, runtimes, texts, per_round_samples, r * per_round_samples
                            )
                        )
                        for side, values in samples.items():
                            lat[side].extend(values)
                sat["raw"].append(got["raw_sat"])
                sat["raw_b1"].append(got["raw_b1"])
                sat["agent"].append(got["agent_sat"])
                best_raw = max(got["raw_sat"], got["raw_b1"])
                sat["ratio"].append(got["agent_sat"] / best_raw)
                dyn["batch1"].append(got["batch1"])
                dyn["dynamic"].append(got["dynamic"])
                dyn["ratio"].append(got["dynamic"] / got["batch1"])
        finally:
            runtimes.close()
    median = statistics.median
    raw_p50, agent_p50 = median(lat["raw"]), median(lat["agent"])
    normal_p50 = median(lat["agent_normal"])
    return {
        "variant": options.variant,
        "device": loaded.device,
        "threads": options.threads,
        "cpu_count": os.cpu_count(),
        "rounds": options.rounds,
        "phase_s": options.phase_s,
        "load_avg_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "saturation": {
            "raw_batch": options.max_batch_size,
            "raw_items_per_s": median(sat["raw"]),
            "raw_batch1_items_per_s": median(sat["raw_b1"]),
            "agent_items_per_s": median(sat["agent"]),
            "agent_clients": options.saturation_clients,
            "ratio": median(sat["ratio"]),
            "ratios": sat["ratio"],
            "target": SATURATION_TARGET,
            "met": median(sat["ratio"]) >= SATURATION_TARGET,
        },
        "latency_batch1": {
            "samples": len(lat["raw"]),
            "raw_p50_ms": raw_p50,
            "agent_p50_ms": agent_p50,
            "added_p50_ms": agent_p50 - raw_p50,
            "agent_outbox_normal_p50_ms": normal_p50,
            "added_p50_ms_outbox_normal": normal_p50 - raw_p50,
            "fsync_probe_p50_ms": median(lat["fsync"]),
            "target_ms": ADDED_P50_TARGET_MS,
            "met": agent_p50 - raw_p50 <= ADDED_P50_TARGET_MS,
        },
        "dynamic_batching": {
            "concurrency": options.concurrency,
            "batch1_items_per_s": median(dyn["batch1"]),
            "dynamic_items_per_s": median(dyn["dynamic"]),
            "mean_batch_items": median(dyn["mean_batch"]),
            "ratio": median(dyn["ratio"]),
            "ratios": dyn["ratio"],
            "target": BATCHING_TARGET,
            "met": median(dyn["ratio"]) >= BATCHING_TARGET,
        },
        "latency_samples_ms": lat,
    }


_LATENCY_PATHS = (
    ("raw", "raw session.run (with tokenization)"),
    ("agent", "agent, outbox synchronous=full (default)"),
    ("agent_normal", "agent, outbox synchronous=normal"),
    ("fsync", "the disk's flush alone: 4 KiB write + fdatasync"),
)


def agent_report(result: dict[str, Any]) -> BenchReport:
    """``run_agent_bench``'s result -> the shared report (pure: unit-tested)."""
    s, lat, dyn = result["saturation"], result["latency_batch1"], result["dynamic_batching"]
    samples: dict[str, list[float]] = result.get("latency_samples_ms") or {}
    report = BenchReport("agent", "Agent: the edge runtime vs a raw ONNX Runtime loop")
    report.table(
        f"Throughput, items/s (median of {result['rounds']} rounds x {result['phase_s']} s; "
        f"{result['variant']} on {result['device']}, {result['threads']} intra-op threads)",
        ["phase", "items/s", "mean batch"],
        [
            {
                "phase": f"raw ORT loop, batch {s['raw_batch']} length-grouped like the agent",
                "items/s": s["raw_items_per_s"],
            },
            {"phase": "raw ORT loop, batch 1", "items/s": s["raw_batch1_items_per_s"]},
            {
                "phase": f"agent, {s['agent_clients']} concurrent single-text clients",
                "items/s": s["agent_items_per_s"],
            },
            {
                "phase": f"agent at concurrency {dyn['concurrency']}, batch-1 serving",
                "items/s": dyn["batch1_items_per_s"],
            },
            {
                "phase": f"agent at concurrency {dyn['concurrency']}, dynamic batching",
                "items/s": dyn["dynamic_items_per_s"],
                "mean batch": dyn["mean_batch_items"],
            },
        ],
        formats={"items/s": "{:.1f}", "mean batch": "{:.1f}"},
    )
    p50 = {
        "raw": lat["raw_p50_ms"],
        "agent": lat["agent_p50_ms"],
        "agent_normal": lat["agent_outbox_normal_p50_ms"],
        "fsync": lat["fsync_probe_p50_ms"],
    }
    added = {"agent": lat["added_p50_ms"], "agent_normal": lat["added_p50_ms_outbox_normal"]}
    report.table(
        f"Batch-1 latency, ms ({lat['samples']} samples per path, interleaved one at a time)",
        ["path", "p50 ms", "p95 ms", "added p50 ms"],
        [
            {
                "path": label,
                "p50 ms": p50[key],
                "p95 ms": (float(np.percentile(samples[key], 95)) if samples.get(key) else None),
                "added p50 ms": added.get(key),
            }
            for key, label in _LATENCY_PATHS
        ],
        formats={"p50 ms": "{:.2f}", "p95 ms": "{:.2f}", "added p50 ms": "{:+.2f}"},
    )
    rounds = range(1, len(s["ratios"]) + 1)
    report.table(
        "Per-round ratios (the medians below are over these)",
        ["round", "saturation", f"c{dyn['concurrency']} batching"],
        [
            {"round": r, "saturation": sat, f"c{dyn['concurrency']} batching": batching}
            for r, sat, batching in zip(rounds, s["ratios"], dyn["ratios"], strict=True)
        ],
    )
    report.ratio(
        f"saturation: agent ({s['agent_clients']} clients) / best raw ORT loop",
        s["ratio"],
        target=s["target"],
    )
    report.ratio(
        "batch-1 added p50 ms (outbox synchronous=full, the default)",
        lat["added_p50_ms"],
        target=lat["target_ms"],
        higher_is_better=False,
    )
    report.ratio(
        "batch-1 added p50 ms (outbox synchronous=normal; info)",
        lat["added_p50_ms_outbox_normal"],
        higher_is_better=False,
    )
    report.ratio(
        f"concurrency {dyn['concurrency']}: dynamic batching / batch-1 serving",
        dyn["ratio"],
        target=dyn["target"],
    )
    report.series(
        "per-round ratios", "saturation", list(rounds), s["ratios"], xlabel="round", ylabel="x"
    )
    report.series(
        "per-round ratios",
        f"c{dyn['concurrency']} batching",
        list(rounds),
        dyn["ratios"],
        xlabel="round",
        ylabel="x",
    )
    ends = [1, max(1, len(s["ratios"]))]
    for label, target in (("saturation", s["target"]), ("batching", dyn["target"])):
        report.series(
            "per-round ratios",
            f"{label} target {target}",
            ends,
            [target, target],
            xlabel="round",
            ylabel="x",
        )
    for key, label in _LATENCY_PATHS:
        report.distribution(
            "batch-1 latency distribution", label, samples.get(key) or [], ylabel="ms"
        )
    load = result["load_avg_1m"]
    report.note(
        f"{result['variant']} on {result['device']}, one ORT session shared by both sides "
        f"({result['threads']} intra-op threads), {result['cpu_count']} CPUs; load average "
        f"{load['before']:.2f} -> {load['after']:.2f} during the measurement."
    )
    report.note(
        "The agent is driven in-process through ServingRuntime.serve (routing, dynamic "
        "batching, the model thread, the durable outbox commit), not over HTTP or MQTT. "
        "Phases run in a shuffled order each round; ratios are per round, the median is "
        "reported."
    )
    report.note(
        "With synchronous=full every answer's outbox record is flushed to disk before the "
        "answer: the flush probe shows what that flush alone costs on this machine."
    )
    report.data.update(result)
    return report


def bench_agent(
    out: Path = typer.Option(Path("var/bench"), "--out", help="Where the reports go."),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the raw results here (the pre-report JSON)."
    ),
    model_dir: Path = typer.Option(
        Path("var/models"), "--model-dir", help="Directory `spillway models build` wrote."
    ),
    variant: str = typer.Option("int8-onnx", "--variant", help="Variant to serve."),
    threads: int = typer.Option(2, "--threads", min=1, help="Intra-op threads, both sides."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Measurement rounds."),
    phase_s: float = typer.Option(4.0, "--phase-s", min=0.1, help="Seconds per phase."),
    concurrency: int = typer.Option(16, "--concurrency", min=2, help="Dynamic-batching load."),
    latency_samples: int = typer.Option(300, "--latency-samples", min=3, help="Batch-1 samples."),
) -> None:
    """The edge agent's runtime against a raw ONNX Runtime loop, side by side, as ratios."""
    logging.getLogger("edge_agent").setLevel(logging.ERROR)
    options = AgentBenchOptions(
        model_dir=model_dir,
        variant=variant,
        threads=threads,
        rounds=rounds,
        phase_s=phase_s,
        concurrency=concurrency,
        latency_samples=latency_samples,
    )
    try:
        with progress_bar(1 + rounds * 6, "bench agent") as step:
            result = run_agent_bench(options, progress=step)
    except BenchError as exc:
        typer.echo(f"spillway bench agent: {exc}", err=True)
        raise typer.Exit(1) from exc
    report = agent_report(result)
    paths = report.write(out)
    typer.echo(report.markdown())
    typer.echo(f"reports     {paths['json']} {paths['md']} {paths['png']}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"json        {json_path}")
