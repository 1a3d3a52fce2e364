"""The controller's Prometheus metrics, on a registry of each app's own.

A per-app ``CollectorRegistry`` (never the global one) lets several apps live in one
process, as they do in the tests. Device counts and the broker link are read when
scraped, from callables handed in, so they are never out of date.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol.messages import DeviceStatus

_PENDING_HELP = "Accepted MQTT messages waiting to be written to the database."
_ACTIVE_HELP = "Devices currently counted as transferring an artifact (bounded)."
_ROLLOUTS_HELP = "Rollouts by state (pending, running, paused, rolling_back, finished ones)."


class _LiveCollector(Collector):
    """Gauges computed at scrape time."""

    def __init__(
        self,
        *,
        devices_by_status: Callable[[], Mapping[DeviceStatus, int]],
        mqtt_connected: Callable[[], bool],
        ingest_pending: Callable[[], int],
        transfers_active: Callable[[], int],
        rollouts_by_state: Callable[[], Mapping[str, int]],
    ) -> None:
        self._devices_by_status = devices_by_status
        self._rollouts_by_state = rollouts_by_state
        self._mqtt_connected = mqtt_connected
        self._ingest_pending = ingest_pending
        self._transfers_active = transfers_active

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "spillway_devices", "Registered devices by status.", labels=["status"]
        )
        yield GaugeMetricFamily("spillway_mqtt_connected", "1 while the bridge is connected.")
        yield GaugeMetricFamily("spillway_ingest_pending", _PENDING_HELP)
        yield GaugeMetricFamily("spillway_transfer_active", _ACTIVE_HELP)
        yield GaugeMetricFamily("spillway_rollouts", _ROLLOUTS_HELP, labels=["state"])

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily(
            "spillway_devices", "Registered devices by status.", labels=["status"]
        )
        try:
            counts = self._devices_by_status()
        except Exception:  # a scrape must not fail because the database is down
            counts = {}
        for status, count in counts.items():
            devices.add_metric([status.value], count)
        yield devices
        yield GaugeMetricFamily(
            "spillway_mqtt_connected",
            "1 while the bridge is connected.",
            value=1.0 if self._mqtt_connected() else 0.0,
        )
        yield GaugeMetricFamily(
            "spillway_ingest_pending", _PENDING_HELP, value=float(self._ingest_pending())
        )
        yield GaugeMetricFamily(
            "spillway_transfer_active", _ACTIVE_HELP, value=float(self._transfers_active())
        )
        rollouts = GaugeMetricFamily("spillway_rollouts", _ROLLOUTS_HELP, labels=["state"])
        try:
            by_state = self._rollouts_by_state()
        except Exception:  # a scrape must not fail because the database is down
            by_state = {}
        for state, count in by_state.items():
            rollouts.add_metric([state], count)
        yield rollouts


class ControllerMetrics:
    """Counters the bridge increments and the registry ``/metrics`` renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rejected = Counter(
            "spillway_mqtt_rejected_total",
            "Inbound MQTT messages dropped, by channel and reason.",
            ["channel", "reason"],
            registry=self.registry,
        )
        self.ignored = Counter(
            "spillway_mqtt_ignored_total",
            "Valid inbound messages deliberately not applied (stale boot epoch, unknown device).",
            ["channel", "reason"],
            registry=self.registry,
        )
        self.ingested = Counter(
            "spillway_mqtt_messages_total",
            "Inbound MQTT messages applied, by channel.",
            ["channel"],
            registry=self.registry,
        )
        self.ingest_received = Counter(
            "spillway_ingest_received_total",
            "Inbound MQTT messages accepted onto the ingest queues, by channel; each ends up "
            "applied (spillway_mqtt_messages_total), ignored, rejected as storage_error or "
            "internal_error, or still pending.",
            ["channel"],
            registry=self.registry,
        )
        self.ingest_coalesced = Counter(
            "spillway_ingest_coalesced_total",
            "Applied messages that cost no write of their own: a newer heartbeat of the same "
            "device in the same batch wrote last_seen for them (counted as applied too).",
            ["channel"],
            registry=self.registry,
        )
        self.ingest_batch_size = Histogram(
            "spillway_ingest_batch_messages",
            "Messages applied in one database transaction (batches of two or more).",
            buckets=(2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=self.registry,
        )
        self.ingest_batch_fallbacks = Counter(
            "spillway_ingest_batch_fallbacks_total",
            "Batches the database refused as a whole, then applied one message at a time.",
            registry=self.registry,
        )
        self.connects = Counter(
            "spillway_mqtt_connects_total",
            "Successful connections of the bridge to the broker.",
            registry=self.registry,
        )
        self.reconnects = Counter(
            "spillway_mqtt_reconnects_total",
            "Connections after the first one.",
            registry=self.registry,
        )
        self.desired_published = Counter(
            "spillway_desired_published_total",
            "Desired-state messages handed to the broker client (including republishes).",
            registry=self.registry,
        )

        self.results_ingested = Counter(
            "spillway_results_ingested_total",
            "Result records stored (each once, however often it was delivered).",
            registry=self.registry,
        )
        self.results_duplicates = Counter(
            "spillway_results_duplicates_total",
            "Result records received again after they were stored; skipped and acked again.",
            registry=self.registry,
        )
        self.result_acks = Counter(
            "spillway_result_acks_total",
            "Result acknowledgements handed to the broker client, each after its commit.",
            registry=self.registry,
        )
        self.result_acks_failed = Counter(
            "spillway_result_acks_failed_total",
            "Result acknowledgements the broker client refused (the device resends).",
            registry=self.registry,
        )
        self.result_gaps = Gauge(
            "spillway_result_gaps",
            "Result seqs currently known to be missing, over all devices and boot epochs.",
            registry=self.registry,
        )
        self.results_deleted = Counter(
            "spillway_results_deleted_total",
            "Stored results deleted by the cleanup, by reason (retention, max_rows).",
            ["reason"],
            registry=self.registry,
        )

        self.transfer_chunks = Counter(
            "spillway_transfer_chunks_total",
            "Artifact chunks published (answered ok and acknowledged by the broker); a broadcast "
            "publish counts once however many devices it reaches.",
            registry=self.registry,
        )
        self.transfer_bytes = Counter(
            "spillway_transfer_bytes_total",
            "Artifact bytes served in chunks.",
            registry=self.registry,
        )
        self.transfer_coalesced = Counter(
            "spillway_transfer_coalesced_total",
            "Chunk requests answered by a broadcast publish made once for several requests.",
            registry=self.registry,
        )
        self.transfer_busy = Counter(
            "spillway_transfer_busy_total",
            "Chunk requests answered busy (transfer bound reached or workers' queue full).",
            registry=self.registry,
        )
        self.transfer_refused = Counter(
            "spillway_transfer_refused_total",
            "Chunk requests refused, by status (not_found, bad_range, invalid).",
            ["status"],
            registry=self.registry,
        )
        self.transfer_publish_failed = Counter(
            "spillway_transfer_publish_failed_total",
            "Chunk answers the broker client refused or did not acknowledge in time.",
            registry=self.registry,
        )
        self.models_detected = Counter(
            "spillway_models_detected_total",
            "Folders taken from the watched model directory.",
            registry=self.registry,
        )
        self.models_registered = Counter(
            "spillway_models_registered_total",
            "Model versions that became ready from the watched directory.",
            registry=self.registry,
        )
        self.models_rejected = Counter(
            "spillway_models_rejected_total",
            "Dropped models rejected (each raised an alert).",
            registry=self.registry,
        )
        self.model_uploads = Counter(
            "spillway_model_uploads_total",
            "Variant uploads, by outcome (ready, or the refusal's reason).",
            ["outcome"],
            registry=self.registry,
        )

    def watch(
        self,
        *,
        devices_by_status: Callable[[], Mapping[DeviceStatus, int]],
        mqtt_connected: Callable[[], bool],
        ingest_pending: Callable[[], int],
        transfers_active: Callable[[], int] = lambda: 0,
        rollouts_by_state: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        """Register the scrape-time gauges (once, when the app starts)."""
        self.registry.register(
            _LiveCollector(
                devices_by_status=devices_by_status,
                mqtt_connected=mqtt_connected,
                ingest_pending=ingest_pending,
                transfers_active=transfers_active,
                rollouts_by_state=rollouts_by_state,
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
