"""The MQTT side of the controller: devices in, desired state out.

One ``MqttClient`` (client id from the settings) subscribes to the hello, status,
heartbeat, telemetry, reported and results channels of every device. Each payload is
decoded with ``protocol.codec.decode`` into its model; the device id in the topic must equal
the payload's; what fails is logged and counted (``RejectCounter`` and
``spillway_mqtt_rejected_total{channel,reason}``), and no exception ever leaves a handler.

Accepted messages go, with the time they arrived, onto one of two bounded queues: control
messages (hello, status, reported) and the rest (heartbeats, telemetry, results). One
worker thread applies them in batches through ``ingest.apply_batch``: every queued control
message first, then the rest in arrival order, up to ``ingest_batch_max`` messages (waiting
up to ``ingest_batch_linger_s`` for a batch to fill) in ONE transaction, so a backlog of
telemetry never delays a reported state by more than one batch, and a fleet's heartbeats
cost one ``UPDATE`` per device per batch instead of one transaction each. The worker is the
only writer of device records, so they need no locking; paho's network thread never waits
for the database; while the database is briefly away (a restart, a failover) the worker
retries a batch for up to ``ingest_retry_s`` instead of dropping it; and a batch the
database refuses (one message breaking a constraint) is applied again one message at a
time, so that message alone is dropped (``storage_error``).

Results are the one channel that is answered: the worker stores each ``ResultBatch`` in its
batch's transaction (a record stored before is skipped), and only after the commit publishes
a ``ResultAck`` (QoS 1) with every seq of the batch, the skipped ones included, so the device
can delete them from its outbox. A batch that could not be stored is not acknowledged: the
device sends it again. ``gaps.GapTracker`` follows which seqs are still missing per
(device, boot epoch), and every ``results_cleanup_interval_s`` of the injected clock the
worker deletes what ``retention`` says is too old or too many.

The bridge owns each device's desired state on the wire: ``set_desired`` commits the next
generation and then publishes it retained, QoS 1; every (re)connect republishes every
device's current desired state, so a broker that lost its retained messages gets them back.
Every desired-state message is signed (``protocol.signing``) with the controller's Ed25519
key (``desired_signing_key_path``, else ``signing_key_path``): agents drop unsigned or
forged ones. After a device's Hello is stored, its effective operating policy is pushed if
it changed (``policies.sync``): a new device, or new reported labels, may change it.

It knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from prometheus_client import Counter
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlmodel import Session

from cloud_controller import desired, ingest, policies, retention
from cloud_controller.clock import Clock
from cloud_controller.database import one_line
from cloud_controller.entities import DeviceDesired
from cloud_controller.errors import ControllerError, DesiredNotPublished, DeviceNotFound
from cloud_controller.gaps import GapChange, GapTracker
from cloud_controller.metrics import ControllerMetrics
from cloud_controller.settings import CloudSettings
from models.signing import load_or_create_signing_key
from protocol.codec import DecodeError, RejectCounter, decode, encode
from protocol.inference import ResultAck, ResultBatch
from protocol.messages import (
    DesiredState,
    Envelope,
    Heartbeat,
    Hello,
    Presence,
    ReportedState,
    Telemetry,
)
from protocol.mqtt import InboundMessage, MqttClient, MqttError
from protocol.signing import Signer, sign_desired
from protocol.topics import DeviceChannel, InvalidTopic, Topics

logger = logging.getLogger(__name__)

_MODELS: dict[DeviceChannel, type[Envelope]] = {
    DeviceChannel.HELLO: Hello,
    DeviceChannel.STATUS: Presence,
    DeviceChannel.HEARTBEAT: Heartbeat,
    DeviceChannel.TELEMETRY: Telemetry,
    DeviceChannel.RESULTS: ResultBatch,
    DeviceChannel.REPORTED: ReportedState,
}
"""The channels the controller listens to, and what each carries, in subscription order
(``reported`` last: tests probe it to know that every subscription is live)."""

_CONTROL = frozenset({DeviceChannel.HELLO, DeviceChannel.STATUS, DeviceChannel.REPORTED})
"""Channels whose messages go to the control queue, which the worker empties first."""


@dataclass(frozen=True)
class _Inbound:
    """What ``Bridge.handle`` needs to know about one channel, looked up once per message."""

    model: type[Envelope]
    max_bytes: int
    control: bool
    retained: bool


T = TypeVar("T")

_TICK_S = 1.0
"""Seconds an idle worker waits for a message before it looks at the cleanup schedule."""


@dataclass(frozen=True)
class _Accepted:
    """A decoded, checked message waiting for the database."""

    channel: DeviceChannel
    message: Envelope
    topic: str
    received_at: datetime


class _ByChannel:
    """A counter labelled by channel, each child looked up once (``labels`` is costly at
    thousands of messages a second); a child is created when first counted, so
    ``/metrics`` lists the same series as before. For one thread."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[DeviceChannel, Counter] = {}

    def inc(self, channel: DeviceChannel) -> None:
        child = self._children.get(channel)
        if child is None:
            child = self._children[channel] = self._counter.labels(channel.value)
        child.inc()


