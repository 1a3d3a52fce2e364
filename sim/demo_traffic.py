"""The demo's traffic: open-loop replay of a ``sim.traces`` trace against agents' HTTP ingress.

Each arrival of the trace becomes one ``POST /v1/embed`` to one agent (round robin over the
fleet), sent at its scheduled time however late earlier answers are (open loop: a burst
really piles up). What every answer said (tier ``edge``/``cloud``, variant, compute time)
and its latency from the scheduled arrival are recorded as ``Served``; ``summarize`` turns
a list of them into the numbers the demo's closing table shows. The texts are generated
from a seed, so a run's payloads are reproducible.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from sim.traces import Trace

TEXTS_PER_REQUEST = 8
"""Texts in one demo request: a little more work per request than one sentence, so a burst
overflows an edge at a request rate one Python load generator can offer on a small host."""

_GRACE_S = 2.0
"""How long past a request's deadline the replay still waits for its answer."""

_SUBJECTS = ("the gateway", "an edge device", "the cloud pool", "a forklift camera", "the broker")
_VERBS = ("reports", "offloads", "embeds", "batches", "forwards", "measures")
_OBJECTS = (
    "sensor readings from the loading dock",
    "a burst of customer questions about delivery times",
    "maintenance notes written by the night shift",
    "quality inspection remarks for the latest production run",
    "short messages that arrive faster than it can answer them",
)
_TAILS = ("before the deadline", "within its latency budget", "while the queue grows", "")


def request_texts(index: int, count: int = TEXTS_PER_REQUEST) -> list[str]:
    """The texts of request ``index``: seeded, so every run sends the same payloads."""
    rng = random.Random(index)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
        f"{rng.choice(_TAILS)}".strip()
        for _ in range(count)
    ]


@dataclass(frozen=True)
class Served:
    """One request of the replay, as the client saw it."""

    device_id: str
    at_s: float
    """Scheduled arrival, seconds from the start of the replay."""
    latency_ms: float
    """From the scheduled arrival to the answer (queueing in the client included)."""
    status: str
    """The ingress's ``status`` (``ok``, ``overloaded``...), ``http_error``, or
    ``client_timeout`` (no answer by the deadline plus a grace period)."""
    tier: str | None = None
    variant: str | None = None
    compute_ms: float | None = None


async def _send(
    client: httpx.AsyncClient,
    url: str,
    device_id: str,
    index: int,
    at_s: float,
    start: float,
    deadline_ms: int | None,
) -> Served:
    request: dict[str, Any] = {"texts": request_texts(index)}
    if deadline_ms is not None:
        request["deadline_ms"] = deadline_ms
    try:
        response = await client.post(f"{url}/v1/embed", json=request)
        body: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError):
        return Served(device_id, at_s, (time.monotonic() - start - at_s) * 1000, "http_error")
    return Served(
        device_id,
        at_s,
        (time.monotonic() - start - at_s) * 1000,
        str(body.get("status", "http_error")),
        body.get("tier"),
        body.get("variant"),
        body.get("compute_ms"),
    )


async def _bounded(
    send: Coroutine[Any, Any, Served], *, device_id: str, at_s: float, give_up_s: float
) -> Served:
    """``send``, or ``client_timeout`` once ``give_up_s`` passed: past its deadline an answer
    is worthless, and a replay must end soon after its trace does."""
    try:
        return await asyncio.wait_for(send, timeout=give_up_s)
    except TimeoutError:
        return Served(device_id, at_s, give_up_s * 1000, "client_timeout")


async def _replay(
    trace: Trace,
    targets: Sequence[tuple[str, str]],
    stop: threading.Event | None,
    timeout_s: float,
    first_index: int,
) -> list[Served]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    # Every request carries the trace's SLO as its deadline: past it the agent answers
    # ``deadline_exceeded`` at once instead of computing a useless answer, and the overflow
    # policy sends work that would miss it to the cloud.
    deadline_ms = int(trace.slo_ms)
    give_up_s = min(timeout_s, trace.slo_ms / 1000.0 + _GRACE_S)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.monotonic()
        tasks: list[asyncio.Task[Served]] = []
        for i, at_s in enumerate(trace.arrivals_s.tolist()):
            if stop is not None and stop.is_set():
                break
            delay = start + at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            device_id, url = targets[i % len(targets)]
            send = _send(client, url, device_id, first_index + i, at_s, start, deadline_ms)
            tasks.append(
                asyncio.create_task(
                    _bounded(send, device_id=device_id, at_s=at_s, give_up_s=give_up_s)
                )
            )
        return list(await asyncio.gather(*tasks))


