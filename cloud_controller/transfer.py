"""The chunk server: devices pull artifacts over MQTT, one checked chunk at a time.

It subscribes to ``Topics.model_chunks_shared()`` (several controllers share the load) on
the bridge's broker client. paho's network thread only decodes a ``ChunkRequest`` and
hands it to a small pool of worker threads; a worker looks the digest up in the
registry (artifacts and tokenizers of *ready* versions only: a deprecated one is
answered ``not_found`` with the reason), reads exactly ``[offset, offset + length)`` from
the store with one seek (never the whole file), and answers a framed ``ChunkResponse``
(``protocol.transfer.encode_chunk``: header with the chunk's sha256, then raw bytes) on the
request's response topic with its correlation data. The worker waits for the PUBACK
before taking the next job, so at most ``transfer_workers`` chunks are in flight
whatever the number of devices (raise ``transfer_workers`` for more chunks in flight: the
threads mostly wait on the broker).

**Broadcast.** Agents name the artifact's own topic (``Topics.artifact_chunks``) as
response topic and listen on it while they download, so the broker, not the controller,
copies a chunk to every device. Requests for the same ``(sha256, offset, length)`` are
coalesced into one publish: while a job for it is queued, later requests join the job;
once it is being published, a later first-attempt request joins that publish if its
``listener`` (the id of the agent's subscription) was first seen *before* the publish
began, which proves the subscription was in place when the broker took the publish. An
agent announces its listener right after subscribing (``TransferListening``), so a device
joining a download that others lead can join publishes from that moment on. A
retry (``attempt`` > 1), an unknown listener or an older publish gets a new publish.
Errors (``busy``, ``not_found``, ``bad_range``) go to each request on its own, carrying its
correlation data. Requests with a response topic under ``{root}/replies/`` are answered
there, one publish each, as before.

A rollout sends the same chunks to many devices, so the last chunks read are kept with
their sha256 (``ChunkCache``, at most ``transfer_chunk_cache_bytes``): the next device
that asks for the same ``(sha256, offset, length)`` costs neither a read nor a hash.
The registry is still asked on every request, so deprecating a version takes effect at
once.

At most ``max_concurrent_transfers`` devices transfer at once. A device counts as
transferring from its first served chunk until it says ``TransferDone``, fetched a
blob's last chunk on its own reply topic, or ``transfer_active_window_s`` passed without
a request from it nor (for a listener) a publish of its artifact; a device beyond the
bound is answered ``busy`` with ``retry_after_ms`` (an agent then stops listening until it
asks again), as is every request while the workers' queue is full. A device resumes by
asking for the offset after its last verified chunk; the server keeps no per-transfer
state besides activity marks and, for coalescing, when each chunk and listener was last
seen (forgotten after ``transfer_active_window_s``).

Answers go only to response topics under ``{root}/replies/`` or to the request's own
artifact topic. Knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cloud_controller import artifacts, registry
from cloud_controller.artifacts import ArtifactStore
from cloud_controller.database import one_line
from cloud_controller.metrics import ControllerMetrics
from cloud_controller.settings import CloudSettings
from protocol.codec import DecodeError
from protocol.mqtt import BrokerClient, InboundMessage, MqttError
from protocol.topics import QoS, Topics
from protocol.transfer import (
    ChunkRequest,
    ChunkResponse,
    ChunkStatus,
    TransferDone,
    TransferListening,
    decode_transfer_message,
    encode_chunk,
)

logger = logging.getLogger(__name__)

_REQUEST_MAX_BYTES = 4096


_ChunkKey = tuple[str, int, int, int]
"""(artifact sha256, total bytes, offset, length)."""

_AskKey = tuple[str, int, int]
"""(artifact sha256, offset, length asked for): requests with equal keys get equal answers."""


@dataclass
class _Waiter:
    request: ChunkRequest
    correlation: bytes | None


@dataclass
class _Job:
    """One answer to publish on ``topic``, for every request in ``waiters``."""

    topic: str
    key: _AskKey | None
    """Set for a broadcast job (it may gather more waiters while it is queued)."""
    waiters: list[_Waiter] = field(default_factory=list)


@dataclass
class _Activity:
    last_s: float
    """Monotonic time of the device's last admitted request."""
    listening: str | None
    """The artifact whose broadcast the device listens to; None: per-device answers."""


