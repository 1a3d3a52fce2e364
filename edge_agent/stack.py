"""Local inference, assembled: model, outbox, runtime, ingresses, uplink, cloud client.

``ServingStack`` exists only when the agent has a model dir. It is built before the MQTT
client starts (so its subscriptions - acks, replies, pool status, infer - are sent with
every CONNACK), and torn down in the reverse order: ingresses stop taking work, the
runtime finishes and commits what it has, the uplink stops, the outbox closes. Heavy
imports (numpy, onnxruntime, FastAPI) happen here, never when the agent only keeps
presence. This module knows no controller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge_agent.clock import Clock
from edge_agent.cloud import CloudClient, MqttCloudClient, NoCloud
from edge_agent.eventloop import LoopThread
from edge_agent.ingress_http import HttpIngress, create_app
from edge_agent.ingress_mqtt import MqttIngress
from edge_agent.metrics import ServingMetrics
from edge_agent.outbox import Outbox, OutboxLimits
from edge_agent.probe import LoadSampler
from edge_agent.quality import QualityProber
from edge_agent.results import ResultWriter
from edge_agent.serving import ServingModel, ServingRuntime, load_serving_model
from edge_agent.settings import EdgeSettings
from edge_agent.uplink import ResultUplink
from protocol.codec import RejectCounter
from protocol.mqtt import MqttClient
from protocol.topics import Topics

logger = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite"


@dataclass
class _Parts:
    loop: LoopThread
    outbox: Outbox
    runtime: ServingRuntime
    uplink: ResultUplink
    cloud: CloudClient
    mqtt_ingress: MqttIngress | None
    http: HttpIngress | None


class ServingStack:
    """Everything that serves; ``start()`` once, ``stop()`` once."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        client: MqttClient,
        boot_epoch: int,
        clock: Clock,
        topics: Topics,
        rejects: RejectCounter,
        model: ServingModel | None = None,
    ) -> None:
        """Loads the model (``ModelUnavailable`` if it cannot) and subscribes; no threads yet."""
        self.settings = settings
        device_id = settings.device_id
        model = model or load_serving_model(settings)
        self.metrics = ServingMetrics()
        outbox = Outbox(
            settings.state_dir / OUTBOX_FILE,
            boot_epoch=boot_epoch,
            limits=OutboxLimits(
                max_bytes=settings.outbox_max_bytes,
                max_age_s=settings.outbox_max_age_s,
                policy=settings.outbox_full_policy,
                synchronous=settings.outbox_synchronous,
            ),
        )
        connected = lambda: client.is_connected  # noqa: E731
        uplink = ResultUplink(
            outbox=outbox,
            client=client,
            connected=connected,
            device_id=device_id,
            topics=topics,
            clock=clock,
            rejects=rejects,
            max_batch_bytes=settings.uplink_max_batch_bytes,
            inflight_records=settings.uplink_inflight_records,
            resend_after_s=settings.uplink_resend_after_s,
        )
        uplink.attach()
        client.add_connect_hook(uplink.on_connect)
        client.add_connect_hook(lambda _: self.metrics.on_connect(client.connects))
        cloud: CloudClient = NoCloud()
        if settings.offload_enabled:
            mqtt_cloud = MqttCloudClient(
                client,
                device_id=device_id,
                topics=topics,
                connected=connected,
                clock=clock,
                cooldown_s=settings.cloud_cooldown_s,
                cooldown_min_s=settings.cloud_cooldown_min_s,
                rejects=rejects,
            )
            mqtt_cloud.attach()
            cloud = mqtt_cloud
        self._sampler = LoadSampler()
        runtime = ServingRuntime(
            model,
            settings=settings,
            writer=ResultWriter(outbox, clock=clock, on_committed=uplink.wake),
            cloud=cloud,
            metrics=self.metrics,
            clock=clock,
            host_load=self._host_load,
        )
        self.quality = QualityProber(
            cloud=cloud, device_id=device_id, clock=clock, model=lambda: runtime.model
        )
        runtime.on_served.append(self.quality.on_served)
        loop = LoopThread()
        mqtt_ingress = None
        if settings.mqtt_ingress:
            mqtt_ingress = MqttIngress(
                runtime=runtime,
                loop=loop,
                client=client,
                device_id=device_id,
                topics=topics,
                clock=clock,
                rejects=rejects,
            )
            mqtt_ingress.attach()
        http = None
        if settings.http_port is not None:
            http = HttpIngress(
                create_app(runtime, clock=clock), host=settings.http_host, port=settings.http_port
            )
        self._parts = _Parts(loop, outbox, runtime, uplink, cloud, mqtt_ingress, http)
        self.metrics.add_source(self._telemetry)
        self.metrics.on_scrape(self._refresh_gauges)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        p = self._parts
        p.loop.start()
        p.loop.call(p.runtime.start())
        if p.http is not None:
            p.loop.call(p.http.start())
        p.uplink.start()
        logger.info(
            "serving",
            extra={
                "variant": p.runtime.model.variant,
                "device": p.runtime.model.device,
                "http_port": self.http_port,
                "mqtt_ingress": p.mqtt_ingress is not None,
            },
        )

    def stop(self) -> None:
        p = self._parts
        try:
            if p.http is not None:
                p.loop.call(p.http.stop(), timeout_s=10)
            p.loop.call(p.runtime.stop(), timeout_s=10)
        except Exception:
            logger.exception("serving did not stop cleanly")
        p.loop.stop()
        p.uplink.stop()
        p.outbox.close()

    # -- inspection ------------------------------------------------------------------------

    @property
    def runtime(self) -> ServingRuntime:
        return self._parts.runtime

    @property
    def loop(self) -> LoopThread:
        return self._parts.loop

    @property
    def outbox(self) -> Outbox:
        return self._parts.outbox

    @property
    def uplink(self) -> ResultUplink:
        return self._parts.uplink

    @property
    def http_port(self) -> int | None:
        return None if self._parts.http is None else self._parts.http.port

    def counters(self) -> dict[str, int]:
        p = self._parts
        decisions, offloads, kept, fell_back = p.runtime.offload.snapshot()
        counts = {
            "results_stored": p.runtime.writer.records,
            "results_store_failed": p.runtime.writer.failed,
            "uplink_batches_sent": p.uplink.batches_sent,
            "uplink_records_sent": p.uplink.records_sent,
            "uplink_records_resent": p.uplink.records_resent,
            "uplink_records_acked": p.uplink.records_acked,
            "outbox_dropped": p.outbox.dropped,
            "offload_decisions": decisions,
        }
        counts.update({f"offloads_{k}": v for k, v in offloads.items()})
        counts.update({f"offload_skipped_{k}": v for k, v in kept.items()})
        counts.update({f"offload_fallback_{k}": v for k, v in fell_back.items()})
        if p.mqtt_ingress is not None:
            counts["infer_received"] = p.mqtt_ingress.received
            counts["infer_answered"] = p.mqtt_ingress.answered
        return counts

    def telemetry(self) -> dict[str, float]:
        """Numbers for ``Telemetry.metrics``."""
        return self.metrics.telemetry()

    def _refresh_gauges(self) -> None:
        records, size = self._parts.outbox.size()
        self.metrics.outbox_records.set(records)
        self.metrics.outbox_bytes.set(size)
        self.metrics.outbox_dropped.set(self._parts.outbox.dropped)
        self.metrics.observe_host(self._sampler.sample())

    def _telemetry(self) -> dict[str, float]:
        p = self._parts
        self._refresh_gauges()
        records, size = p.outbox.size()
        sample = self._sampler.sample()
        return {
            **p.runtime.telemetry(),
            **self.quality.telemetry(),
            "outbox_records": float(records),
            "outbox_bytes": float(size),
            "outbox_dropped_total": float(p.outbox.dropped),
            "uplink_inflight_records": float(p.uplink.inflight),
            "agent_cpu_percent": sample["agent_cpu_percent"],
        }

    def _host_load(self) -> float:
        sample = self._sampler.sample()
        self.metrics.observe_host(sample)
        return max(sample["other_cpu_percent"], sample["memory_percent"]) / 100.0
