"""Heartbeats and telemetry: the agent's periodic, fire-and-forget messages.

Both travel at QoS 0 (``DeviceChannel.HEARTBEAT``/``TELEMETRY``): a stale sample is worth
nothing, so while the broker is away a tick is skipped and counted, never queued. The
heartbeat ``seq`` grows on every tick, sent or not, so a gap on the cloud side shows how
many were skipped. Scheduling lives in ``periodic``; this module only builds and sends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_agent.clock import Clock
from edge_agent.probe import SystemProbe
from protocol.codec import encode
from protocol.messages import Heartbeat, Telemetry
from protocol.mqtt import BrokerClient, MqttError, NotConnected
from protocol.topics import DeviceChannel, Topics

logger = logging.getLogger(__name__)


class _Sender:
    def __init__(self, publisher: BrokerClient, topic: str, channel: DeviceChannel) -> None:
        self._publisher = publisher
        self._topic = topic
        self._spec = channel.spec
        self._lock = threading.Lock()
        self.sent = 0
        self.skipped = 0
        """Ticks not sent because the broker was unreachable (or refused the publish)."""

    def _send(self, payload: bytes) -> bool:
        try:
            self._publisher.publish(
                self._topic, payload, qos=self._spec.qos, retain=self._spec.retain
            )
        except NotConnected:
            with self._lock:
                self.skipped += 1
            return False
        except MqttError as exc:
            with self._lock:
                self.skipped += 1
            logger.warning("%s not sent: %s", self._topic, exc)
            return False
        with self._lock:
            self.sent += 1
        return True


class HeartbeatSender(_Sender):
    """Sends ``Heartbeat(seq, uptime_s, boot_epoch)`` once per call."""

    def __init__(
        self,
        *,
        device_id: str,
        topics: Topics,
        publisher: BrokerClient,
        boot_epoch: int,
        clock: Clock,
        started_monotonic: float,
    ) -> None:
        super().__init__(
            publisher, topics.device(device_id, DeviceChannel.HEARTBEAT), DeviceChannel.HEARTBEAT
        )
        self._device_id = device_id
        self._boot_epoch = boot_epoch
        self._clock = clock
        self._started = started_monotonic
        self._seq = 0

    def beat(self) -> None:
        seq = self._seq
        self._seq += 1
        message = Heartbeat(
            device_id=self._device_id,
            sent_at=self._clock.now(),
            seq=seq,
            uptime_s=max(0.0, self._clock.monotonic() - self._started),
            boot_epoch=self._boot_epoch,
        )
        self._send(encode(message))


class TelemetrySender(_Sender):
    """Samples the host (plus the agent's own counters) and sends ``Telemetry``."""

    def __init__(
        self,
        *,
        device_id: str,
        topics: Topics,
        publisher: BrokerClient,
        boot_epoch: int,
        clock: Clock,
        probe: SystemProbe,
        agent_metrics: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        super().__init__(
            publisher, topics.device(device_id, DeviceChannel.TELEMETRY), DeviceChannel.TELEMETRY
        )
        self._device_id = device_id
        self._boot_epoch = boot_epoch
        self._clock = clock
        self._probe = probe
        self._agent_metrics = agent_metrics

    def report(self) -> None:
        metrics = self._probe.metrics()
        if self._agent_metrics is not None:
            metrics.update(self._agent_metrics())
        message = Telemetry(
            device_id=self._device_id,
            sent_at=self._clock.now(),
            boot_epoch=self._boot_epoch,
            metrics=metrics,
        )
        self._send(encode(message))