class _Cleanup:
    """Queued by ``request_cleanup``: run the results cleanup now, in order."""


class _Stop:
    """Queued by ``stop``: the worker applies what is before it, then ends."""


_Marker = _Cleanup | _Stop
_Item = _Accepted | _Marker


class _IngestQueues:
    """Two bounded FIFOs for the worker: control messages, taken first, and the rest.

    A batch takes every queued control message first (up to the batch size), then data in
    arrival order, and ends before a marker (a cleanup or the stop), which is taken alone;
    markers ignore the bound. Any thread may put; one thread takes.
    """

    def __init__(self, *, control_max: int, data_max: int) -> None:
        self._control: deque[_Accepted] = deque()
        self._data: deque[_Item] = deque()
        self._control_max = control_max
        self._data_max = data_max
        self._markers = 0
        self._ready = threading.Condition()
        self._wanted = 0
        """Queued items the taker waits for (0: it is not waiting). ``put`` wakes it only
        when there are that many: a worker lingering for a full batch is not woken (and
        does not take the GIL) once per message."""

    def put(self, item: _Accepted, *, control: bool) -> bool:
        """Queue ``item``; False when its queue is full."""
        with self._ready:
            if control:
                if len(self._control) >= self._control_max:
                    return False
                self._control.append(item)
            else:
                if len(self._data) - self._markers >= self._data_max:
                    return False
                self._data.append(item)
            if self._wanted and len(self._control) + len(self._data) >= self._wanted:
                self._ready.notify()
            return True

    def put_marker(self, marker: _Marker) -> None:
        with self._ready:
            self._data.append(marker)
            self._markers += 1
            self._ready.notify()

    def __len__(self) -> int:
        with self._ready:
            return len(self._control) + len(self._data)

    def take(self, *, most: int, linger_s: float, timeout_s: float) -> list[_Item]:
        """The next batch: wait up to ``timeout_s`` for a first item (else []), then up to
        ``linger_s`` for ``most`` items (no lingering once a marker waits)."""
        with self._ready:
            try:
                self._wanted = 1
                if not self._ready.wait_for(lambda: bool(self._control or self._data), timeout_s):
                    return []
                if linger_s > 0:
                    self._wanted = most
                    self._ready.wait_for(
                        lambda: self._markers > 0 or len(self._control) + len(self._data) >= most,
                        linger_s,
                    )
            finally:
                self._wanted = 0
            batch: list[_Item] = []
            while self._control and len(batch) < most:
                batch.append(self._control.popleft())
            while self._data and len(batch) < most:
                head = self._data[0]
                if isinstance(head, _Accepted):
                    batch.append(self._data.popleft())
                    continue
                if not batch:
                    self._markers -= 1
                    batch.append(self._data.popleft())
                break
            return batch


