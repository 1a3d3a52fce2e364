"""Resumable artifact download over MQTT: pull checked chunks, keep a verified offset.

``ChunkPuller.fetch(sha256, size_bytes)`` asks the chunk server (``Topics.model_chunks()``)
for ``chunk_bytes`` at a time with MQTT v5 request/response: response topic
``<replies/device_id>/chunks`` and a fresh correlation id per request, a small window of
requests in flight. Every answer is unframed and checked by ``protocol.transfer.decode_chunk``
(its own sha256), written at its offset into ``<staging>/<sha256>/partial``; the *verified
offset* advances only over contiguous checked chunks, and each advance is made durable -
the partial file is fsync'ed, then ``progress.json`` is replaced atomically (``state.write_atomic``)
- so after a kill, a power cut, a broker restart or a lost link the next ``fetch`` asks for
the byte after the last verified one, never for offset 0 again. A download is finished
when the whole file's sha256 and size equal what was asked for; the file then moves to
``<staging>/<sha256>/blob``.

Answers: ``busy`` -> ask that chunk again after ``retry_after_ms``; ``not_found`` /
``bad_range`` -> permanent; no answer within ``timeout_s`` -> ask again (attempts are
counted only while connected, so a broker outage does not use them up). The reply
handler runs on paho's network thread and only queues the frame; checking, hashing and
writing happen on the caller's thread (the reconcile worker). Knows no model, no manifest::

    DownloadError                  the blob was not fetched; the verified prefix is kept
    ├── PermanentDownloadError     the same request cannot succeed
    │   ├── ArtifactUnavailable    the server answered not_found / bad_range
    │   └── ArtifactMismatch       size or whole-file sha256 differ from what was asked
    └── TemporaryDownloadError     may succeed later; resumes from the verified offset
        ├── TransferTimeout        a chunk got no answer after every attempt
        ├── StagingError           the staging directory cannot be written
        └── DownloadCancelled      the agent is stopping
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.clock import Clock
from edge_agent.state import StateError, write_atomic
from protocol.codec import DecodeError, encode
from protocol.mqtt import BrokerClient, InboundMessage, MqttError
from protocol.topics import QoS, Topics
from protocol.transfer import ChunkRequest, ChunkResponse, ChunkStatus, decode_chunk

logger = logging.getLogger(__name__)

PARTIAL_FILE = "partial"
PROGRESS_FILE = "progress.json"
BLOB_FILE = "blob"
_HEADER_ALLOWANCE = 20 * 1024
"""Frame bytes beyond the chunk itself: length prefix + JSON header."""
_POLL_S = 0.2
"""Longest wait between checks of the cancel flag."""

Progress = Callable[[int, int], None]
"""``progress(verified_bytes, total_bytes)``; called on the fetching thread."""


class DownloadError(Exception):
    """The blob was not fetched; what was verified so far stays staged."""

    reason = "download_failed"


class PermanentDownloadError(DownloadError):
    """Asking again for the same blob cannot succeed."""


class ArtifactUnavailable(PermanentDownloadError):
    """The chunk server does not serve this digest (``not_found``) or this range."""

    reason = "not_found"


class ArtifactMismatch(PermanentDownloadError):
    """The served blob's size or whole-file sha256 is not the one asked for."""

    reason = "digest_mismatch"


class TemporaryDownloadError(DownloadError):
    """May succeed later; the next fetch resumes from the verified offset."""


class TransferTimeout(TemporaryDownloadError):
    reason = "transfer_timeout"


class StagingError(TemporaryDownloadError):
    reason = "staging_error"


class DownloadCancelled(TemporaryDownloadError):
    reason = "cancelled"


@dataclass(frozen=True)
class PullSettings:
    """How a ``ChunkPuller`` asks (see ``EdgeSettings.model_chunk_*``)."""

    chunk_bytes: int
    window: int = 4
    timeout_s: float = 10.0
    attempts: int = 8


@dataclass
class _Pending:
    offset: int
    length: int
    correlation: bytes
    sent_at: float
    attempts: int = 1


