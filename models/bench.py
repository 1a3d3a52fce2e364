"""Side-by-side benchmark of every built variant, robust to a noisy, shared machine.

Each variant lives in its own spawned worker process, loaded through
:func:`models.loader.load_model` exactly as the agent would (so peak RSS is that variant's alone),
with the same intra-op thread count for every runtime. The parent then runs many short **rounds**
in round-robin: in each round, for each batch size, the variants take turns in a freshly shuffled
order, each running the *same* few batches of held-out stdlib sentences (real lengths, padded to the
longest in each batch). Only one worker computes at a time.

Contention from other processes changes slowly compared with one round, so it hits every variant of
a round alike: the speed ratio against the FP32 ONNX baseline is computed **per round** and reported
as the median with its interquartile range, which a burst of load during one variant's turn cannot
skew. Absolute latencies (p50/p95 per batch size) are pooled over all rounds and remain at the mercy
of the machine; the load average before and after the run is recorded next to them.

The speed targets (:data:`SPEED_TARGETS`) and each variant's quality gate (from its manifest) are
in the result, so a report can set every measurement beside what it should reach.

This module must not know how variants are built; it reads published folders only.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from models.corpus import stdlib_sentences
from models.signing import keyring, load_public_key

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 8, 32)
#: Batches each variant runs per turn, per batch size (a turn is ~0.1-0.5 s for FP32 ONNX).
BATCHES_PER_TURN = {1: 8, 8: 2, 32: 1}
BASELINE = "fp32-onnx"
#: Pause between turns so the previous worker's spinning thread pool (ORT, OpenMP) goes idle.
SETTLE_S = 0.02
_EVAL_SENTENCES = 1200
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@dataclass(frozen=True)
class SpeedTarget:
    """Throughput a variant should reach against the baseline, at one batch size."""

    batch: int
    ratio: float
    #: Where the target is stated for: substrings of the loaded device (``CUDA`` matches
    #: ``CUDAExecutionProvider``); None: anywhere.
    devices: tuple[str, ...] | None = None
    why: str = ""


#: The issues' speed targets against FP32 ONNX (docs/models.md).
SPEED_TARGETS: dict[str, SpeedTarget] = {
    "int8-onnx": SpeedTarget(batch=8, ratio=2.0, why="issue 3: INT8 >= 2.0x fused FP32 at batch 8"),
    "fp16-onnx": SpeedTarget(
        batch=32,
        ratio=1.5,
        devices=("CUDA", "Tensorrt"),
        why="FP16 >= 1.5x FP32 at batch 32, on a GPU",
    ),
}


@dataclass(frozen=True)
class BenchOptions:
    """How long and how wide to measure."""

    #: Measured rounds (after one discarded warm-up round); each round gives one ratio per batch.
    rounds: int = 30
    #: Intra-op threads for every variant (ORT ``intra_op_num_threads``, ``torch.set_num_threads``).
    threads: int = 2
    #: Seed for the batch contents and the per-round turn order.
    seed: int = 0
    #: Variants to measure (None: every built one); the baseline is added when built.
    variants: tuple[str, ...] | None = None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_isa() -> list[str]:
    """The int8-relevant vector extensions this CPU reports (what ORT's kernels can use)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in _ISA_FLAGS if f in flags]


def _batches(tokenizer: Any, texts: list[str], seed: int) -> dict[int, list[tuple[Any, Any]]]:
    """Deterministic token batches per batch size (every worker builds the same ones)."""
    rng = np.random.default_rng(seed)
    out: dict[int, list[tuple[Any, Any]]] = {}
    for batch in BATCH_SIZES:
        order = rng.permutation(len(texts))
        out[batch] = [
            tokenizer.encode_batch([texts[i] for i in order[s : s + batch]])
            for s in range(0, len(texts) - batch + 1, batch)
        ]
    return out


def _worker(
    conn: Connection,
    variant_dir: str,
    public_key_path: str,
    texts: list[str],
    threads: int,
    seed: int,
) -> None:
    """Child-process body: load one variant, then serve ``("run", batch, indices)`` requests."""
    logging.basicConfig(level=logging.ERROR)
    try:
        from models.loader import load_model

        if not variant_dir.endswith("-onnx"):
            import torch

            torch.set_num_threads(threads)
        ring = keyring([load_public_key(Path(public_key_path))])
        model = load_model(Path(variant_dir), trusted_keys=ring, intra_op_threads=threads)
        batches = _batches(model.tokenizer, texts, seed)
    except Exception as exc:  # reported to the parent as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", model.device))
    while True:
        request = conn.recv()
        if request[0] == "run":
            _, batch, indices = request
            pool = batches[batch]
            latencies: list[float] = []
            for i in indices:
                ids, mask = pool[i % len(pool)]
                start = time.perf_counter()
                model.backend.embed(ids, mask)
                latencies.append(time.perf_counter() - start)
            conn.send(("ok", latencies))
        elif request[0] == "rss":
            conn.send(("ok", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        else:
            return


class _Worker:
    """Parent-side handle on one variant's worker process."""

    def __init__(
        self, variant_dir: Path, public_key_path: Path, texts: list[str], options: BenchOptions
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = variant_dir.name
        self.conn, child = ctx.Pipe()
        args = (child, str(variant_dir), str(public_key_path), texts, options.threads, options.seed)
        self.process = ctx.Process(target=_worker, args=args, daemon=True)
        self.process.start()
        child.close()
        self.device = ""

    def wait_ready(self) -> None:
        self.device = self._reply()

    def _reply(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"benchmark worker for {self.name} died") from None
        if status == "error":
            raise RuntimeError(f"benchmark of {self.name} failed: {value}")
        return value

    def run(self, batch: int, indices: list[int]) -> list[float]:
        self.conn.send(("run", batch, indices))
        latencies: list[float] = self._reply()
        return latencies

    def peak_rss_mib(self) -> float:
        self.conn.send(("rss",))
        rss: float = self._reply()
        return rss

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


def _quartiles(values: list[float]) -> dict[str, float]:
    q25, q50, q75 = np.percentile(np.asarray(values), [25, 50, 75])
    return {"median": float(q50), "p25": float(q25), "p75": float(q75)}


def _interleave(
    workers: dict[str, _Worker],
    options: BenchOptions,
    on_round: Callable[[str], None] = lambda what: None,
) -> dict[str, Any]:
    """Round-robin turns; returns per-variant latencies and per-round turn times."""
    rng = np.random.default_rng(options.seed)
    names = list(workers)
    latencies: dict[str, dict[int, list[float]]] = {n: {b: [] for b in BATCH_SIZES} for n in names}
    turn_s: dict[str, dict[int, list[float]]] = {n: {b: [] for b in BATCH_SIZES} for n in names}
    for round_index in range(options.rounds + 1):  # round 0 warms up and is discarded
        for batch in BATCH_SIZES:
            per_turn = BATCHES_PER_TURN[batch]
            indices = list(range(round_index * per_turn, (round_index + 1) * per_turn))
            for position in rng.permutation(len(names)):
                name = names[position]
                time.sleep(SETTLE_S)
                lat = workers[name].run(batch, indices)
                if round_index > 0:
                    latencies[name][batch].extend(lat)
                    turn_s[name][batch].append(sum(lat))
        on_round("warm-up round" if round_index == 0 else f"round {round_index}/{options.rounds}")
    return {"latencies": latencies, "turn_s": turn_s}


def bench_variants(
    out: Path,
    *,
    public_key_path: Path,
    options: BenchOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark every variant folder under ``out``; returns a JSON-ready report.

    ``progress`` is called once when every worker is loaded, then once per round (the
    warm-up round included): ``options.rounds + 2`` calls in all.
    """
    import json

    from models.build import VARIANTS
    from models.manifest import MANIFEST_FILE

    notify = progress or (lambda what: None)

    options = options or BenchOptions()
    manifests: dict[str, Any] = {}
    wanted = set(options.variants or VARIANTS) | {BASELINE}
    for variant in (v for v in VARIANTS if v in wanted):
        folder = out / variant
        if (folder / MANIFEST_FILE).is_file():
            manifests[variant] = json.loads((folder / MANIFEST_FILE).read_text())["manifest"]
        else:
            logger.warning("skipping %s: not built", variant)
    load_before = os.getloadavg()
    texts = stdlib_sentences(evaluation=_EVAL_SENTENCES).evaluation
    workers: dict[str, _Worker] = {}
    try:
        for variant in manifests:  # load in parallel; measure one at a time
            workers[variant] = _Worker(out / variant, public_key_path, texts, options)
        for worker in workers.values():
            worker.wait_ready()
        notify(f"{len(workers)} variants loaded")
        measured = _interleave(workers, options, notify)
        rss = {name: worker.peak_rss_mib() for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    load_after = os.getloadavg()

    rows: dict[str, Any] = {}
    for variant, manifest in manifests.items():
        row: dict[str, Any] = {"device": workers[variant].device}
        for batch in BATCH_SIZES:
            lat = np.asarray(measured["latencies"][variant][batch]) * 1000.0
            row[f"b{batch}"] = {
                "p50_ms": float(np.percentile(lat, 50)),
                "p95_ms": float(np.percentile(lat, 95)),
                "throughput_per_s": float(batch * len(lat) / (lat.sum() / 1000.0)),
            }
        row.update(peak_rss_mib=rss[variant], size_bytes=manifest["size_bytes"])
        row["quality"] = manifest["quality"]
        row["quality_gate"] = manifest.get("quality_gate")
        rows[variant] = row
    base = BASELINE if BASELINE in rows else None
    if base is not None:
        for variant, row in rows.items():
            speedup: dict[str, Any] = {}
            for batch in BATCH_SIZES:
                base_turns = np.asarray(measured["turn_s"][base][batch])
                turns = np.asarray(measured["turn_s"][variant][batch])
                ratios = list(base_turns / turns)  # same work per turn
                speedup[f"b{batch}"] = {**_quartiles(ratios), "rounds": [float(r) for r in ratios]}
            row["speedup"] = speedup
            row["speedup_b8"] = speedup["b8"]["median"]
            row["speedup_b32"] = speedup["b32"]["median"]
            row["size_ratio"] = row["size_bytes"] / rows[base]["size_bytes"]
    return {
        "machine": {
            "cpu": cpu_model(),
            "cores": multiprocessing.cpu_count(),
            "isa": cpu_isa(),
            "load_average_1m": {"before": load_before[0], "after": load_after[0]},
        },
        "method": {
            "rounds": options.rounds,
            "threads": options.threads,
            "batches_per_turn": {f"b{b}": k for b, k in BATCHES_PER_TURN.items()},
            "ratio": "per-round throughput ratio vs baseline; median and interquartile range",
        },
        "baseline": base,
        "speed_targets": {
            name: {"batch": t.batch, "ratio": t.ratio, "devices": t.devices, "why": t.why}
            for name, t in SPEED_TARGETS.items()
        },
        "variants": rows,
    }
