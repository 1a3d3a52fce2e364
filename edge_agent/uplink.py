"""Results from the outbox to the controller, until the controller says it has them.

``ResultUplink`` runs one thread. Whenever the broker is connected it reads the oldest
pending records (at most ``inflight_records`` of them: flow control), publishes the ones
not yet in flight as ``ResultBatch`` messages (QoS 1, one boot epoch each, at most
``max_batch_bytes`` of records) and remembers when. A record is published again when no
``ResultAck`` came for it within ``resend_after_s``, and everything pending is published
again after a reconnect. A ``ResultAck`` (sent by the controller after its database commit)
deletes its records from the outbox. Redelivery is therefore normal: the controller's UNIQUE
``(device_id, boot_epoch, seq)`` key makes it a no-op, and its ack deletes the record here.

Acks arrive on paho's network thread; a bad one is counted and dropped. This module knows
nothing of inference.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_agent.clock import Clock
from edge_agent.outbox import Outbox, Record
from protocol.codec import DecodeError, RejectCounter, decode, encode
from protocol.inference import ResultAck, ResultBatch, ResultRecord
from protocol.mqtt import BrokerClient, InboundMessage, MqttError
from protocol.topics import DeviceChannel, Topics

logger = logging.getLogger(__name__)

MAX_RECORDS_PER_BATCH = 500
"""``ResultBatch.records`` holds at most this many (protocol limit)."""
IDLE_POLL_S = 0.5


class ResultUplink:
    """Publishes pending outbox records and deletes them on the controller's ack."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        client: BrokerClient,
        connected: Callable[[], bool],
        device_id: str,
        topics: Topics,
        clock: Clock,
        rejects: RejectCounter,
        max_batch_bytes: int,
        inflight_records: int,
        resend_after_s: float,
    ) -> None:
        self._outbox = outbox
        self._client = client
        self._connected = connected
        self._device_id = device_id
        self._topic = topics.device(device_id, DeviceChannel.RESULTS)
        self._acks_topic = topics.device(device_id, DeviceChannel.ACKS)
        self._clock = clock
        self._rejects = rejects
        self._max_batch_bytes = max_batch_bytes
        self._inflight_records = inflight_records
        self._resend_after_s = resend_after_s
        self._lock = threading.Lock()
        self._inflight: dict[tuple[int, int], float] = {}
        """(boot_epoch, seq) -> monotonic time it was last published."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches_sent = 0
        self.records_sent = 0
        self.records_resent = 0
        self.records_acked = 0
        self.acks_unknown = 0
        """Acked seqs that were no longer in the outbox (a repeated ack)."""

    # -- lifecycle -----------------------------------------------------------------------

    def attach(self) -> None:
        """Subscribe to the device's acks topic (before the client starts)."""
        spec = DeviceChannel.ACKS.spec
        self._client.subscribe(self._acks_topic, self._on_ack, qos=spec.qos)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
            self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def wake(self) -> None:
        """Something was committed: look now rather than at the next poll."""
        self._wake.set()

    def on_connect(self, session_present: bool) -> None:
        """After every CONNACK: whatever was in flight may be lost; send it all again."""
        with self._lock:
            self._inflight.clear()
        self._wake.set()

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # -- the sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(IDLE_POLL_S)
            self._wake.clear()
            if self._stop.is_set() or not self._connected():
                continue
            try:
                self.send_due()
            except Exception:
                logger.exception("uplink round failed; retrying")
                self._stop.wait(IDLE_POLL_S)

    def send_due(self) -> int:
        """Publish every pending record not in flight (or overdue); returns how many."""
        records = self._outbox.pending(limit=self._inflight_records)
        now = self._clock.monotonic()
        with self._lock:
            due: list[Record] = []
            for r in records:
                sent_at = self._inflight.get((r.boot_epoch, r.seq))
                if sent_at is None or now - sent_at >= self._resend_after_s:
                    due.append(r)
                    if sent_at is not None:
                        self.records_resent += 1
        sent = 0
        for group in self._batches(due):
            message = ResultBatch(
                device_id=self._device_id,
                sent_at=self._clock.now(),
                boot_epoch=group[0].boot_epoch,
                records=[ResultRecord.model_validate_json(r.payload) for r in group],
            )
            try:
                self._client.publish(
                    self._topic, encode(message), qos=DeviceChannel.RESULTS.spec.qos
                )
            except MqttError as exc:
                logger.info("results not published now: %s", exc)
                break
            with self._lock:
                for r in group:
                    self._inflight[(r.boot_epoch, r.seq)] = now
            self.batches_sent += 1
            self.records_sent += len(group)
            sent += len(group)
        return sent

    def _batches(self, records: list[Record]) -> list[list[Record]]:
        """Consecutive records of one boot epoch, capped by bytes and by count."""
        groups: list[list[Record]] = []
        size = 0
        for r in records:
            current = groups[-1] if groups else None
            if (
                current is None
                or current[0].boot_epoch != r.boot_epoch
                or len(current) >= MAX_RECORDS_PER_BATCH
                or size + len(r.payload) > self._max_batch_bytes
            ):
                groups.append([r])
                size = len(r.payload)
            else:
                current.append(r)
                size += len(r.payload)
        return groups

    # -- acks (network thread) ---------------------------------------------------------

    def _on_ack(self, msg: InboundMessage) -> None:
        try:
            ack = decode(msg.payload, ResultAck)
        except DecodeError as exc:
            self._rejects.reject("acks", exc.reason, str(exc), topic=msg.topic)
            return
        if ack.device_id != self._device_id:
            self._rejects.reject(
                "acks", "device_mismatch", f"ack for {ack.device_id!r}", topic=msg.topic
            )
            return
        deleted = self._outbox.ack(ack.boot_epoch, ack.seqs)
        with self._lock:
            for seq in ack.seqs:
                self._inflight.pop((ack.boot_epoch, seq), None)
            self.records_acked += deleted
            self.acks_unknown += len(set(ack.seqs)) - deleted
        self._wake.set()  # the window has room again
