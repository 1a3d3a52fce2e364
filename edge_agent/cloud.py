"""The edge's view of the cloud overflow pool: send it a request, hear its back-pressure.

``CloudClient`` is the seam the runtime offloads through; ``MqttCloudClient`` is the real
one. It publishes ``InferRequest`` (QoS 1) on the pool's queue topic with this device's
reply topic, a fresh correlation id and a message expiry, and awaits the matching
``InferResponse``. It follows the pool's retained ``PoolStatus``; a broker that is away, a
timeout or a refusal marks the cloud unavailable for a cool-down, so requests are served
locally instead of waiting on a pool that is not there. The cool-down grows while the
pool keeps failing: ``cooldown_min_s`` after an answer, doubled by each failure after a
cool-down ended, at most ``cooldown_s``; an answer resets it. A pool that is merely slow
for a moment is tried again soon; one that is gone is asked rarely. Every failure is one of::

    CloudUnavailable      temporary: serve this request locally
    ├── CloudNotConnected the broker is not reachable now
    ├── CloudTimeout      no answer within the timeout (or the deadline)
    └── CloudRefused      the pool answered overloaded or error

Replies arrive on paho's network thread and are handed to the waiting coroutine's loop.
This module knows nothing of batching or HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import uuid
from collections.abc import Callable
from typing import Protocol

from edge_agent.clock import Clock
from edge_agent.offload import CloudState, CloudView
from protocol.codec import DecodeError, RejectCounter, decode, encode
from protocol.inference import InferRequest, InferResponse, InferStatus, PoolStatus
from protocol.mqtt import BrokerClient, InboundMessage, MqttError
from protocol.topics import QoS, Topics

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 8 * 1024 * 1024


class CloudUnavailable(Exception):
    """The cloud cannot serve this request now; serve it locally."""

    why = "unavailable"


class CloudNotConnected(CloudUnavailable):
    why = "not_connected"


class CloudTimeout(CloudUnavailable):
    why = "timeout"


class CloudRefused(CloudUnavailable):
    why = "refused"


class CloudClient(Protocol):
    """What the runtime needs from the cloud pool."""

    def view(self, now: float) -> CloudView: ...

    async def infer(self, request: InferRequest, *, timeout_s: float) -> InferResponse: ...


class NoCloud:
    """A cloud that is never there (offloading off, or tests of the local path)."""

    def view(self, now: float) -> CloudView:
        return CloudView(CloudState.UNKNOWN)

    async def infer(self, request: InferRequest, *, timeout_s: float) -> InferResponse:
        raise CloudNotConnected("no cloud pool configured")


class MqttCloudClient:
    """Offloads over MQTT v5 request/response; call ``attach()`` before the client starts."""

    def __init__(
        self,
        client: BrokerClient,
        *,
        device_id: str,
        topics: Topics,
        connected: Callable[[], bool],
        clock: Clock,
        cooldown_s: float,
        cooldown_min_s: float | None = None,
        rejects: RejectCounter,
    ) -> None:
        self._client = client
        self._device_id = device_id
        self._topics = topics
        self._connected = connected
        self._clock = clock
        self._cooldown_s = cooldown_s
        self._cooldown_min_s = min(
            cooldown_s, cooldown_s if cooldown_min_s is None else cooldown_min_s
        )
        self._cool_s = 0.0
        """The current cool-down; 0 after an answer."""
        self._rejects = rejects
        self._reply_topic = topics.replies(device_id)
        self._lock = threading.Lock()
        self._waiting: dict[bytes, tuple[asyncio.AbstractEventLoop, asyncio.Future[InferResponse]]]
        self._waiting = {}
        self._status: PoolStatus | None = None
        self._cool_until = -math.inf
        self.sent = 0
        self.failures: dict[str, int] = {}

    def attach(self) -> None:
        """Subscribe to this device's replies and the pool's back-pressure signal."""
        self._client.subscribe(self._reply_topic, self._on_reply, qos=QoS.AT_LEAST_ONCE)
        self._client.subscribe(self._topics.pool_status(), self._on_status, qos=QoS.AT_LEAST_ONCE)

    def view(self, now: float) -> CloudView:
        with self._lock:
            status, cool_until = self._status, self._cool_until
        if not self._connected() or now < cool_until:
            return CloudView(CloudState.UNAVAILABLE)
        if status is None:
            return CloudView(CloudState.UNKNOWN)
        if not status.accepting:
            return CloudView(CloudState.BACK_PRESSURE, status.est_wait_ms)
        return CloudView(CloudState.ACCEPTING, status.est_wait_ms)

    async def infer(self, request: InferRequest, *, timeout_s: float) -> InferResponse:
        if not self._connected():
            raise self._failed(CloudNotConnected("broker not connected"))
        loop = asyncio.get_running_loop()
        correlation = uuid.uuid4().bytes
        future: asyncio.Future[InferResponse] = loop.create_future()
        with self._lock:
            self._waiting[correlation] = (loop, future)
        try:
            try:
                self._client.publish(
                    self._topics.pool_requests(),
                    encode(request),
                    qos=QoS.AT_LEAST_ONCE,
                    response_topic=self._reply_topic,
                    correlation_data=correlation,
                    expiry_s=max(1, math.ceil(timeout_s)),
                )
            except MqttError as exc:
                raise self._failed(CloudNotConnected(f"publish failed: {exc}")) from exc
            self.sent += 1
            try:
                response = await asyncio.wait_for(future, timeout=timeout_s)
            except TimeoutError as exc:
                raise self._failed(
                    CloudTimeout(f"no answer from the pool within {timeout_s:.3f}s")
                ) from exc
        finally:
            with self._lock:
                self._waiting.pop(correlation, None)
        if response.status in (InferStatus.OVERLOADED, InferStatus.ERROR):
            raise self._failed(CloudRefused(f"pool answered {response.status.value}"))
        with self._lock:
            self._cool_s = 0.0
        return response

    # -- internals -----------------------------------------------------------------------

    def _failed(self, exc: CloudUnavailable) -> CloudUnavailable:
        now = self._clock.monotonic()
        with self._lock:
            if now >= self._cool_until:  # a new failure, not one more of the same episode
                grown = 2 * self._cool_s if self._cool_s else self._cooldown_min_s
                self._cool_s = min(self._cooldown_s, grown)
                self._cool_until = now + self._cool_s
            cool_s = self._cool_s
            self.failures[exc.why] = self.failures.get(exc.why, 0) + 1
        logger.warning(
            "cloud pool unavailable; serving locally",
            extra={"why": exc.why, "detail": str(exc), "cooldown_s": cool_s},
        )
        return exc

    def _on_reply(self, msg: InboundMessage) -> None:
        """Network thread. Replies we are not waiting for (late, or another user's) are
        dropped quietly: the topic is shared by everything this client asks."""
        if msg.correlation_data is None:
            return
        with self._lock:
            waiter = self._waiting.get(msg.correlation_data)
        if waiter is None:
            return
        try:
            response = decode(msg.payload, InferResponse, max_bytes=MAX_REPLY_BYTES)
        except DecodeError as exc:
            self._rejects.reject("replies", exc.reason, str(exc), topic=msg.topic)
            return
        loop, future = waiter

        def deliver() -> None:
            if not future.done():
                future.set_result(response)

        loop.call_soon_threadsafe(deliver)

    def _on_status(self, msg: InboundMessage) -> None:
        if not msg.payload:  # a cleared retained status: no pool any more
            with self._lock:
                self._status = None
            return
        try:
            status = decode(msg.payload, PoolStatus)
        except DecodeError as exc:
            self._rejects.reject("pool_status", exc.reason, str(exc), topic=msg.topic)
            return
        with self._lock:
            self._status = status
        logger.info(
            "pool status",
            extra={"accepting": status.accepting, "est_wait_ms": status.est_wait_ms},
        )
