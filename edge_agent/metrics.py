"""What the serving path measures, for ``/metrics`` and for the controller's telemetry.

One ``ServingMetrics`` per agent holds its own prometheus ``CollectorRegistry`` (two agents
in one test process never share counters): request latency histogram by tier, requests by
status and tier, batch sizes, queue depth, offloads by reason (and why wanted offloads
stayed local), the active variant as an info metric, and host CPU/memory gauges.

Prometheus histograms cannot give exact quantiles, so a window of the latest latencies
also yields p50/p95/p99 for ``Telemetry.metrics`` (``telemetry()``). This module knows no
MQTT and no HTTP framework.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WINDOW = 2048
"""Latest latencies kept for the quantiles sent in telemetry."""


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class ServingMetrics:
    """Counters and gauges of one agent's serving path; safe from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "spillway_agent_request_latency_seconds",
            "End-to-end latency of served requests (ingress to answer).",
            ["tier"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "spillway_agent_requests",
            "Requests answered, by status and tier.",
            ["status", "tier"],
            registry=r,
        )
        self.batch_items = Histogram(
            "spillway_agent_batch_items",
            "Texts per model call.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.offloads = Counter(
            "spillway_agent_offloads",
            "Requests sent to the cloud pool, by reason.",
            ["reason"],
            registry=r,
        )
        self.kept_local = Counter(
            "spillway_agent_offload_skipped",
            "Offloads wanted but served locally, by why (cloud_unknown, rate_capped, ...).",
            ["why"],
            registry=r,
        )
        self.queue_items = Gauge(
            "spillway_agent_queue_items", "Texts waiting for the model.", registry=r
        )
        self.batch_limit = Gauge(
            "spillway_agent_batch_limit", "Current adaptive batch-size limit.", registry=r
        )
        self.offload_ratio = Gauge(
            "spillway_agent_offload_ratio", "Offloaded / routed requests since start.", registry=r
        )
        self.outbox_records = Gauge(
            "spillway_agent_outbox_records",
            "Results waiting for the controller's ack.",
            registry=r,
        )
        self.outbox_bytes = Gauge(
            "spillway_agent_outbox_bytes",
            "Bytes of results waiting for the controller's ack (the outbox's size).",
            registry=r,
        )
        self.mqtt_reconnects = Counter(
            "spillway_agent_mqtt_reconnects",
            "Connections to the broker after the first one.",
            registry=r,
        )
        self.outbox_dropped = Gauge(
            "spillway_agent_outbox_dropped", "Results the outbox dropped (bounds).", registry=r
        )
        self.cpu_percent = Gauge("spillway_agent_cpu_percent", "Host CPU use.", registry=r)
        self.memory_used_mb = Gauge(
            "spillway_agent_memory_used_mb", "Host memory in use, MiB.", registry=r
        )
        self.variant = Info("spillway_agent_model", "The model variant being served.", registry=r)
        self._lock = threading.Lock()
        self._window: deque[float] = deque(maxlen=WINDOW)
        self._batches: deque[int] = deque(maxlen=256)
        self._extra: list[Callable[[], dict[str, float]]] = []
        self._refreshers: list[Callable[[], None]] = []
        self._counts: dict[tuple[str, str], Counter] = {}
        self._latencies: dict[str, Histogram] = {}

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """``refresh()`` sets gauges right before every ``scrape()``."""
        self._refreshers.append(refresh)

    def scrape(self) -> bytes:
        """The registry in Prometheus text format, gauges refreshed first."""
        for refresh in self._refreshers:
            refresh()
        return generate_latest(self.registry)

    def observe_request(self, *, status: str, tier: str, latency_s: float) -> None:
        # ``labels()`` checks and hashes its arguments under a lock on every call: the
        # children are looked up once per label set (a racing duplicate is the same child).
        count = self._counts.get((status, tier))
        if count is None:
            count = self._counts[status, tier] = self.requests.labels(status=status, tier=tier)
        count.inc()
        if status == "ok":
            latency = self._latencies.get(tier)
            if latency is None:
                latency = self._latencies[tier] = self.latency.labels(tier=tier)
            latency.observe(latency_s)
            with self._lock:
                self._window.append(latency_s * 1000.0)

    def on_connect(self, connects: int) -> None:
        """Called after every CONNACK with the client's connect count."""
        if connects > 1:
            self.mqtt_reconnects.inc()

    def observe_batch(self, items: int) -> None:
        self.batch_items.observe(items)
        with self._lock:
            self._batches.append(items)

    def observe_host(self, sample: dict[str, float]) -> None:
        if "cpu_percent" in sample:
            self.cpu_percent.set(sample["cpu_percent"])
        if "memory_used_mb" in sample:
            self.memory_used_mb.set(sample["memory_used_mb"])

    def add_source(self, source: Callable[[], dict[str, float]]) -> None:
        """More numbers for ``telemetry()`` (queue depth, outbox size, ...)."""
        self._extra.append(source)

    def latency_quantiles_ms(self) -> dict[str, float]:
        with self._lock:
            values = sorted(self._window)
        return {
            "latency_p50_ms": quantile(values, 0.50),
            "latency_p95_ms": quantile(values, 0.95),
            "latency_p99_ms": quantile(values, 0.99),
        }

    def telemetry(self) -> dict[str, float]:
        """Flat numbers for ``Telemetry.metrics`` (names carry units)."""
        out = self.latency_quantiles_ms()
        with self._lock:
            batches = list(self._batches)
        out["batch_items_mean"] = sum(batches) / len(batches) if batches else 0.0
        for source in self._extra:
            out.update(source())
        return out
