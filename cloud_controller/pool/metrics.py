"""A pool replica's Prometheus metrics and the small HTTP server that exposes them.

Each replica (rank 0) owns a ``PoolMetrics`` on a registry of its own: request latency from
delivery to answer, requests by status, texts queued or computing, batch sizes, MQTT
reconnects. ``serve_metrics`` exposes it on ``GET /metrics`` (prometheus_client's own
threaded server) when ``PoolSettings.metrics_port`` is set; Kubernetes scrapes each pod.
This module knows no MQTT and no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class PoolMetrics:
    """What one replica measures; safe from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "spillway_pool_request_latency_seconds",
            "Time from a request's delivery to its answer's PUBACK, by status.",
            ["status"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "spillway_pool_requests",
            "Requests answered, by status (ok, overloaded, deadline_exceeded, error, invalid).",
            ["status"],
            registry=r,
        )
        self.batch_items = Histogram(
            "spillway_pool_batch_items",
            "Texts per forward pass.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_items = Gauge(
            "spillway_pool_queue_items",
            "Texts waiting for or in a forward pass on this replica.",
            registry=r,
        )
        self.queue_requests = Gauge(
            "spillway_pool_queue_requests",
            "Requests this replica is computing or waiting to compute.",
            registry=r,
        )
        self.mqtt_reconnects = Counter(
            "spillway_pool_mqtt_reconnects",
            "Connections to the broker after the first one.",
            registry=r,
        )

    def on_connect(self, connects: int) -> None:
        if connects > 1:
            self.mqtt_reconnects.inc()

    def observe(self, *, status: str, latency_s: float) -> None:
        self.requests.labels(status=status).inc()
        self.latency.labels(status=status).observe(latency_s)

    def watch_queue(self, items: Callable[[], int], requests: Callable[[], int]) -> None:
        """Queue gauges read at scrape time."""
        self.queue_items.set_function(lambda: float(items()))
        self.queue_requests.set_function(lambda: float(requests()))


def serve_metrics(metrics: PoolMetrics, *, host: str, port: int) -> bool:
    """Expose ``/metrics`` on ``host:port`` in a daemon thread; False (logged) if the port is
    taken, so a second replica on one host keeps serving requests without metrics."""
    try:
        start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        logger.warning("pool metrics not served on %s:%d: %s", host, port, exc)
        return False
    logger.info("pool metrics served", extra={"metrics": f"http://{host}:{port}/metrics"})
    return True
