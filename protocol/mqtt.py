"""The one adapter over paho-mqtt that both sides use.

It speaks MQTT v5 with ``CallbackAPIVersion.VERSION2``, keeps a persistent session
(``clean_start=False`` + session expiry), reconnects on its own with capped, jittered
exponential backoff, re-subscribes and runs connect hooks after every CONNACK, and turns
every paho result code into either success or an exception. Callers never see paho::

    MqttError                 base class
    ├── NotConnected          temporary: no session; QoS 0 could not be sent
    ├── PublishFailed         temporary: paho refused the publish (queue full, ...)
    └── PublishTimeout        temporary: no PUBACK within the wait the caller asked for

A QoS 1 publish made while disconnected is kept by paho and sent after reconnecting,
so it succeeds here (it is not dropped); a QoS 0 publish made then raises.

The network thread waits on the socket with ``mqtt_loop.SocketLoop`` (epoll), not paho's
``select``-based ``loop()``, so file descriptors above 1023 work.

A message is routed to its handlers by ``topic_filters.Routes`` (filters split once,
matches cached per topic) instead of a paho matcher built per subscription.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.mqtt_loop import SocketLoop
from protocol.topic_filters import Routes
from protocol.topics import QoS

logger = logging.getLogger(__name__)


class MqttError(Exception):
    """Base of the adapter's errors; all are worth retrying later."""


class NotConnected(MqttError):
    pass


class PublishFailed(MqttError):
    pass


class PublishTimeout(MqttError):
    pass


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: dict[str, str] = field(default_factory=dict)
    ack: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    """With ``MqttSettings.manual_ack`` and QoS 1: sends the PUBACK; call it once the message
    is fully handled. Until then the broker keeps the message and redelivers it after a
    reconnect. None when the adapter acknowledges on its own (the default)."""


Handler = Callable[[InboundMessage], None]
ConnectHook = Callable[[bool], None]  # argument: session_present


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: QoS
    retain: bool


@dataclass(frozen=True)
class MqttSettings:
    """Connection settings; built by each side from its own settings object."""

    host: str
    port: int
    client_id: str
    keepalive_s: int = 10
    session_expiry_s: int = 3600
    """How long the broker keeps the session (subscriptions, queued QoS 1) while away."""
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    manual_ack: bool = False
    """False: a QoS 1 message is acknowledged when its handler returns. True: the handler
    gets ``InboundMessage.ack`` and the PUBACK waits for it (at-least-once processing)."""