class ChunkCache:
    """The last chunks read, with their sha256; least recently used dropped first.

    Thread-safe. ``max_bytes`` 0 keeps nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._chunks: OrderedDict[_ChunkKey, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: _ChunkKey) -> tuple[bytes, str] | None:
        with self._lock:
            found = self._chunks.get(key)
            if found is None:
                self.misses += 1
                return None
            self._chunks.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: _ChunkKey, data: bytes, digest: str) -> None:
        if len(data) > self._max_bytes:
            return
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._chunks[key] = (data, digest)
            self._bytes += len(data)
            while self._bytes > self._max_bytes:
                _, (dropped, _) = self._chunks.popitem(last=False)
                self._bytes -= len(dropped)


class ChunkServer:
    """Serves ``ChunkRequest``s; ``start`` subscribes, ``stop`` drains the workers."""

    def __init__(
        self,
        *,
        settings: CloudSettings,
        engine: Engine,
        store: ArtifactStore,
        client: BrokerClient,
        metrics: ControllerMetrics,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._store = store
        self._client = client
        self._metrics = metrics
        self._monotonic = monotonic
        self._topics = Topics(settings.topic_root)
        self._replies_prefix = f"{settings.topic_root}/replies/"
        self._lock = threading.Lock()
        self._active: dict[str, _Activity] = {}
        self._queued = 0
        self._jobs: dict[_AskKey, _Job] = {}
        """Broadcast jobs queued and not yet taken by a worker."""
        self._published: OrderedDict[_AskKey, float] = OrderedDict()
        """When the last broadcast publish of each chunk began (oldest first)."""
        self._listeners: dict[str, tuple[float, float]] = {}
        """listener id -> (first seen, last seen), monotonic."""
        self._sha_published: dict[str, float] = {}
        """artifact sha256 -> when a chunk of it was last broadcast."""
        self._pool: ThreadPoolExecutor | None = None
        self.cache = ChunkCache(settings.transfer_chunk_cache_bytes)

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=self._settings.transfer_workers, thread_name_prefix="chunk-server"
        )
        self._client.subscribe(
            self._topics.model_chunks_shared(), self.handle, qos=QoS.AT_LEAST_ONCE
        )

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    @property
    def active(self) -> int:
        """Devices that count as transferring now."""
        with self._lock:
            self._expire(self._monotonic())
            return len(self._active)

    # -- network thread -------------------------------------------------------------------

    def handle(self, message: InboundMessage) -> None:
        """Decode and queue one request (paho's thread: no I/O here). Never raises."""
        try:
            try:
                decoded = decode_transfer_message(message.payload, max_bytes=_REQUEST_MAX_BYTES)
            except DecodeError as exc:
                self._refuse("invalid", f"undecodable chunk request: {exc}", message.topic)
                return
            if isinstance(decoded, TransferDone):
                self._done(decoded)
                return
            if isinstance(decoded, TransferListening):
                self._listening(decoded)
                return
            request = decoded
            reply_to = message.response_topic
            broadcast = reply_to == self._topics.artifact_chunks(request.artifact_sha256)
            if not reply_to or not (broadcast or reply_to.startswith(self._replies_prefix)):
                self._refuse(
                    "invalid",
                    f"chunk request from {request.device_id} without a response topic under "
                    f"{self._replies_prefix} or its artifact's topic",
                    message.topic,
                )
                return
            waiter = _Waiter(request, message.correlation_data)
            job = self._enqueue(waiter, reply_to, broadcast)
            if job is None:
                return  # coalesced
            pool = self._pool
            if job is _FULL or pool is None:
                if pool is None and job is not _FULL:
                    self._unqueue(job)
                self._busy(waiter, reply_to, wait=False)
                return
            pool.submit(self._serve, job)
        except Exception:
            logger.exception("unexpected error handling a chunk request")

    def _enqueue(self, waiter: _Waiter, reply_to: str, broadcast: bool) -> _Job | None:
        """A new job to submit, ``_FULL``, or None when a job or publish already answers it."""
        request = waiter.request
        now = self._monotonic()
        with self._lock:
            key: _AskKey | None = None
            if broadcast:
                key = (request.artifact_sha256, request.offset, request.length)
                since = None
                if request.listener is not None:
                    first, _ = self._listeners.get(request.listener, (now, now))
                    self._listeners[request.listener] = (first, now)
                    since = first
                queued = self._jobs.get(key)
                if queued is not None:
                    queued.waiters.append(waiter)
                    self._metrics.transfer_coalesced.inc()
                    return None
                began = self._published.get(key)
                activity = self._active.get(request.device_id)
                if (
                    request.attempt == 1
                    and since is not None
                    and began is not None
                    and began >= since
                    and activity is not None
                ):
                    activity.last_s = now
                    self._metrics.transfer_coalesced.inc()
                    return None
            if self._queued >= self._settings.transfer_queue_max:
                return _FULL
            self._queued += 1
            job = _Job(topic=reply_to, key=key, waiters=[waiter])
            if key is not None:
                self._jobs[key] = job
            return job

    def _unqueue(self, job: _Job) -> None:
        with self._lock:
            self._queued -= 1
            if job.key is not None and self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def _listening(self, told: TransferListening) -> None:
        """The device's subscription is in place now: publishes from now on reach it. It
        takes a transfer slot if one is free (else its first request is answered busy)."""
        now = self._monotonic()
        with self._lock:
            self._listeners[told.listener] = (now, now)
            self._expire(now)
            activity = self._active.get(told.device_id)
            if activity is None and len(self._active) < self._settings.max_concurrent_transfers:
                self._active[told.device_id] = _Activity(now, told.artifact_sha256)
            elif activity is not None:
                activity.last_s = now
                activity.listening = told.artifact_sha256

    def _done(self, done: TransferDone) -> None:
        with self._lock:
            activity = self._active.get(done.device_id)
            if activity is not None and activity.listening == done.artifact_sha256:
                del self._active[done.device_id]

    # -- workers --------------------------------------------------------------------------

    def _serve(self, job: _Job) -> None:
        began: float | None = None
        try:
            with self._lock:
                if job.key is not None and self._jobs.get(job.key) is job:
                    del self._jobs[job.key]  # from now on, later requests need a new job...
                    began = self._monotonic()
                    self._published[job.key] = began  # ...unless they were listening already
                    self._published.move_to_end(job.key)
            if not self._answer(job) and job.key is not None:
                with self._lock:
                    if self._published.get(job.key) == began:
                        del self._published[job.key]
        except Exception:
            logger.exception("unexpected error serving a chunk")
        finally:
            with self._lock:
                self._queued -= 1

    def _answer(self, job: _Job) -> bool:
        """Publish the job's answer; True when its chunk went out."""
        first = job.waiters[0].request
        sha256 = first.artifact_sha256
        try:
            with Session(self._engine) as session:
                found = registry.servable(session, sha256)
                why = None if found is not None else registry.why_not_servable(session, sha256)
        except SQLAlchemyError as exc:
            logger.warning("chunk lookup failed: %s", one_line(exc))
            for waiter in job.waiters:
                self._busy(waiter, job.topic, wait=True)
            return False
        path = None
        if found is not None:
            path = (
                self._store.root / found.relative_path
                if found.relative_path is not None
                else self._store.path_for(sha256)
            )
        total = _size(path) if path is not None else None
        if total is None or why is not None:
            detail = why or f"artifact {sha256[:12]}… is registered but missing from the store"
            self._header_only(job, ChunkStatus.NOT_FOUND, 0, detail)
            return False
        assert path is not None
        if first.length > self._settings.transfer_max_chunk_bytes:
            detail = (
                f"length {first.length} exceeds the largest chunk "
                f"({self._settings.transfer_max_chunk_bytes} bytes)"
            )
            self._header_only(job, ChunkStatus.BAD_RANGE, total, detail)
            return False
        if first.offset >= total:
            detail = f"offset {first.offset} is at or past the end ({total} bytes)"
            self._header_only(job, ChunkStatus.BAD_RANGE, total, detail)
            return False
        with self._lock:
            waiters = list(job.waiters)  # no more join once taken
        admitted: list[_Waiter] = []
        for waiter in waiters:
            if self._admit(waiter.request.device_id, sha256 if job.key is not None else None):
                admitted.append(waiter)
            else:
                self._busy(waiter, job.topic, wait=False)
        if not admitted:
            return False
        length = min(first.length, total - first.offset)
        key = (sha256, total, first.offset, length)
        cached = self.cache.get(key)
        if cached is None:
            data = artifacts.read_range(path, first.offset, length)
            if len(data) != length:
                detail = f"store returned {len(data)} of {length} bytes"
                self._header_only(job, ChunkStatus.NOT_FOUND, total, detail)
                return False
            digest = hashlib.sha256(data).hexdigest()
            self.cache.put(key, data, digest)
        else:
            data, digest = cached
        lead = admitted[0]
        header = ChunkResponse(
            device_id=lead.request.device_id,
            artifact_sha256=sha256,
            status=ChunkStatus.OK,
            offset=first.offset,
            length=length,
            total_bytes=total,
            chunk_sha256=digest,
        )
        if job.key is None and first.offset + length >= total:
            # Before the answer leaves: the device may ask for its next blob at once.
            self._release(lead.request.device_id)
        if job.key is not None:
            with self._lock:
                self._sha_published[sha256] = self._monotonic()
        if not self._publish(job.topic, encode_chunk(header, data), lead.correlation, wait=True):
            return False
        self._metrics.transfer_chunks.inc()
        self._metrics.transfer_bytes.inc(length)
        return True

    def _admit(self, device_id: str, listening: str | None) -> bool:
        now = self._monotonic()
        with self._lock:
            self._expire(now)
            activity = self._active.get(device_id)
            if activity is None:
                if len(self._active) >= self._settings.max_concurrent_transfers:
                    return False
                self._active[device_id] = _Activity(now, listening)
            else:
                activity.last_s = now
                activity.listening = listening
            return True

    def _release(self, device_id: str) -> None:
        with self._lock:
            self._active.pop(device_id, None)

    def _expire(self, now: float) -> None:
        """Forget idle devices, listeners and publish times (lock held)."""
        window = self._settings.transfer_active_window_s
        for device_id, activity in list(self._active.items()):
            last = activity.last_s
            if activity.listening is not None:
                last = max(last, self._sha_published.get(activity.listening, last))
            if now - last > window:
                del self._active[device_id]
        for listener in [k for k, (_, seen) in self._listeners.items() if now - seen > window]:
            del self._listeners[listener]
        for sha in [k for k, t in self._sha_published.items() if now - t > window]:
            del self._sha_published[sha]
        while self._published:
            key, began = next(iter(self._published.items()))
            if now - began <= window:
                break
            del self._published[key]

    # -- answers --------------------------------------------------------------------------

    def _busy(self, waiter: _Waiter, reply_to: str, *, wait: bool) -> None:
        self._metrics.transfer_busy.inc()
        request = waiter.request
        header = ChunkResponse(
            device_id=request.device_id,
            artifact_sha256=request.artifact_sha256,
            status=ChunkStatus.BUSY,
            offset=request.offset,
            length=0,
            total_bytes=0,
            retry_after_ms=self._settings.transfer_retry_after_ms,
            detail=f"{self._settings.max_concurrent_transfers} devices are transferring",
        )
        self._publish(reply_to, encode_chunk(header, b""), waiter.correlation, wait=wait)

    def _header_only(self, job: _Job, status: ChunkStatus, total: int, detail: str) -> None:
        """Answer each request of ``job`` with ``status`` and no bytes."""
        for waiter in job.waiters:
            request = waiter.request
            self._metrics.transfer_refused.labels(status.value).inc()
            logger.info(
                "chunk request refused",
                extra={"device_id": request.device_id, "status": status.value, "detail": detail},
            )
            header = ChunkResponse(
                device_id=request.device_id,
                artifact_sha256=request.artifact_sha256,
                status=status,
                offset=request.offset,
                length=0,
                total_bytes=total,
                detail=detail[:500],
            )
            self._publish(job.topic, encode_chunk(header, b""), waiter.correlation, wait=True)

    def _publish(self, topic: str, frame: bytes, correlation: bytes | None, *, wait: bool) -> bool:
        try:
            self._client.publish(
                topic,
                frame,
                qos=QoS.AT_LEAST_ONCE,
                correlation_data=correlation,
                wait_s=self._settings.transfer_publish_timeout_s if wait else None,
            )
        except MqttError as exc:
            self._metrics.transfer_publish_failed.inc()
            logger.warning("chunk answer not sent: %s", exc, extra={"topic": topic})
            return False
        return True

    def _refuse(self, status: str, detail: str, topic: str) -> None:
        self._metrics.transfer_refused.labels(status).inc()
        logger.warning("chunk request refused: %s", detail, extra={"topic": topic})


_FULL = _Job(topic="", key=None)
"""``_enqueue``'s answer when the workers' queue is full."""


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
