"""The pool supervisor: keeps replicas running, publishes back-pressure, scales on the queue.

Every tick it asks the orchestrator to restart what died, folds the replicas' latest
``ReplicaLoad`` into one ``PoolStatus`` (retained, published when the signal changes and every
``status_interval_s`` otherwise), and, with ``autoscale``, sets the replica count from
:func:`desired_replicas` (scale-ups at once, scale-downs after ``scale_down_cooldown_s``).

Named ``supervisor`` rather than ``manager``: it supervises replicas (restarts, scaling); the
requests themselves never pass through it, they go broker → replica directly.
"""

from __future__ import annotations

import logging
import threading

from cloud_controller.pool.backpressure import (
    POOL_ID,
    ReplicaLoad,
    SeenLoad,
    all_replica_loads,
    pool_status,
    same_signal,
)
from cloud_controller.pool.orchestrator import Orchestrator, OrchestratorError, desired_replicas
from cloud_controller.pool.settings import PoolSettings
from protocol.codec import DecodeError, RejectCounter, decode, encode
from protocol.inference import PoolStatus
from protocol.mqtt import InboundMessage, MqttClient, MqttError
from protocol.topics import QoS, Topics
from spillway.batching import Clock, MonotonicClock

logger = logging.getLogger(__name__)


class PoolSupervisor:
    """Runs on its own thread (``run``) or is stepped by a caller (``step``)."""

    def __init__(
        self,
        settings: PoolSettings,
        orchestrator: Orchestrator,
        *,
        mqtt: MqttClient | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._settings = settings
        self.orchestrator = orchestrator
        self._topics = Topics(settings.topic_root)
        self._mqtt = mqtt or MqttClient(settings.mqtt(settings.supervisor_client_id()))
        self._clock = clock or MonotonicClock()
        self._lock = threading.Lock()
        self._seen: dict[str, SeenLoad] = {}
        self._rejects = RejectCounter()
        self._last_status: PoolStatus | None = None
        self._last_published = float("-inf")
        self._last_scale_down = float("-inf")
        self.status_history: list[PoolStatus] = []
        """Every status published (newest last; trimmed to 1000)."""

    def start(self) -> None:
        self._mqtt.subscribe(all_replica_loads(self._topics), self._on_load, qos=QoS.AT_MOST_ONCE)
        self._mqtt.start()
        self.orchestrator.scale(self._settings.replicas)

    def loads(self) -> dict[str, ReplicaLoad]:
        with self._lock:
            return {replica_id: seen.load for replica_id, seen in self._seen.items()}

    def _on_load(self, msg: InboundMessage) -> None:
        try:
            load = decode(msg.payload, ReplicaLoad)
        except DecodeError as exc:
            self._rejects.reject("pool_replica_load", exc.reason, str(exc), topic=msg.topic)
            return
        with self._lock:
            self._seen[load.device_id] = SeenLoad(load, self._clock.monotonic())

    def step(self) -> PoolStatus:
        """One tick: supervise, publish the status, scale. Returns the current status."""
        try:
            self.orchestrator.supervise()
        except OrchestratorError as exc:
            logger.warning("supervise failed: %s", exc)
        now = self._clock.monotonic()
        with self._lock:
            seen = list(self._seen.values())
        status = pool_status(
            seen,
            now=now,
            stale_after_s=self._settings.stale_after_s,
            high_water_items=self._settings.high_water_items,
        )
        due = now - self._last_published >= self._settings.status_interval_s
        if due or not same_signal(self._last_status, status):
            self._publish(status)
            self._last_published = now
        self._last_status = status
        if self._settings.autoscale:
            self._autoscale(seen, status, now)
        return status

    def _autoscale(self, seen: list[SeenLoad], status: PoolStatus, now: float) -> None:
        items = sum(s.load.outstanding_items for s in seen if s.load.ready)
        per_item = [s.load.per_item_ms for s in seen if s.load.per_item_ms > 0]
        current = self.orchestrator.desired()
        want = desired_replicas(
            queued_items=items,
            per_item_ms=sum(per_item) / len(per_item) if per_item else 0.0,
            current=current,
            min_replicas=self._settings.min_replicas,
            max_replicas=self._settings.max_replicas,
            target_wait_ms=self._settings.target_wait_ms,
        )
        if want < current:
            if now - self._last_scale_down < self._settings.scale_down_cooldown_s:
                return
            self._last_scale_down = now
        if want != current:
            logger.info(
                "autoscaling",
                extra={"from": current, "to": want, "queue_depth": status.queue_depth},
            )
            try:
                self.orchestrator.scale(want)
            except OrchestratorError as exc:
                logger.warning("scaling failed; retrying next tick: %s", exc)

    def _publish(self, status: PoolStatus) -> None:
        try:
            self._mqtt.publish(
                self._topics.pool_status(), encode(status), qos=QoS.AT_LEAST_ONCE, retain=True
            )
        except MqttError as exc:
            logger.warning("pool status not published: %s", exc)
            return
        self.status_history.append(status)
        del self.status_history[:-1000]

    def run(self, stop: threading.Event, *, tick_s: float = 0.2) -> None:
        while not stop.wait(tick_s):
            self.step()

    def shutdown(self, *, replicas_stop: bool = True) -> None:
        """Stop the replicas and say so on the status topic before disconnecting.

        ``replicas_stop`` False (Kubernetes: the StatefulSet outlives its supervisor) leaves
        the last status as it was.
        """
        self.orchestrator.shutdown()
        if not replicas_stop:
            self._mqtt.stop()
            return
        closed = PoolStatus(
            device_id=POOL_ID, accepting=False, queue_depth=0, est_wait_ms=0.0, replicas=0
        )
        self._mqtt.stop(
            before_disconnect=lambda: self._mqtt.publish(
                self._topics.pool_status(),
                encode(closed),
                qos=QoS.AT_LEAST_ONCE,
                retain=True,
                wait_s=2.0,
            )
        )