class ChunkPuller:
    """Fetches blobs by digest into ``staging_root``; one ``fetch`` at a time."""

    def __init__(
        self,
        *,
        client: BrokerClient,
        device_id: str,
        topics: Topics,
        staging_root: Path,
        settings: PullSettings,
        clock: Clock,
        connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self._client = client
        self._device_id = device_id
        self._topics = topics
        self._reply_topic = topics.chunk_replies(device_id)
        self.staging_root = staging_root
        self._settings = settings
        self._clock = clock
        self._connected = connected
        self._max_frame = settings.chunk_bytes + _HEADER_ALLOWANCE
        self._answers: queue.Queue[InboundMessage] = queue.Queue()
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self.requests_sent = 0
        self.chunks_verified = 0
        self.chunks_rejected = 0
        self.busy_answers = 0
        self.retries = 0

    def attach(self) -> None:
        """Subscribe to the chunk reply topic (again after every CONNACK)."""
        self._client.subscribe(self._reply_topic, self._on_answer, qos=QoS.AT_LEAST_ONCE)

    def _on_answer(self, message: InboundMessage) -> None:
        """Network thread: queue only; the fetching thread checks and writes."""
        self._answers.put(message)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "chunk_requests": self.requests_sent,
                "chunks_verified": self.chunks_verified,
                "chunks_rejected": self.chunks_rejected,
                "chunk_busy": self.busy_answers,
                "chunk_retries": self.retries,
            }

    # -- staging ------------------------------------------------------------------------

    def staging_dir(self, sha256: str) -> Path:
        return self.staging_root / sha256

    def verified_offset(self, sha256: str) -> int:
        """Bytes of ``sha256`` verified and durable so far (0 when nothing is staged)."""
        return self._load_progress(self.staging_dir(sha256), sha256)[0]

    def discard(self, sha256: str) -> None:
        shutil.rmtree(self.staging_dir(sha256), ignore_errors=True)

    # -- fetching -------------------------------------------------------------------------

    def fetch(
        self,
        sha256: str,
        size_bytes: int | None,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Path:
        """The path of the verified blob; ``size_bytes`` None: learnt from the server."""
        with self._fetch_lock:
            return self._fetch(sha256, size_bytes, progress, cancel or threading.Event())

    def _fetch(
        self,
        sha256: str,
        size_bytes: int | None,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> Path:
        folder = self.staging_dir(sha256)
        blob = folder / BLOB_FILE
        if blob.is_file() and (size_bytes is None or blob.stat().st_size == size_bytes):
            return blob
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StagingError(f"cannot create {folder}: {exc.strerror or exc}") from exc
        verified, known_size = self._load_progress(folder, sha256)
        if size_bytes is None:
            size_bytes = known_size
        elif known_size is not None and known_size != size_bytes:
            verified = 0  # staged for another size: start over
        partial = folder / PARTIAL_FILE
        fd = self._open_partial(partial, verified)
        try:
            if verified:
                logger.info(
                    "download resumes",
                    extra={"sha256": sha256, "offset": verified, "size_bytes": size_bytes},
                )
            size_bytes = self._pull(fd, folder, sha256, verified, size_bytes, progress, cancel)
        except PermanentDownloadError:
            os.close(fd)
            fd = -1
            self.discard(sha256)  # nothing staged for this digest can be trusted to resume
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        self._check_whole(partial, sha256, size_bytes)
        try:
            os.replace(partial, blob)
        except OSError as exc:
            raise StagingError(f"cannot finish {blob}: {exc.strerror or exc}") from exc
        return blob

    def _open_partial(self, partial: Path, verified: int) -> int:
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(fd, verified)  # bytes past the verified offset were never recorded
        except OSError as exc:
            raise StagingError(f"cannot open {partial}: {exc.strerror or exc}") from exc
        return fd

    def _pull(
        self,
        fd: int,
        folder: Path,
        sha256: str,
        verified: int,
        size: int | None,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> int:
        settings = self._settings
        pending: dict[bytes, _Pending] = {}
        delayed: list[tuple[float, int, int]] = []  # (send at, offset, attempts): busy answers
        done: dict[int, int] = {}  # offset -> length, verified chunks beyond ``verified``
        next_offset = verified
        self._drain()
        if progress is not None and size is not None:
            progress(verified, size)
        while size is None or verified < size:
            if cancel.is_set():
                raise DownloadCancelled(f"download of {sha256[:12]}… cancelled at {verified}")
            now = self._clock.monotonic()
            for item in [d for d in delayed if d[0] <= now]:
                delayed.remove(item)
                self._send(pending, sha256, item[1], item[2], now)
            limit = 1 if size is None else settings.window
            while (
                len(pending) + len(delayed) < limit
                and (size is None or next_offset < size)
                and not (size is None and (pending or delayed))
            ):
                self._send(pending, sha256, next_offset, 1, now)
                next_offset += settings.chunk_bytes
            self._resend_overdue(pending, sha256, now)
            try:
                message = self._answers.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            asked = pending.get(message.correlation_data or b"")
            if asked is None:
                continue  # late or duplicate answer
            try:
                header, data = decode_chunk(message.payload, max_bytes=self._max_frame)
            except DecodeError as exc:
                with self._lock:
                    self.chunks_rejected += 1
                logger.warning("chunk refused: %s", exc, extra={"offset": asked.offset})
                del pending[asked.correlation]
                self._send(pending, sha256, asked.offset, asked.attempts + 1, now)
                continue
            del pending[asked.correlation]
            if header.status is ChunkStatus.BUSY:
                with self._lock:
                    self.busy_answers += 1
                wait_s = (header.retry_after_ms or 1000) / 1000.0
                delayed.append((now + wait_s, asked.offset, asked.attempts))
                continue
            if header.status is not ChunkStatus.OK:
                raise ArtifactUnavailable(
                    f"{sha256[:12]}… {header.status.value}: {header.detail or 'no detail'}"
                )
            size = self._check_chunk(header, data, asked, sha256, size)
            self._write(fd, asked.offset, data)
            done[asked.offset] = len(data)
            advanced = verified
            while advanced in done:
                advanced += done.pop(advanced)
            if advanced > verified:
                verified = advanced
                self._commit(fd, folder, sha256, verified, size)
                if progress is not None:
                    progress(verified, size)
        return size

    def _check_chunk(
        self, header: ChunkResponse, data: bytes, asked: _Pending, sha256: str, size: int | None
    ) -> int:
        if header.artifact_sha256 != sha256 or header.offset != asked.offset:
            raise ArtifactMismatch(
                f"answer for {header.artifact_sha256[:12]}…@{header.offset}, "
                f"asked {sha256[:12]}…@{asked.offset}"
            )
        if size is not None and header.total_bytes != size:
            raise ArtifactMismatch(
                f"{sha256[:12]}… is served with {header.total_bytes} bytes, expected {size}"
            )
        total = header.total_bytes
        expected = min(self._settings.chunk_bytes, total - asked.offset)
        if len(data) != expected:
            raise ArtifactMismatch(
                f"chunk at {asked.offset} has {len(data)} bytes, expected {expected}"
            )
        with self._lock:
            self.chunks_verified += 1
        return total

    def _send(
        self, pending: dict[bytes, _Pending], sha256: str, offset: int, attempts: int, now: float
    ) -> None:
        correlation = uuid.uuid4().bytes
        request = ChunkRequest(
            device_id=self._device_id,
            sent_at=self._clock.now(),
            artifact_sha256=sha256,
            offset=offset,
            length=self._settings.chunk_bytes,
        )
        pending[correlation] = _Pending(
            offset, self._settings.chunk_bytes, correlation, now, attempts
        )
        try:
            self._client.publish(
                self._topics.model_chunks(),
                encode(request),
                qos=QoS.AT_LEAST_ONCE,
                response_topic=self._reply_topic,
                correlation_data=correlation,
            )
        except MqttError as exc:  # QoS 1 is kept while disconnected: this is a refusal
            logger.warning("chunk request not sent: %s", exc, extra={"offset": offset})
        with self._lock:
            self.requests_sent += 1

    def _resend_overdue(self, pending: dict[bytes, _Pending], sha256: str, now: float) -> None:
        settings = self._settings
        connected = self._connected()
        for item in [p for p in pending.values() if now - p.sent_at >= settings.timeout_s]:
            del pending[item.correlation]
            attempts = item.attempts + 1 if connected else item.attempts
            if attempts > settings.attempts:
                raise TransferTimeout(
                    f"no answer for {sha256[:12]}…@{item.offset} after {settings.attempts} "
                    f"requests of {settings.timeout_s:g}s"
                )
            with self._lock:
                self.retries += 1
            self._send(pending, sha256, item.offset, attempts, now)

    def _drain(self) -> None:
        while True:
            try:
                self._answers.get_nowait()
            except queue.Empty:
                return

    # -- durability ------------------------------------------------------------------------

    def _write(self, fd: int, offset: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise StagingError(f"cannot write a chunk: {exc.strerror or exc}") from exc

    def _commit(self, fd: int, folder: Path, sha256: str, verified: int, size: int) -> None:
        """The data first, then the offset that vouches for it."""
        try:
            os.fsync(fd)
            doc = {"sha256": sha256, "size_bytes": size, "verified_offset": verified}
            write_atomic(folder / PROGRESS_FILE, json.dumps(doc).encode())
        except (OSError, StateError) as exc:
            raise StagingError(f"cannot record progress in {folder}: {exc}") from exc

    def _load_progress(self, folder: Path, sha256: str) -> tuple[int, int | None]:
        """(verified offset, size) from the progress file; (0, None) if absent or unusable."""
        try:
            raw = json.loads((folder / PROGRESS_FILE).read_bytes())
            partial_size = (folder / PARTIAL_FILE).stat().st_size
        except (OSError, ValueError):
            return 0, None
        offset = raw.get("verified_offset") if isinstance(raw, dict) else None
        size = raw.get("size_bytes") if isinstance(raw, dict) else None
        if (
            raw.get("sha256") != sha256
            or not isinstance(offset, int)
            or not isinstance(size, int)
            or not 0 <= offset <= size
            or partial_size < offset
        ):
            logger.warning("unusable download progress discarded", extra={"sha256": sha256})
            return 0, None
        return offset, size

    def _check_whole(self, partial: Path, sha256: str, size: int) -> None:
        digest = hashlib.sha256()
        try:
            with partial.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            actual_size = partial.stat().st_size
        except OSError as exc:
            raise StagingError(f"cannot read {partial}: {exc.strerror or exc}") from exc
        if actual_size != size or digest.hexdigest() != sha256:
            self.discard(sha256)  # every chunk checked out, the whole does not: start over
            raise ArtifactMismatch(
                f"downloaded {actual_size} bytes with sha256 {digest.hexdigest()[:12]}…, "
                f"expected {sha256[:12]}…"
            )
