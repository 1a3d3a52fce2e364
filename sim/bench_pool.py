"""``spillway bench pool``: the overflow pool side by side, TP=1 vs TP=2 and 1 vs 2 replicas.

One broker, three pools started at once on separate topic roots (so none steals another's
requests), each measured in interleaved rounds so a noisy machine hurts all of them alike.
Each round is a closed loop: ``--concurrency`` clients each send a request of
``--texts-per-request`` held-out stdlib sentences through ``PoolClient`` (the gateway's path,
MQTT v5 request/response) and send the next when the answer arrives. Every pool uses all the
host's cores (threads per rank = CPUs / ranks). Ratios are against 1 replica x TP=1.

On a CUDA host it also times one full-model forward in FP32, FP16 and BF16; without one the
report says so.

``run_pool_bench`` measures and returns the raw result (what ``--json`` writes);
``pool_report`` turns it into the shared ``BenchReport`` (pure: unit-tested).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
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
from models.corpus import stdlib_sentences
from protocol.mqtt import MqttClient, MqttSettings
from protocol.topics import Topics
from sim.broker import BrokerError, MosquittoBroker
from sim.report import BenchReport, progress


class PoolBenchError(RuntimeError):
    """The pools never came up; the message says why."""


@dataclass(frozen=True)
class PoolBenchOptions:
    rounds: int = 3
    seconds: float = 4.0
    """Seconds of closed-loop load per pool per round."""
    concurrency: int = 8
    per_request: int = 4
    """Texts in each request."""
    ready_timeout_s: float = 300.0


@dataclass(frozen=True)
class PoolConfig:
    name: str
    replicas: int
    tp: int


CONFIGS = (
    PoolConfig("1 replica, TP=1", replicas=1, tp=1),
    PoolConfig("1 replica, TP=2", replicas=1, tp=2),
    PoolConfig("2 replicas, TP=1", replicas=2, tp=1),
)


@contextmanager
def _pool(broker: MosquittoBroker, config: PoolConfig, state: Path) -> Iterator[PoolClient]:
    root = f"bench/{config.replicas}x{config.tp}"
    settings = PoolSettings(
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        topic_root=root,
        replicas=config.replicas,
        tp=config.tp,
        state_dir=state / f"{config.replicas}x{config.tp}",
        client_id_prefix=f"bench-{config.replicas}x{config.tp}",
        max_queue_items=100_000,
        high_water_items=100_000,
    )
    supervisor = PoolSupervisor(settings, LocalProcessOrchestrator(settings))
    client_id = f"bench-client-{uuid.uuid4().hex[:6]}"
    client = PoolClient(
        MqttClient(MqttSettings(host=broker.host, port=broker.port, client_id=client_id)),
        client_id=client_id,
        topics=Topics(root),
        default_timeout_s=120,
    )
    stop = threading.Event()
    supervisor.start()
    thread = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
    thread.start()
    client.start()
    try:
        yield client
    finally:
        client.stop()
        stop.set()
        thread.join(timeout=5)
        supervisor.shutdown()


def _wait_ready(clients: list[PoolClient], replicas: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(
            c.status is not None and c.status.replicas >= n
            for c, n in zip(clients, replicas, strict=True)
        ):
            return
        time.sleep(0.2)
    raise PoolBenchError(f"pools did not become ready in {timeout_s:.0f} s")


async def _closed_loop(
    client: PoolClient, texts: list[str], *, concurrency: int, per_request: int, seconds: float
) -> list[float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    rng = np.random.default_rng(0)

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            start = int(rng.integers(0, len(texts) - per_request))
            began = time.perf_counter()
            await client.embed(texts[start : start + per_request], timeout_s=120)
            latencies.append((time.perf_counter() - began) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _cuda_precisions() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this host: FP32 vs FP16/BF16 not measured"}
    from cloud_controller.pool.tensor_parallel import TPContext, build_tp_encoder
    from models.tokenization import load_tokenizer

    texts = stdlib_sentences(evaluation=64).evaluation[:64]
    ids, mask = load_tokenizer().encode_batch(texts)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    reference = None
    for name in ("float32", "float16", "bfloat16"):
        model = build_tp_encoder(
            TPContext(0, 1), device=torch.device("cuda"), dtype=getattr(torch, name)
        )
        inputs = torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()
        with torch.inference_mode():
            for _ in range(3):
                model(*inputs)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(20):
                out = model(*inputs)
            torch.cuda.synchronize()
        ms = (time.perf_counter() - began) * 1000 / 20
        rows = out.float().cpu().numpy()
        reference = rows if reference is None else reference
        result[name] = {
            "batch64_ms": ms,
            "max_abs_diff_vs_fp32": float(np.abs(rows - reference).max()),
        }
    return result


def run_pool_bench(
    options: PoolBenchOptions, *, step: Callable[[str], None] = lambda what: None
) -> dict[str, Any]:
    """Start the pools, measure them in interleaved rounds; the JSON-ready result.

    ``step`` is called ``3 + rounds x len(CONFIGS)`` times: pools ready, warmed up, each
    pool's turn of each round, the CUDA precisions.
    """
    texts = stdlib_sentences(evaluation=600).evaluation
    samples: dict[str, list[float]] = {c.name: [] for c in CONFIGS}
    busy_s: dict[str, float] = {c.name: 0.0 for c in CONFIGS}
    per_round: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="spillway-bench-pool-") as tmp, ExitStack() as stack:
        broker = stack.enter_context(MosquittoBroker(Path(tmp) / "broker"))
        clients = [stack.enter_context(_pool(broker, c, Path(tmp))) for c in CONFIGS]
        _wait_ready(clients, [c.replicas for c in CONFIGS], timeout_s=options.ready_timeout_s)
        step("pools ready (model load per rank)")
        for client in clients:  # warm-up: first batches allocate
            asyncio.run(
                _closed_loop(
                    client, texts, concurrency=2, per_request=options.per_request, seconds=1
                )
            )
        step("warmed up")
        for r in range(options.rounds):
            this_round: dict[str, float] = {}
            for config, client in zip(CONFIGS, clients, strict=True):
                began = time.perf_counter()
                latencies = asyncio.run(
                    _closed_loop(
                        client,
                        texts,
                        concurrency=options.concurrency,
                        per_request=options.per_request,
                        seconds=options.seconds,
                    )
                )
                took = time.perf_counter() - began
                samples[config.name] += latencies
                busy_s[config.name] += took
                this_round[config.name] = len(latencies) * options.per_request / took
                step(f"round {r + 1}/{options.rounds}: {config.name}")
            per_round.append(this_round)
    results: list[dict[str, Any]] = []
    base_tput = None
    for config in CONFIGS:
        lat = np.asarray(samples[config.name])
        tput = len(lat) * options.per_request / busy_s[config.name]
        base_tput = base_tput or tput
        results.append(
            {
                "pool": config.name,
                "replicas": config.replicas,
                "tp": config.tp,
                "requests": len(lat),
                "texts_per_s": tput,
                "p50_ms": float(np.percentile(lat, 50)),
                "p95_ms": float(np.percentile(lat, 95)),
                "throughput_vs_baseline": tput / base_tput,
            }
        )
    cuda: dict[str, Any] = _cuda_precisions()
    step("CUDA precisions" if "skipped" not in cuda else "no CUDA")
    return {
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "load": {
            "rounds": options.rounds,
            "seconds_per_round": options.seconds,
            "concurrency": options.concurrency,
            "texts_per_request": options.per_request,
        },
        "pools": results,
        "cuda_precisions": cuda,
        "per_round_texts_per_s": per_round,
        "latencies_ms": samples,
    }


_BASELINE = CONFIGS[0].name


def pool_report(result: dict[str, Any]) -> BenchReport:
    """``run_pool_bench``'s result -> the shared report (pure: unit-tested)."""
    load, pools = result["load"], result["pools"]
    cpus = result["host"]["cpus"]
    report = BenchReport("pool", "Pool: TP=1 vs TP=2, 1 vs 2 replicas of the overflow pool")
    report.table(
        f"Overflow pool on {cpus} CPUs (interleaved, {load['rounds']} "
        f"round{'' if load['rounds'] == 1 else 's'} x "
        f"{load['seconds_per_round']} s, {load['concurrency']} requests in flight x "
        f"{load['texts_per_request']} texts)",
        ["pool", "replicas", "tp", "requests", "texts/s", "p50 ms", "p95 ms", "vs 1xTP1"],
        [
            {
                "pool": row["pool"],
                "replicas": row["replicas"],
                "tp": row["tp"],
                "requests": row["requests"],
                "texts/s": row["texts_per_s"],
                "p50 ms": row["p50_ms"],
                "p95 ms": row["p95_ms"],
                "vs 1xTP1": row["throughput_vs_baseline"],
            }
            for row in pools
        ],
        formats={"texts/s": "{:.1f}", "p50 ms": "{:.0f}", "p95 ms": "{:.0f}"},
    )
    per_round: list[dict[str, float]] = result.get("per_round_texts_per_s") or []
    names = [row["pool"] for row in pools]
    if per_round:
        report.table(
            "Texts/s per round",
            ["round", *names],
            [{"round": i, **r} for i, r in enumerate(per_round, start=1)],
        )
    by_name = {row["pool"]: row for row in pools}
    base = by_name.get(_BASELINE)
    for config in CONFIGS[1:]:
        row = by_name.get(config.name)
        if base is not None and row is not None:
            report.ratio(
                f"throughput {config.name} / {_BASELINE}",
                row["texts_per_s"] / base["texts_per_s"],
            )
    cuda: dict[str, Any] = result.get("cuda_precisions") or {}
    if "skipped" in cuda:
        report.note(f"CUDA precisions: {cuda['skipped']}.")
    elif "float32" in cuda:
        precisions = [p for p in ("float32", "float16", "bfloat16") if p in cuda]
        report.table(
            f"One full-model forward, batch 64, on {cuda.get('device')}",
            ["dtype", "ms", "speed vs float32", "max abs diff vs float32"],
            [
                {
                    "dtype": p,
                    "ms": cuda[p]["batch64_ms"],
                    "speed vs float32": cuda["float32"]["batch64_ms"] / cuda[p]["batch64_ms"],
                    "max abs diff vs float32": cuda[p]["max_abs_diff_vs_fp32"],
                }
                for p in precisions
            ],
            formats={"max abs diff vs float32": "{:.2e}"},
        )
        for p in precisions[1:]:
            report.ratio(
                f"forward speed {p} / float32 (CUDA, batch 64)",
                cuda["float32"]["batch64_ms"] / cuda[p]["batch64_ms"],
            )
    for name in names:
        rounds = [r[name] for r in per_round if name in r]
        if rounds:
            report.series(
                "texts/s per round",
                name,
                list(range(1, len(rounds) + 1)),
                rounds,
                xlabel="round",
                ylabel="texts/s",
            )
    latencies: dict[str, list[float]] = result.get("latencies_ms") or {}
    for name in names:
        report.distribution(
            "request latency distribution", name, latencies.get(name) or [], ylabel="ms"
        )
    report.note(
        "Closed loop through PoolClient (the gateway's MQTT v5 request/response path), one "
        "broker, the three pools on separate topic roots, measured in interleaved rounds; "
        f"every pool uses all {cpus} CPUs (threads per rank = CPUs / ranks)."
    )
    if cpus is not None and cpus <= 2:
        report.note(
            "On 2 CPUs TP=2 is not expected to be faster: both ranks share the same cores "
            "and pay an all-reduce per layer."
        )
    report.data.update(result)
    return report


def bench_pool(
    out: Path = typer.Option(Path("var/bench"), "--out", help="Where the reports go."),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the raw results here (the pre-report JSON)."
    ),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Interleaved rounds per pool."),
    seconds: float = typer.Option(4.0, "--seconds", min=0.5, help="Seconds per round."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Requests in flight."),
    per_request: int = typer.Option(4, "--texts-per-request", min=1, max=64),
) -> None:
    """TP=1 vs TP=2 and 1 vs 2 replicas of the overflow pool, on this machine."""
    options = PoolBenchOptions(
        rounds=rounds, seconds=seconds, concurrency=concurrency, per_request=per_request
    )
    try:
        with progress(3 + rounds * len(CONFIGS), "bench pool") as step:
            result = run_pool_bench(options, step=step)
    except (PoolBenchError, BrokerError) as exc:
        typer.echo(f"spillway bench pool: {exc}", err=True)
        raise typer.Exit(1) from exc
    report = pool_report(result)
    paths = report.write(out)
    typer.echo(report.markdown())
    typer.echo(f"reports     {paths['json']} {paths['md']} {paths['png']}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        typer.echo(f"json        {json_path}")