class BrokerClient(Protocol):
    """The seam the rest of Spillway talks to."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: QoS,
        retain: bool = False,
        expiry_s: int | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        wait_s: float | None = None,
    ) -> None: ...

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: QoS) -> None: ...


def backoff_delays(initial_s: float, max_s: float, rng: random.Random) -> Callable[[int], float]:
    """Jittered exponential backoff: attempt n waits U(initial/2, min(max, initial * 2**n))."""

    def delay(attempt: int) -> float:
        cap = min(max_s, initial_s * (2 ** min(attempt, 30)))
        return rng.uniform(initial_s / 2, cap)

    return delay


class MqttClient:
    """A paho client with its own network thread. Safe to call from any thread."""

    def __init__(self, settings: MqttSettings, *, will: Will | None = None) -> None:
        self._settings = settings
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=settings.manual_ack,
        )
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)  # 0 = unbounded: never drop QoS 1 locally
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.tls_ca_file:
            self._client.tls_set(
                ca_certs=settings.tls_ca_file,
                certfile=settings.tls_cert_file,
                keyfile=settings.tls_key_file,
            )
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=int(will.qos), retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._loop = SocketLoop(self._client)
        self._lock = threading.Lock()
        self._routes: Routes[tuple[Handler, QoS]] = Routes()
        """Filter -> (handler, QoS), in subscription order."""
        self._unsubscribe_pending: set[str] = set()
        """Filters unsubscribed while the UNSUBSCRIBE could not be sent (sent after CONNACK)."""
        self._hooks: list[ConnectHook] = []
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = backoff_delays(
            settings.backoff_initial_s, settings.backoff_max_s, random.Random()
        )
        self.connects = 0
        """Number of successful CONNACKs; more than one means reconnects happened."""
        self.handler_errors = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self._settings.client_id}", daemon=True
        )
        self._thread.start()

    def stop(self, *, before_disconnect: Callable[[], None] | None = None) -> None:
        """Disconnect cleanly (no Last Will) after ``before_disconnect`` has run."""
        if before_disconnect is not None and self._connected.is_set():
            try:
                before_disconnect()
            except MqttError as exc:
                logger.warning("final publish before disconnect failed: %s", exc)
        self._stopping.set()
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                logger.warning("network thread of %s did not stop", self._settings.client_id)
                return  # it still uses the loop's sockets
            self._thread = None
        self._loop.close()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def add_connect_hook(self, hook: ConnectHook) -> None:
        """``hook(session_present)`` runs on the network thread after every CONNACK.

        Hooks must not publish with ``wait_s``: the network thread is busy running them.
        """
        with self._lock:
            self._hooks.append(hook)

    # -- messaging -------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: QoS) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (on the network thread).

        The SUBSCRIBE is sent now if connected, and again after every CONNACK. Note that
        ``wait_connected`` returns before the SUBACK: a message published by someone else
        right after it may still miss this subscriber (retained messages do not).
        """
        with self._lock:
            self._routes.set(topic_filter, (handler, qos))
            self._unsubscribe_pending.discard(topic_filter)
        if self._connected.is_set():
            rc, _ = self._client.subscribe(topic_filter, qos=int(qos))
            if rc != paho.MQTT_ERR_SUCCESS:
                logger.warning("subscribe %s deferred to reconnect: %s", topic_filter, rc)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` and tell the broker now if connected, else right
        after the next CONNACK (a kept session would still hold the subscription)."""
        with self._lock:
            self._routes.pop(topic_filter)
            self._unsubscribe_pending.add(topic_filter)
        if self._connected.is_set():
            rc, _ = self._client.unsubscribe(topic_filter)
            if rc == paho.MQTT_ERR_SUCCESS:
                with self._lock:
                    if topic_filter not in self._routes:
                        self._unsubscribe_pending.discard(topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: QoS,
        retain: bool = False,
        expiry_s: int | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        wait_s: float | None = None,
    ) -> None:
        props: Properties | None = None
        if expiry_s is not None or response_topic is not None or correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        info = self._client.publish(topic, payload, qos=int(qos), retain=retain, properties=props)
        if info.rc == paho.MQTT_ERR_NO_CONN:
            if qos == QoS.AT_MOST_ONCE:
                raise NotConnected(f"not connected: QoS 0 message to {topic} not sent")
            # QoS 1: paho keeps it and sends it after the next CONNACK.
        elif info.rc != paho.MQTT_ERR_SUCCESS:
            raise PublishFailed(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if wait_s is not None and qos != QoS.AT_MOST_ONCE:
            try:
                info.wait_for_publish(timeout=wait_s)
            except (RuntimeError, ValueError) as exc:
                raise PublishFailed(f"publish to {topic} failed: {exc}") from exc
            if not info.is_published():
                raise PublishTimeout(f"no PUBACK for {topic} within {wait_s}s")

    # -- paho callbacks (network thread) -----------------------------------------------

    def _run(self) -> None:
        attempt = 0
        first = True
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = self._settings.session_expiry_s
        while not self._stopping.is_set():
            try:
                if first:
                    self._client.connect(
                        self._settings.host,
                        self._settings.port,
                        keepalive=self._settings.keepalive_s,
                        clean_start=False,
                        properties=connect_props,
                    )
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, ValueError) as exc:
                delay = self._backoff(attempt)
                attempt += 1
                logger.info(
                    "broker %s:%s unreachable (%s); retry in %.2fs",
                    self._settings.host,
                    self._settings.port,
                    exc,
                    delay,
                )
                self._stopping.wait(delay)
                continue
            connects_before = self.connects
            rc = paho.MQTT_ERR_SUCCESS
            while rc == paho.MQTT_ERR_SUCCESS and not self._stopping.is_set():
                rc = self._loop.run_once(0.2)
            self._connected.clear()
            if self._stopping.is_set():
                break
            if self.connects > connects_before:
                attempt = 0  # the link worked: start the backoff over
            delay = self._backoff(attempt)
            attempt += 1
            logger.info("connection lost (%s); reconnect in %.2fs", paho.error_string(rc), delay)
            self._stopping.wait(delay)
        # Flush a final DISCONNECT if one was queued by stop().
        for _ in range(10):
            if self._loop.run_once(0.05) != paho.MQTT_ERR_SUCCESS:
                break

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.error("broker refused connection: %s", reason_code)
            return
        self.connects += 1
        with self._lock:
            subs = list(self._routes.items())
            hooks = list(self._hooks)
            gone = list(self._unsubscribe_pending)
            self._unsubscribe_pending.clear()
        for topic_filter in gone:
            client.unsubscribe(topic_filter)
        for topic_filter, (_, qos) in subs:
            client.subscribe(topic_filter, qos=int(qos))
        self._connected.set()
        logger.info(
            "connected to broker",
            extra={"client_id": self._settings.client_id, "session_present": flags.session_present},
        )
        for hook in hooks:
            try:
                hook(flags.session_present)
            except Exception:
                logger.exception("connect hook failed")

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()

    def _ack(self, mid: int, qos: int, connection: int) -> None:
        """PUBACK ``mid`` if it was delivered on the current connection; after a reconnect the
        broker redelivers it instead (a stale mid could name another message)."""
        if connection != self.connects or not self._connected.is_set():
            logger.info("ack of mid %d skipped: delivered on an earlier connection", mid)
            return
        rc = self._client.ack(mid, qos)
        if rc != paho.MQTT_ERR_SUCCESS:
            logger.warning("ack of mid %d failed: %s", mid, paho.error_string(rc))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        ack: Callable[[], None] | None = None
        if self._settings.manual_ack and msg.qos > 0:
            ack = functools.partial(self._ack, msg.mid, msg.qos, self.connects)
        inbound = InboundMessage(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            user_properties=dict(getattr(props, "UserProperty", []) or []),
            ack=ack,
        )
        with self._lock:
            routes = self._routes.match(inbound.topic)
        for handler, _ in routes:
            try:
                handler(inbound)
            except Exception:
                self.handler_errors += 1
                logger.exception("handler for %s failed", msg.topic)
