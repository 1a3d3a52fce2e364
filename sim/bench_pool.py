"""``spillway bench pool``: the overflow pool side by side, TP=1 vs TP=2 and 1 vs 2 replicas.

One broker, three pools started at once on separate topic roots (so none steals another's
requests), each measured in interleaved rounds so a noisy machine hurts all of them alike.
Each round is a closed loop: ``--concurrency`` clients each send a request of
``--texts-per-request`` held-out stdlib sentences through ``PoolClient`` (the gateway's path,
MQTT v5 request/response) and send the next when the answer arrives. Every pool uses all the
host's cores (threads per rank = CPUs / ranks). Ratios are against 1 replica x TP=1.

On a CUDA host it also times one full-model forward in FP32, FP16 and BF16; without one the
report says so.
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cloud_controller.pool import LocalProcessOrchestrator, PoolClient, PoolSettings, PoolSupervisor
from models.corpus import stdlib_sentences
from protocol.mqtt import MqttClient, MqttSettings
from protocol.topics import Topics
from sim.broker import MosquittoBroker


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
    raise RuntimeError("pools did not become ready in time")


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


def bench_pool(
    json_path: Path | None = typer.Option(None, "--json", help="Write the results here."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Interleaved rounds per pool."),
    seconds: float = typer.Option(4.0, "--seconds", min=0.5, help="Seconds per round."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Requests in flight."),
    per_request: int = typer.Option(4, "--texts-per-request", min=1, max=64),
) -> None:
    """TP=1 vs TP=2 and 1 vs 2 replicas of the overflow pool, on this machine."""
    console = Console()
    texts = stdlib_sentences(evaluation=600).evaluation
    samples: dict[str, list[float]] = {c.name: [] for c in CONFIGS}
    busy_s: dict[str, float] = {c.name: 0.0 for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="spillway-bench-pool-") as tmp, ExitStack() as stack:
        broker = stack.enter_context(MosquittoBroker(Path(tmp) / "broker"))
        clients = [stack.enter_context(_pool(broker, c, Path(tmp))) for c in CONFIGS]
        console.print("starting pools (model load per rank)...")
        _wait_ready(clients, [c.replicas for c in CONFIGS], timeout_s=300)
        for client in clients:  # warm-up: first batches allocate
            asyncio.run(
                _closed_loop(client, texts, concurrency=2, per_request=per_request, seconds=1)
            )
        with Progress(console=console) as progress:
            task = progress.add_task("measuring", total=rounds * len(CONFIGS))
            for _ in range(rounds):
                for config, client in zip(CONFIGS, clients, strict=True):
                    began = time.perf_counter()
                    samples[config.name] += asyncio.run(
                        _closed_loop(
                            client,
                            texts,
                            concurrency=concurrency,
                            per_request=per_request,
                            seconds=seconds,
                        )
                    )
                    busy_s[config.name] += time.perf_counter() - began
                    progress.advance(task)
    results: list[dict[str, Any]] = []
    base_tput = None
    for config in CONFIGS:
        lat = np.asarray(samples[config.name])
        tput = len(lat) * per_request / busy_s[config.name]
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
    report = {
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "load": {
            "rounds": rounds,
            "seconds_per_round": seconds,
            "concurrency": concurrency,
            "texts_per_request": per_request,
        },
        "pools": results,
        "cuda_precisions": cuda,
    }
    table = Table(title=f"Overflow pool on {os.cpu_count()} CPUs (interleaved, {rounds} rounds)")
    for column in ("pool", "texts/s", "p50 ms", "p95 ms", "throughput vs 1xTP1"):
        table.add_column(column)
    for row in results:
        table.add_row(
            row["pool"],
            f"{row['texts_per_s']:.1f}",
            f"{row['p50_ms']:.0f}",
            f"{row['p95_ms']:.0f}",
            f"{row['throughput_vs_baseline']:.2f}x",
        )
    console.print(table)
    console.print(_markdown(results))
    console.print(f"CUDA precisions: {cuda.get('skipped') or json.dumps(cuda)}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"report      {json_path}")


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| pool | texts/s | p50 ms | p95 ms | throughput vs 1 replica TP=1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['pool']} | {row['texts_per_s']:.1f} | {row['p50_ms']:.0f} | "
            f"{row['p95_ms']:.0f} | {row['throughput_vs_baseline']:.2f}x |"
        )
    return "\n".join(lines)