async def _probe(targets: Sequence[tuple[str, str]], concurrency: int, seconds: float) -> float:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    answered = 0
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        start = time.monotonic()

        async def worker(w: int) -> None:
            nonlocal answered
            device_id, url = targets[w % len(targets)]
            index = 1_000_000 + w * 100_000
            while time.monotonic() - start < seconds:
                served = await _send(client, url, device_id, index, 0.0, start, None)
                index += 1
                if served.status == "ok" and served.tier == "edge":
                    answered += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency * len(targets))))
        took = time.monotonic() - start
    return answered / took if took > 0 else 0.0


def edge_capacity(
    targets: Sequence[tuple[str, str]], *, concurrency: int = 4, seconds: float = 2.0
) -> float:
    """Requests/s the edge answers itself, end to end through this client and the agents'
    HTTP ingress: ``concurrency`` closed-loop clients per agent for ``seconds`` (no
    deadline, so nothing is dropped). What the fleet serves on this host, not what one
    model run suggests: the agents share the host's cores with the client, the broker,
    the controller and the pool."""
    if not targets:
        raise ValueError("no targets to measure")
    return asyncio.run(_probe(targets, concurrency, seconds))


async def _probe_pool(url: str, token: str, concurrency: int, seconds: float) -> float:
    answered = 0
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=30.0, headers=headers) as client:
        start = time.monotonic()

        async def worker(w: int) -> None:
            nonlocal answered
            index = 2_000_000 + w * 100_000
            while time.monotonic() - start < seconds:
                try:
                    response = await client.post(
                        "/api/v1/embed", json={"texts": request_texts(index)}
                    )
                except httpx.HTTPError:
                    continue
                index += 1
                if response.status_code == 200:
                    answered += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        took = time.monotonic() - start
    return answered / took if took > 0 else 0.0


def pool_capacity(url: str, token: str, *, concurrency: int = 4, seconds: float = 2.0) -> float:
    """Requests/s (of ``TEXTS_PER_REQUEST`` texts) the cloud pool answers through the
    controller's ``POST /api/v1/embed``: ``concurrency`` closed-loop clients for
    ``seconds``, while the edge is idle."""
    return asyncio.run(_probe_pool(url, token, concurrency, seconds))


def replay(
    trace: Trace,
    targets: Sequence[tuple[str, str]],
    *,
    stop: threading.Event | None = None,
    timeout_s: float = 30.0,
    first_index: int = 0,
) -> list[Served]:
    """Send every arrival of ``trace`` to ``targets`` (``(device_id, base_url)``, round robin)
    at its time; returns once every request is answered (or ``stop`` is set)."""
    if not targets:
        raise ValueError("no targets to send traffic to")
    return asyncio.run(_replay(trace, targets, stop, timeout_s, first_index))


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summarize(served: Sequence[Served], *, window_s: float) -> dict[str, Any]:
    """Requests, answers by tier, latency percentiles (ok answers), throughput and the share
    of answers that came from the cloud pool."""
    ok = [s for s in served if s.status == "ok"]
    cloud = sum(1 for s in ok if s.tier == "cloud")
    latencies = [s.latency_ms for s in ok]
    return {
        "requests": len(served),
        "ok": len(ok),
        "edge": len(ok) - cloud,
        "cloud": cloud,
        "failed": len(served) - len(ok),
        "failed_by_status": dict(Counter(s.status for s in served if s.status != "ok")),
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "throughput_rps": round(len(ok) / window_s, 2) if window_s > 0 else 0.0,
        "offload_ratio": round(cloud / len(ok), 3) if ok else 0.0,
        "variants": sorted({s.variant for s in ok if s.tier == "edge" and s.variant}),
    }


def within(served: Sequence[Served], start_s: float, end_s: float) -> list[Served]:
    """The requests scheduled in [start_s, end_s)."""
    return [s for s in served if start_s <= s.at_s < end_s]
