"""The chunk server: devices pull artifacts over MQTT, one checked chunk at a time.

It subscribes to ``Topics.model_chunks_shared()`` (several controllers share the load) on
the bridge's broker client. paho's network thread only decodes a ``ChunkRequest`` and
hands it to a small pool of worker threads; a worker looks the digest up in the
registry (artifacts and tokenizers of *ready* versions only: a deprecated one is
answered ``not_found`` with the reason), reads exactly ``[offset, offset + length)`` from
the store with one seek (never the whole file), and answers a framed ``ChunkResponse``
(``protocol.transfer.encode_chunk``: header with the chunk's sha256, then raw bytes) on the
request's response topic with its correlation data. The worker waits for the PUBACK
before taking the next request, so at most ``transfer_workers`` chunks are in flight
whatever the number of devices (raise ``transfer_workers`` for more chunks in flight: the
threads mostly wait on the broker).

A rollout sends the same chunks to many devices, so the last chunks read are kept with
their sha256 (``ChunkCache``, at most ``transfer_chunk_cache_bytes``): the next device
that asks for the same ``(sha256, offset, length)`` costs neither a read nor a hash.
The registry is still asked on every request, so deprecating a version takes effect at
once.

At most ``max_concurrent_transfers`` devices transfer at once. A device counts as
transferring from its first served chunk until it has fetched a blob's last chunk or
``transfer_active_window_s`` passed without a request from it; a device beyond the bound
is answered ``busy`` with ``retry_after_ms``, as is every request while the workers'
queue is full. A device resumes by asking for the offset after its last verified chunk;
the server keeps no per-transfer state besides that activity mark.

Answers go only to response topics under ``{root}/replies/``. Knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cloud_controller import artifacts, registry
from cloud_controller.artifacts import ArtifactStore
from cloud_controller.database import one_line
from cloud_controller.metrics import ControllerMetrics
from cloud_controller.settings import CloudSettings
from protocol.codec import DecodeError, decode
from protocol.mqtt import BrokerClient, InboundMessage, MqttError
from protocol.topics import QoS, Topics
from protocol.transfer import ChunkRequest, ChunkResponse, ChunkStatus, encode_chunk

logger = logging.getLogger(__name__)

_REQUEST_MAX_BYTES = 4096


_ChunkKey = tuple[str, int, int, int]
"""(artifact sha256, total bytes, offset, length)."""


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
        self._active: dict[str, float] = {}
        """device id -> monotonic time of its last admitted request."""
        self._queued = 0
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
                request = decode(message.payload, ChunkRequest, max_bytes=_REQUEST_MAX_BYTES)
            except DecodeError as exc:
                self._refuse("invalid", f"undecodable chunk request: {exc}", message.topic)
                return
            reply_to = message.response_topic
            if not reply_to or not reply_to.startswith(self._replies_prefix):
                self._refuse(
                    "invalid",
                    f"chunk request from {request.device_id} without a response topic under "
                    f"{self._replies_prefix}",
                    message.topic,
                )
                return
            with self._lock:
                full = self._queued >= self._settings.transfer_queue_max
                if not full:
                    self._queued += 1
            pool = self._pool
            if full or pool is None:
                self._busy(request, reply_to, message.correlation_data, wait=False)
                return
            pool.submit(self._serve, request, reply_to, message.correlation_data)
        except Exception:
            logger.exception("unexpected error handling a chunk request")

    # -- workers --------------------------------------------------------------------------

    def _serve(self, request: ChunkRequest, reply_to: str, correlation: bytes | None) -> None:
        try:
            self._answer(request, reply_to, correlation)
        except Exception:
            logger.exception("unexpected error serving a chunk")
        finally:
            with self._lock:
                self._queued -= 1

    def _answer(self, request: ChunkRequest, reply_to: str, correlation: bytes | None) -> None:
        sha256 = request.artifact_sha256
        try:
            with Session(self._engine) as session:
                found = registry.servable(session, sha256)
                why = None if found is not None else registry.why_not_servable(session, sha256)
        except SQLAlchemyError as exc:
            logger.warning("chunk lookup failed: %s", one_line(exc))
            self._busy(request, reply_to, correlation, wait=True)
            return
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
            self._header_only(request, ChunkStatus.NOT_FOUND, 0, reply_to, correlation, detail)
            return
        assert path is not None
        if request.length > self._settings.transfer_max_chunk_bytes:
            detail = (
                f"length {request.length} exceeds the largest chunk "
                f"({self._settings.transfer_max_chunk_bytes} bytes)"
            )
            self._header_only(request, ChunkStatus.BAD_RANGE, total, reply_to, correlation, detail)
            return
        if request.offset >= total:
            detail = f"offset {request.offset} is at or past the end ({total} bytes)"
            self._header_only(request, ChunkStatus.BAD_RANGE, total, reply_to, correlation, detail)
            return
        if not self._admit(request.device_id):
            self._busy(request, reply_to, correlation, wait=True)
            return
        length = min(request.length, total - request.offset)
        key = (sha256, total, request.offset, length)
        cached = self.cache.get(key)
        if cached is None:
            data = artifacts.read_range(path, request.offset, length)
            if len(data) != length:
                detail = f"store returned {len(data)} of {length} bytes"
                self._header_only(
                    request, ChunkStatus.NOT_FOUND, total, reply_to, correlation, detail
                )
                return
            digest = hashlib.sha256(data).hexdigest()
            self.cache.put(key, data, digest)
        else:
            data, digest = cached
        header = ChunkResponse(
            device_id=request.device_id,
            artifact_sha256=sha256,
            status=ChunkStatus.OK,
            offset=request.offset,
            length=length,
            total_bytes=total,
            chunk_sha256=digest,
        )
        if request.offset + length >= total:
            # Before the answer leaves: the device may ask for its next blob at once.
            self._release(request.device_id)
        if self._publish(reply_to, encode_chunk(header, data), correlation, wait=True):
            self._metrics.transfer_chunks.inc()
            self._metrics.transfer_bytes.inc(length)

    def _admit(self, device_id: str) -> bool:
        now = self._monotonic()
        with self._lock:
            self._expire(now)
            if device_id not in self._active and (
                len(self._active) >= self._settings.max_concurrent_transfers
            ):
                return False
            self._active[device_id] = now
            return True

    def _release(self, device_id: str) -> None:
        with self._lock:
            self._active.pop(device_id, None)

    def _expire(self, now: float) -> None:
        window = self._settings.transfer_active_window_s
        for device_id in [d for d, last in self._active.items() if now - last > window]:
            del self._active[device_id]

    # -- answers --------------------------------------------------------------------------

    def _busy(
        self, request: ChunkRequest, reply_to: str, correlation: bytes | None, *, wait: bool
    ) -> None:
        self._metrics.transfer_busy.inc()
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
        self._publish(reply_to, encode_chunk(header, b""), correlation, wait=wait)

    def _header_only(
        self,
        request: ChunkRequest,
        status: ChunkStatus,
        total: int,
        reply_to: str,
        correlation: bytes | None,
        detail: str,
    ) -> None:
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
        self._publish(reply_to, encode_chunk(header, b""), correlation, wait=True)

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


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