class Bridge:
    """Connects the broker to the database. Start once; safe to call from any thread."""

    def __init__(
        self,
        *,
        settings: CloudSettings,
        engine: Engine,
        metrics: ControllerMetrics,
        clock: Clock,
        client: MqttClient | None = None,
        signer: Signer | None = None,
    ) -> None:
        """``signer`` signs desired state; None: the key at ``desired_signing_key_path``
        (else ``signing_key_path``), generated when absent, loaded at ``start``."""
        self._settings = settings
        self._engine = engine
        self._metrics = metrics
        self._clock = clock
        self._topics = Topics(settings.topic_root)
        self._client = client if client is not None else MqttClient(settings.mqtt())
        self._desired_lock = threading.Lock()
        """Orders "commit generation, publish it" against itself and the republish hook,
        so the retained message is always the newest generation."""
        self.policy_lock = threading.Lock()
        """Held by ``policies.sync`` from reading the fleet to its last publish."""
        self._signer = signer
        self._signer_lock = threading.Lock()
        self.rejects = RejectCounter()
        self.gaps = GapTracker()
        self._inbound = {
            channel: _Inbound(
                model=model,
                max_bytes=settings.max_result_payload_bytes
                if channel is DeviceChannel.RESULTS
                else settings.max_payload_bytes,
                control=channel in _CONTROL,
                retained=channel.spec.retain,
            )
            for channel, model in _MODELS.items()
        }
        self._received = _ByChannel(metrics.ingest_received)
        """Counted on the network thread; ``_ingested`` on the worker."""
        self._ingested = _ByChannel(metrics.ingested)
        self._next_cleanup: datetime | None = None
        """Clock time of the next results cleanup; None: at the worker's start."""
        self._queues = _IngestQueues(
            control_max=settings.ingest_control_queue_max, data_max=settings.ingest_queue_max
        )
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0
        """Messages queued or being applied."""
        self._worker: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Load the signing key, subscribe and start connecting in the background (does not
        wait). Raises ``OSError``/``ValueError`` when the signing key cannot be read."""
        self.signer()
        self._worker = threading.Thread(target=self._drain, name="controller-ingest", daemon=True)
        self._worker.start()
        self._client.add_connect_hook(self._on_connect)
        for channel in _MODELS:
            self._client.subscribe(
                self._topics.all_devices(channel), self.handle, qos=channel.spec.qos
            )
        self._client.start()

    def stop(self, *, drain_timeout_s: float = 10.0) -> None:
        """Disconnect, then let the worker apply what is queued (up to ``drain_timeout_s``)."""
        self._client.stop()
        if self._worker is not None:
            self._queues.put_marker(_Stop())
            self._worker.join(timeout=drain_timeout_s)
            self._stopping.set()  # shortens a retry in progress
            self._worker.join(timeout=5)
            self._worker = None

    @property
    def pending(self) -> int:
        """Accepted messages not yet applied to the database."""
        with self._idle:
            return self._pending

    @property
    def queued(self) -> int:
        """Accepted messages waiting in the queues (``pending`` less those being applied)."""
        return len(self._queues)

    def wait_idle(self, timeout_s: float) -> bool:
        """True once every message received so far has been applied (for tests, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected

    @property
    def client(self) -> MqttClient:
        """The broker client, for other servers on the controller's one connection
        (the chunk server); subscribe before ``start`` to be subscribed on the first CONNACK."""
        return self._client

    def wait_connected(self, timeout_s: float) -> bool:
        return self._client.wait_connected(timeout_s)

    # -- inbound -----------------------------------------------------------------------

    def handle(self, message: InboundMessage) -> None:
        """Decode, check and apply one inbound message. Never raises."""
        channel_label = "unknown"
        try:
            try:
                parsed = self._topics.parse_device(message.topic)
            except InvalidTopic as exc:
                self._reject(channel_label, "invalid_topic", str(exc), message.topic)
                return
            channel_label = parsed.channel.value
            inbound = self._inbound.get(parsed.channel)
            if inbound is None:
                self._reject(channel_label, "unexpected_channel", "", message.topic)
                return
            if not message.payload and inbound.retained:
                # A zero-length retained message is how a retained message is deleted; live
                # subscribers get it too (with the retain flag off).
                self._metrics.ignored.labels(channel_label, "cleared").inc()
                return
            try:
                decoded = decode(message.payload, inbound.model, max_bytes=inbound.max_bytes)
            except DecodeError as exc:
                self._reject(channel_label, exc.reason, str(exc), message.topic)
                return
            if decoded.device_id != parsed.device_id:
                self._reject(
                    channel_label,
                    "device_mismatch",
                    f"payload device_id {decoded.device_id!r} on the topic of {parsed.device_id!r}",
                    message.topic,
                )
                return
            accepted = _Accepted(parsed.channel, decoded, message.topic, self._clock())
            control = inbound.control
            with self._idle:
                self._pending += 1
            if self._queues.put(accepted, control=control):
                self._received.inc(parsed.channel)
            else:
                self._done()
                bound = (
                    self._settings.ingest_control_queue_max
                    if control
                    else self._settings.ingest_queue_max
                )
                self._reject(
                    channel_label,
                    "queue_full",
                    f"{bound} {'control ' if control else ''}messages wait for the database",
                    message.topic,
                )
        except Exception as exc:  # the last line of defence: the bridge must keep working
            logger.exception("unexpected error handling %s", message.topic)
            self._reject(channel_label, "internal_error", repr(exc), message.topic)

    def request_cleanup(self) -> None:
        """Have the worker run the results cleanup after what is queued (``wait_idle``
        returns once it ran)."""
        with self._idle:
            self._pending += 1
        self._queues.put_marker(_Cleanup())

    def _drain(self) -> None:
        """The worker: apply queued messages in batches (control messages first) until the
        stop marker, and clean up results when the schedule says so."""
        settings = self._settings
        while True:
            batch = self._queues.take(
                most=settings.ingest_batch_max,
                linger_s=settings.ingest_batch_linger_s,
                timeout_s=_TICK_S,
            )
            if not batch:
                if self._cleanup_due():
                    with self._idle:
                        self._pending += 1
                    batch = [_Cleanup()]
                else:
                    continue
            head = batch[0]
            if isinstance(head, _Stop):
                return
            try:
                if isinstance(head, _Cleanup):
                    self._cleanup()
                else:
                    accepted = [item for item in batch if isinstance(item, _Accepted)]
                    self._apply_batch(accepted)
                    if self._cleanup_due():
                        self._cleanup()
            except Exception as exc:  # never let the worker die
                logger.exception("unexpected error applying messages")
                for item in batch:
                    if isinstance(item, _Accepted):
                        self._reject(item.channel.value, "internal_error", repr(exc), item.topic)
            finally:
                for _ in batch:
                    self._done()

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def _apply_batch(self, items: list[_Accepted]) -> None:
        """Apply ``items`` in one transaction, retrying while the database cannot be
        reached; when the batch fails for good, apply its messages one by one, so that one
        message the database refuses costs only itself."""
        if len(items) == 1:
            self._apply_one(items[0], retry_s=self._settings.ingest_retry_s)
            return
        self._metrics.ingest_batch_size.observe(len(items))
        done = self._attempt(items, retry_s=self._settings.ingest_retry_s)
        if isinstance(done, list):
            self._applied(items, done)
            return
        self._metrics.ingest_batch_fallbacks.inc()
        logger.warning(
            "a batch failed; applying its messages one by one",
            extra={"messages": len(items), "error": one_line(done)},
        )
        # After a temporary error the batch already used the retry budget: one try each.
        retry_s = 0.0 if _temporary(done) else self._settings.ingest_retry_s
        for item in items:
            self._apply_one(item, retry_s=retry_s)

    def _apply_one(self, item: _Accepted, *, retry_s: float) -> None:
        done = self._attempt([item], retry_s=retry_s)
        if isinstance(done, list):
            self._applied([item], done)
        else:
            # Results: not committed, so not acknowledged; the device sends the batch again.
            self._storage_failed(item.channel, item.message, item.topic, done)

    def _attempt(
        self, items: list[_Accepted], *, retry_s: float
    ) -> list[ingest.Applied] | SQLAlchemyError:
        """Apply and commit ``items`` in a fresh session, retrying for up to ``retry_s``
        while the database cannot be reached; the error when it failed for good."""
        messages: list[tuple[ingest.Inbound, datetime]] = [
            (item.message, item.received_at)  # type: ignore[misc]
            for item in items
        ]
        keep = self._settings.telemetry_history
        deadline = time.monotonic() + retry_s
        attempt = 0
        while True:
            try:
                with Session(self._engine, expire_on_commit=False) as session:
                    applied = ingest.apply_batch(
                        session,
                        messages,
                        keep=keep,
                        seed=lambda key: not self.gaps.knows(key),
                    )
                    session.commit()
                    return applied
            except SQLAlchemyError as exc:
                delay = min(2.0, 0.05 * 2**attempt)
                if (
                    _temporary(exc)
                    and not self._stopping.is_set()
                    and deadline - time.monotonic() > delay
                ):
                    if attempt == 0:
                        logger.warning(
                            "database refused %d message(s); retrying",
                            len(items),
                            extra={"topic": items[0].topic, "error": one_line(exc)},
                        )
                    attempt += 1
                    self._stopping.wait(delay)
                    continue
                return exc

    def _applied(self, items: list[_Accepted], applied: list[ingest.Applied]) -> None:
        """After the commit: count, acknowledge results, follow gaps, push policies."""
        hellos: list[str] = []
        for item, done in zip(items, applied, strict=True):
            channel, message = item.channel, item.message
            if done.stored is not None:
                assert isinstance(message, ResultBatch)
                self._results_stored(message, done.stored, done.before)
                continue
            if done.outcome is not ingest.Ingested.APPLIED:
                self._metrics.ignored.labels(channel.value, done.outcome.value).inc()
                logger.info(
                    "ignored inbound message",
                    extra={
                        "topic": item.topic,
                        "device_id": message.device_id,
                        "reason": done.outcome.value,
                    },
                )
                continue
            self._ingested.inc(channel)
            if done.coalesced:
                self._metrics.ingest_coalesced.labels(channel.value).inc()
            if channel is DeviceChannel.HELLO and message.device_id not in hellos:
                hellos.append(message.device_id)
        for device_id in hellos:
            self._sync_policy(device_id)

    # -- results -----------------------------------------------------------------------

    def _results_stored(
        self,
        batch: ResultBatch,
        stored: ingest.StoredResults,
        before: ingest.StoredSeqs | None,
    ) -> None:
        """A committed batch: acknowledge all its seqs, then look for gaps."""
        self._metrics.ingested.labels(DeviceChannel.RESULTS.value).inc()
        self._metrics.results_ingested.inc(stored.inserted)
        self._metrics.results_duplicates.inc(stored.duplicates)
        if stored.duplicates:
            logger.info(
                "skipped results stored before",
                extra={
                    "device_id": batch.device_id,
                    "boot_epoch": batch.boot_epoch,
                    "duplicates": stored.duplicates,
                },
            )
        self._acknowledge(batch, stored.seqs)
        change = self.gaps.observe(
            (batch.device_id, batch.boot_epoch),
            stored.seqs,
            contiguous=before.contiguous if before else 0,
            above=before.above if before else (),
        )
        self._metrics.result_gaps.set(self.gaps.missing)
        self._log_gap(change)

    def _acknowledge(self, batch: ResultBatch, seqs: tuple[int, ...]) -> None:
        """Publish the ``ResultAck`` (QoS 1; kept by paho and sent after a reconnect)."""
        message: BaseModel = ResultAck(
            device_id=batch.device_id, boot_epoch=batch.boot_epoch, seqs=list(seqs)
        )
        spec = DeviceChannel.ACKS.spec
        try:
            self._client.publish(
                self._topics.device(batch.device_id, DeviceChannel.ACKS),
                encode(message),
                qos=spec.qos,
                retain=spec.retain,
            )
        except MqttError as exc:
            self._metrics.result_acks_failed.inc()
            logger.warning(
                "result ack not sent; the device will resend",
                extra={"device_id": batch.device_id, "error": str(exc)},
            )
            return
        self._metrics.result_acks.inc()

    @staticmethod
    def _log_gap(change: GapChange) -> None:
        device_id, boot_epoch = change.key
        where = {"device_id": device_id, "boot_epoch": boot_epoch}
        if change.opened:
            logger.warning(
                "results missing",
                extra={
                    **where,
                    "first_missing_seq": change.contiguous + 1,
                    "missing": change.missing_after,
                },
            )
        elif change.closed:
            logger.info("result gap closed", extra={**where, "contiguous_seq": change.contiguous})

    def _cleanup_due(self) -> bool:
        return self._next_cleanup is None or self._clock() >= self._next_cleanup

    def _cleanup(self) -> None:
        """Delete results past the retention or beyond the row limit (worker thread)."""
        now = self._clock()
        self._next_cleanup = now + timedelta(seconds=self._settings.results_cleanup_interval_s)
        try:
            with Session(self._engine) as session:
                purged = retention.purge_results(
                    session,
                    received_before=now - timedelta(seconds=self._settings.results_retention_s),
                    max_rows=self._settings.results_max_rows,
                )
        except SQLAlchemyError as exc:
            logger.error("results cleanup failed: %s", one_line(exc))
            return
        self._metrics.results_deleted.labels("retention").inc(purged.expired)
        self._metrics.results_deleted.labels("max_rows").inc(purged.over_limit)
        self.gaps.forget_complete()
        self._metrics.result_gaps.set(self.gaps.missing)
        if purged.expired or purged.over_limit:
            logger.info(
                "deleted old results",
                extra={"expired": purged.expired, "over_limit": purged.over_limit},
            )

    def _sync_policy(self, device_id: str) -> None:
        """Push the device's effective policy if its Hello changed it (worker thread)."""
        try:
            policies.sync(self, self._engine, device_ids=[device_id])
        except SQLAlchemyError as exc:
            logger.error(
                "effective policy not pushed after hello",
                extra={"device_id": device_id, "error": one_line(exc)},
            )

    def _storage_failed(
        self, channel: DeviceChannel, message: Envelope, topic: str, exc: SQLAlchemyError
    ) -> None:
        logger.error(
            "could not store message",
            extra={"topic": topic, "device_id": message.device_id, "error": one_line(exc)},
        )
        self._reject(channel.value, "storage_error", one_line(exc), topic)

    def _reject(self, channel: str, reason: str, detail: str, topic: str) -> None:
        self.rejects.reject(channel, reason, detail, topic=topic)
        self._metrics.rejected.labels(channel, reason).inc()

    # -- desired state -----------------------------------------------------------------

    def set_desired(self, device_id: str, policy: dict[str, Any]) -> int:
        """Store ``policy`` as the device's next generation, publish it; return the generation.

        Raises ``DeviceNotFound``, ``DatabaseError``-class SQLAlchemy errors, or
        ``DesiredNotPublished`` when the broker client refused the message (it is stored,
        and republished on the next connect).
        """
        return self.amend_desired(device_id, lambda current: policy)

    def amend_desired(
        self, device_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> int:
        """Like ``set_desired`` with ``change(current policy)``: read, change and commit
        under one lock, so a concurrent update of another key is never lost."""
        with self._desired_lock:
            with Session(self._engine, expire_on_commit=False) as session:
                row = desired.amend(session, device_id, change, now=self._clock())
            try:
                self._publish_desired(row)
            except MqttError as exc:
                raise DesiredNotPublished(device_id, row.generation, str(exc)) from exc
        logger.info(
            "desired state set", extra={"device_id": device_id, "generation": row.generation}
        )
        return row.generation

    def amend_desired_many(
        self, device_ids: list[str], change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, int | ControllerError]:
        """``amend_desired`` for many devices, committed in one transaction, then published
        one by one: per device its new generation, ``DeviceNotFound`` or (stored but not
        handed to the broker client) ``DesiredNotPublished``."""
        out: dict[str, int | ControllerError] = {}
        with self._desired_lock:
            with Session(self._engine, expire_on_commit=False) as session:
                rows, missing = desired.amend_many(session, device_ids, change, now=self._clock())
            for device_id in missing:
                out[device_id] = DeviceNotFound(device_id)
            for row in rows:
                try:
                    self._publish_desired(row)
                    out[row.device_id] = row.generation
                except MqttError as exc:
                    out[row.device_id] = DesiredNotPublished(
                        row.device_id, row.generation, str(exc)
                    )
        logger.info("desired state set", extra={"devices": len(rows)})
        return out

    def signer(self) -> Signer:
        """The key desired state is signed with (loaded, or generated, on first use)."""
        with self._signer_lock:
            if self._signer is None:
                settings = self._settings
                path = settings.desired_signing_key_path or settings.signing_key_path
                self._signer = load_or_create_signing_key(path)
            return self._signer

    def _publish_desired(self, row: DeviceDesired) -> None:
        """Sign, then hand the retained QoS 1 message to paho; never waits (hooks call this)."""
        message: BaseModel = sign_desired(
            DesiredState(device_id=row.device_id, generation=row.generation, policy=row.policy),
            self.signer(),
        )
        spec = DeviceChannel.DESIRED.spec
        self._client.publish(
            self._topics.device(row.device_id, DeviceChannel.DESIRED),
            encode(message),
            qos=spec.qos,
            retain=spec.retain,
        )
        self._metrics.desired_published.inc()

    def _on_connect(self, session_present: bool) -> None:
        """Connect hook (network thread): count, then republish every desired state."""
        self._metrics.connects.inc()
        if self._client.connects > 1:
            self._metrics.reconnects.inc()
        try:
            with self._desired_lock:
                with Session(self._engine, expire_on_commit=False) as session:
                    rows = desired.current_all(session)
                for row in rows:
                    self._publish_desired(row)
        except (SQLAlchemyError, MqttError) as exc:
            logger.error("republishing desired state failed: %s", one_line(exc))
            return
        logger.info("republished desired state", extra={"devices": len(rows)})


def _temporary(exc: SQLAlchemyError) -> bool:
    """Connection trouble, worth waiting out; anything else will not improve by waiting."""
    return isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    )
