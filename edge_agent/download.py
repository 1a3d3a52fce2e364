"""Resumable artifact download over MQTT: pull checked chunks, keep a verified offset.

``ChunkPuller.fetch(sha256, size_bytes)`` asks the chunk server (``Topics.model_chunks()``)
for ``chunk_bytes`` at a time with MQTT v5 request/response, a small window of requests in
flight. The response topic is the artifact's broadcast topic
(``Topics.artifact_chunks(sha256)``), subscribed while the fetch runs: the controller
publishes each chunk once for every agent downloading the artifact, and this agent takes
any chunk it still needs, whoever asked for it (so it rarely has to ask at all when
others lead). Each request carries a fresh correlation id, the id of the current
subscription (``listener``, drawn again after every subscribe and reconnect) and how many
times the chunk was asked for. Every frame is unframed and checked by
``protocol.transfer.check_chunk`` (its own sha256) unless it is a copy of a chunk already
verified, which is dropped on its header alone; a chunk this agent asked for (same
correlation, or same offset and length) must match its request exactly, another one is
taken only if it fits the artifact's size and this agent's chunk grid, else ignored.
Chunks are written at their offset into ``<staging>/<sha256>/partial``; the *verified
offset* advances only over contiguous checked chunks, which are fed to a running sha256 as
it advances (so the whole file is never read back). Durability is batched: every
``fsync_bytes`` of verified advance (and at the end, and when a fetch stops on a temporary
error) the partial file is fsync'ed, then ``progress.json`` is replaced atomically
(``state.write_atomic``) with the offset just made durable - the record never claims a
byte that was not fsync'ed. After a kill, a power cut, a broker restart or a lost link the
next ``fetch`` truncates the partial file to the recorded offset, hashes that prefix once,
and asks for the byte after it: at most ``fsync_bytes`` are fetched twice, never the
whole blob. A download is finished when the running sha256 (over the complete file, in
order) and the size equal what was asked for; the file then moves to
``<staging>/<sha256>/blob``. However it ends, the fetch unsubscribes and tells the
controller (``TransferDone``), which frees its transfer slot.

Answers to this agent's own requests: ``busy`` -> stop listening and asking for
``retry_after_ms``, then subscribe again and go on; ``not_found`` / ``bad_range`` ->
permanent; no answer within ``timeout_s`` -> ask again (attempts are counted only while
connected, so a broker outage does not use them up). The reply handler runs on paho's
network thread and only queues the frame; checking, hashing and writing happen on the
caller's thread (the reconcile worker). Knows no model, no manifest::

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
from typing import Protocol

from edge_agent.clock import Clock
from edge_agent.state import StateError, write_atomic
from protocol.codec import DecodeError, encode
from protocol.mqtt import BrokerClient, InboundMessage, MqttError
from protocol.topics import QoS, Topics
from protocol.transfer import (
    ChunkRequest,
    ChunkResponse,
    ChunkStatus,
    TransferDone,
    TransferListening,
    check_chunk,
    read_chunk_frame,
)

logger = logging.getLogger(__name__)

PARTIAL_FILE = "partial"
PROGRESS_FILE = "progress.json"
BLOB_FILE = "blob"
_HEADER_ALLOWANCE = 20 * 1024
"""Frame bytes beyond the chunk itself: length prefix + JSON header."""
_POLL_S = 0.2
"""Longest wait between checks of the cancel flag."""


class PullClient(BrokerClient, Protocol):
    """A broker client that can also stop listening (``protocol.mqtt.MqttClient``)."""

    def unsubscribe(self, topic_filter: str) -> None: ...


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
    fsync_bytes: int = 8 * 1024 * 1024
    """Verified bytes between two durable progress records (``model_progress_fsync_bytes``)."""
    listen_first_s: float = 0.1
    """After subscribing, how long to only listen before asking (``model_listen_first_s``)."""


def next_offsets(
    *,
    verified: int,
    size: int | None,
    step: int,
    front: int,
    taken: Callable[[int], bool],
    count: int,
) -> list[int]:
    """The next grid offsets (``verified + i * step``) to ask for, at most ``count``.

    First those at or past ``front`` (the end of the newest chunk taken), then the gaps
    left behind it, lowest first. Alone, an agent asks in order as before; joining a
    broadcast that other devices lead, it asks ahead of that stream (the same chunks the
    leaders ask for, so the controller publishes each once for all) and takes the chunks
    as they pass, then fills what it missed before it joined - when every late joiner
    does so at about the same time, one publish of each missed chunk serves them all.
    ``size`` None (not yet known): only ``verified``. ``taken(offset)``: verified out of
    order or already asked.
    """
    if count <= 0:
        return []
    if size is None:
        return [] if taken(verified) else [verified]
    chosen: list[int] = []
    start = verified + max(0, front - verified) // step * step
    for first, stop in ((start, size), (verified, start)):
        offset = first
        while offset < stop and len(chosen) < count:
            if not taken(offset):
                chosen.append(offset)
            offset += step
    return chosen


@dataclass
class _Pending:
    offset: int
    length: int
    correlation: bytes
    sent_at: float
    attempts: int = 1
    """Requests for this chunk that count against ``PullSettings.attempts``."""
    sends: int = 1
    """Requests for this chunk sent in this fetch (``ChunkRequest.attempt``)."""


@dataclass
class _Staged:
    """The partial file of one fetch and how far it is verified, hashed and durable."""

    fd: int
    folder: Path
    sha256: str
    verified: int
    """Contiguous checked bytes written, all fed to ``hasher``."""
    durable: int
    """The offset ``progress.json`` claims: fsync'ed, ``<= verified``."""
    hasher: hashlib._Hash
    size: int | None = None


@dataclass
class _Listening:
    """The artifact topic subscription of one fetch."""

    topic: str
    sha256: str
    listener: str = ""
    subscribed: bool = False
    paused_until: float | None = None
    """Set after a ``busy``: not listening nor asking until then."""
    quiet_until: float = 0.0
    """Just subscribed: ask nothing before then unless a chunk comes (a broadcast that
    others lead is followed from where it is, not asked for again from the start)."""


class ChunkPuller:
    """Fetches blobs by digest into ``staging_root``; one ``fetch`` at a time."""

    def __init__(
        self,
        *,
        client: PullClient,
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
        self.chunks_unasked = 0
        """Verified chunks taken from the broadcast without a request of this agent's."""
        self.chunks_duplicate = 0
        """Broadcast copies of chunks it already had, dropped before hashing."""
        self.busy_answers = 0
        self.retries = 0

    def attach(self) -> None:
        """Nothing to subscribe up front: each fetch listens on its artifact's topic only
        while it runs (the client subscribes again after every CONNACK meanwhile)."""

    def _on_answer(self, message: InboundMessage) -> None:
        """Network thread: queue only; the fetching thread checks and writes."""
        self._answers.put(message)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "chunk_requests": self.requests_sent,
                "chunks_verified": self.chunks_verified,
                "chunks_rejected": self.chunks_rejected,
                "chunks_unasked": self.chunks_unasked,
                "chunks_duplicate": self.chunks_duplicate,
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
            staged = _Staged(
                fd, folder, sha256, verified, verified, self._hash_prefix(fd, partial, verified)
            )
            staged.size = size_bytes
            if verified:
                logger.info(
                    "download resumes",
                    extra={"sha256": sha256, "offset": verified, "size_bytes": size_bytes},
                )
            try:
                self._pull(staged, progress, cancel)
            except TemporaryDownloadError:
                self._save(staged)  # keep what was verified: the next fetch resumes there
                raise
            self._check_whole(staged)
        except PermanentDownloadError:
            os.close(fd)
            fd = -1
            self.discard(sha256)  # nothing staged for this digest can be trusted to resume
            raise
        finally:
            if fd >= 0:
                os.close(fd)
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

    def _pull(self, staged: _Staged, progress: Progress | None, cancel: threading.Event) -> None:
        sha256 = staged.sha256
        listening = _Listening(self._topics.artifact_chunks(sha256), sha256)
        self._drain()
        try:
            self._pull_listening(staged, progress, cancel, listening)
        finally:
            if listening.subscribed:
                self._client.unsubscribe(listening.topic)
            if listening.listener:  # it asked: free its transfer slot at once
                self._tell_done(sha256)

    def _pull_listening(
        self,
        staged: _Staged,
        progress: Progress | None,
        cancel: threading.Event,
        listening: _Listening,
    ) -> None:
        sha256, verified, size = staged.sha256, staged.verified, staged.size
        settings = self._settings
        step = settings.chunk_bytes
        base = verified  # the grid of chunk offsets: base + i * chunk_bytes
        pending: dict[bytes, _Pending] = {}
        asked: dict[int, bytes] = {}  # offset -> correlation of its pending request
        sends: dict[int, int] = {}  # offset -> requests sent for it in this fetch
        done: dict[int, int] = {}  # offset -> length, verified chunks beyond ``verified``
        front = verified  # the grid offset after the newest chunk taken
        was_connected = self._connected()
        if progress is not None and size is not None:
            progress(verified, size)
        while size is None or verified < size:
            if cancel.is_set():
                raise DownloadCancelled(f"download of {sha256[:12]}… cancelled at {verified}")
            now = self._clock.monotonic()
            connected = self._connected()
            if connected and not was_connected and listening.subscribed:
                self._announce(listening)  # the broker may have lost the session
            was_connected = connected
            if listening.paused_until is not None and now >= listening.paused_until:
                listening.paused_until = None
            if listening.paused_until is None:
                if not listening.subscribed:
                    self._listen(listening)
                    listening.quiet_until = now + settings.listen_first_s
                limit = 1 if size is None else settings.window
                quiet = (
                    (size is None or size - verified > settings.window * step)
                    and front == verified
                    and now < listening.quiet_until
                )  # known to fit one window: just ask
                if quiet or not self._answers.empty():
                    limit = 0  # take what has come first: it may be what it would ask for
                ahead = next_offsets(
                    verified=verified,
                    size=size,
                    step=step,
                    front=front,
                    taken=lambda offset: offset in done or offset in asked,
                    count=max(0, limit - len(pending)),
                )
                for offset in ahead:
                    sends[offset] = sends.get(offset, 0) + 1
                    self._send(pending, asked, sha256, listening, offset, 1, sends[offset], now)
                self._resend_overdue(pending, asked, sends, sha256, listening, now)
            try:
                message = self._answers.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            mine = pending.get(message.correlation_data or b"")
            try:
                header, data = read_chunk_frame(message.payload, max_bytes=self._max_frame)
                if (
                    header.status is ChunkStatus.OK
                    and header.artifact_sha256 == sha256
                    and (header.offset < verified or header.offset in done)
                ):
                    if mine is not None:  # answered already by another device's copy
                        self._forget(pending, asked, mine)
                    with self._lock:
                        self.chunks_duplicate += 1
                    continue  # a copy of a chunk it has: not worth hashing
                check_chunk(header, data)
            except DecodeError as exc:
                with self._lock:
                    self.chunks_rejected += 1
                logger.warning("chunk refused: %s", exc, extra={"sha256": sha256})
                if mine is not None:
                    self._forget(pending, asked, mine)
                    sends[mine.offset] = sends.get(mine.offset, 0) + 1
                    self._send(
                        pending,
                        asked,
                        sha256,
                        listening,
                        mine.offset,
                        mine.attempts + 1,
                        sends[mine.offset],
                        now,
                    )
                continue
            if header.status is not ChunkStatus.OK:
                if mine is None:
                    continue  # another device's refusal, or an answer given up on
                if header.status is ChunkStatus.BUSY:
                    with self._lock:
                        self.busy_answers += 1
                    wait_s = (header.retry_after_ms or 1000) / 1000.0
                    self._pause(listening, pending, asked, now + wait_s)
                    continue
                raise ArtifactUnavailable(
                    f"{sha256[:12]}… {header.status.value}: {header.detail or 'no detail'}"
                )
            if mine is None and header.artifact_sha256 == sha256:
                # An answer to the same question, asked by another device too.
                mine = pending.get(asked.get(header.offset, b""))
            if mine is not None:
                size = staged.size = self._check_chunk(header, data, mine, sha256, size)
                self._forget(pending, asked, mine)
            elif self._fits(header, data, sha256, size, base, verified, done):
                size = staged.size = header.total_bytes  # as an answer would have told it
                with self._lock:
                    self.chunks_unasked += 1
            else:
                continue
            assert size is not None
            self._write(staged.fd, header.offset, data)
            done[header.offset] = len(data)
            front = max(front, header.offset + step)
            stale = asked.get(header.offset)
            if stale is not None:
                self._forget(pending, asked, pending[stale])
            if verified not in done:
                continue  # a chunk ahead of a gap: hashed once the gap is filled
            while verified in done:
                length = done.pop(verified)
                chunk = data if verified == header.offset else self._read(staged, verified, length)
                staged.hasher.update(chunk)
                verified += length
            staged.verified = verified
            if verified - staged.durable >= settings.fsync_bytes or verified == size:
                self._commit(staged)
            if progress is not None:
                progress(verified, size)

    def _fits(
        self,
        header: ChunkResponse,
        data: memoryview,
        sha256: str,
        size: int | None,
        base: int,
        verified: int,
        done: dict[int, int],
    ) -> bool:
        """A chunk nobody here asked for: useful only if it is exactly one this fetch
        would ask for (its own sha256 was checked by ``check_chunk``). Size not yet known:
        only the first chunk it lacks, whose header then tells the size, as an answer to
        its own request would."""
        step = self._settings.chunk_bytes
        offset = header.offset
        total = header.total_bytes if size is None else size
        return (
            header.artifact_sha256 == sha256
            and header.total_bytes == total
            and verified <= offset < total
            and (size is not None or offset == verified)
            and (offset - base) % step == 0
            and offset not in done
            and len(data) == min(step, total - offset)
        )

    def _check_chunk(
        self,
        header: ChunkResponse,
        data: memoryview,
        asked: _Pending,
        sha256: str,
        size: int | None,
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

    def _listen(self, listening: _Listening) -> None:
        """Subscribe before asking: the broker takes a client's packets in order, so the
        subscription is in place before the controller sees the next request."""
        self._client.subscribe(listening.topic, self._on_answer, qos=QoS.AT_LEAST_ONCE)
        listening.subscribed = True
        self._announce(listening)

    def _announce(self, listening: _Listening) -> None:
        """A fresh listener id, told to the controller after the SUBSCRIBE (the broker
        takes one client's packets in order), so publishes it begins later count as seen."""
        listening.listener = uuid.uuid4().hex
        told = TransferListening(
            device_id=self._device_id,
            sent_at=self._clock.now(),
            artifact_sha256=listening.sha256,
            listener=listening.listener,
        )
        try:
            self._client.publish(self._topics.model_chunks(), encode(told), qos=QoS.AT_LEAST_ONCE)
        except MqttError as exc:
            logger.info("listening not announced: %s", exc, extra={"topic": listening.topic})

    def _pause(
        self,
        listening: _Listening,
        pending: dict[bytes, _Pending],
        asked: dict[int, bytes],
        until: float,
    ) -> None:
        """``busy``: stop listening (the bound is on devices receiving) and asking."""
        pending.clear()
        asked.clear()
        listening.paused_until = until
        if listening.subscribed:
            self._client.unsubscribe(listening.topic)
            listening.subscribed = False

    @staticmethod
    def _forget(pending: dict[bytes, _Pending], asked: dict[int, bytes], item: _Pending) -> None:
        pending.pop(item.correlation, None)
        if asked.get(item.offset) == item.correlation:
            del asked[item.offset]

    def _send(
        self,
        pending: dict[bytes, _Pending],
        asked: dict[int, bytes],
        sha256: str,
        listening: _Listening,
        offset: int,
        attempts: int,
        sends: int,
        now: float,
    ) -> None:
        correlation = uuid.uuid4().bytes
        request = ChunkRequest(
            device_id=self._device_id,
            sent_at=self._clock.now(),
            artifact_sha256=sha256,
            offset=offset,
            length=self._settings.chunk_bytes,
            listener=listening.listener,
            attempt=sends,
        )
        item = _Pending(offset, self._settings.chunk_bytes, correlation, now, attempts, sends)
        pending[correlation] = item
        asked[offset] = correlation
        try:
            self._client.publish(
                self._topics.model_chunks(),
                encode(request),
                qos=QoS.AT_LEAST_ONCE,
                response_topic=listening.topic,
                correlation_data=correlation,
            )
        except MqttError as exc:  # QoS 1 is kept while disconnected: this is a refusal
            logger.warning("chunk request not sent: %s", exc, extra={"offset": offset})
        with self._lock:
            self.requests_sent += 1

    def _resend_overdue(
        self,
        pending: dict[bytes, _Pending],
        asked: dict[int, bytes],
        sends: dict[int, int],
        sha256: str,
        listening: _Listening,
        now: float,
    ) -> None:
        settings = self._settings
        connected = self._connected()
        for item in [p for p in pending.values() if now - p.sent_at >= settings.timeout_s]:
            self._forget(pending, asked, item)
            attempts = item.attempts + 1 if connected else item.attempts
            if attempts > settings.attempts:
                raise TransferTimeout(
                    f"no answer for {sha256[:12]}…@{item.offset} after {settings.attempts} "
                    f"requests of {settings.timeout_s:g}s"
                )
            with self._lock:
                self.retries += 1
            sends[item.offset] = sends.get(item.offset, 0) + 1
            self._send(
                pending, asked, sha256, listening, item.offset, attempts, sends[item.offset], now
            )

    def _tell_done(self, sha256: str) -> None:
        done = TransferDone(
            device_id=self._device_id, sent_at=self._clock.now(), artifact_sha256=sha256
        )
        try:
            self._client.publish(self._topics.model_chunks(), encode(done), qos=QoS.AT_LEAST_ONCE)
        except MqttError as exc:
            logger.info("transfer end not sent: %s", exc, extra={"sha256": sha256})

    def _drain(self) -> None:
        while True:
            try:
                self._answers.get_nowait()
            except queue.Empty:
                return

    # -- durability ------------------------------------------------------------------------

    def _write(self, fd: int, offset: int, data: memoryview) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise StagingError(f"cannot write a chunk: {exc.strerror or exc}") from exc

    def _read(self, staged: _Staged, offset: int, length: int) -> bytes:
        """Bytes written earlier (out of order) that the running hash now needs."""
        try:
            data = os.pread(staged.fd, length, offset)
        except OSError as exc:
            raise StagingError(f"cannot read a chunk back: {exc.strerror or exc}") from exc
        if len(data) != length:
            raise StagingError(f"read {len(data)} of {length} bytes back at {offset}")
        return data

    def _hash_prefix(self, fd: int, partial: Path, verified: int) -> hashlib._Hash:
        """A resumed fetch hashes its verified prefix once, so the final digest is the
        whole file's."""
        digest = hashlib.sha256()
        offset = 0
        try:
            while offset < verified:
                block = os.pread(fd, min(1 << 20, verified - offset), offset)
                if not block:
                    raise StagingError(f"{partial} is shorter than its verified {verified}")
                digest.update(block)
                offset += len(block)
        except OSError as exc:
            raise StagingError(f"cannot read {partial}: {exc.strerror or exc}") from exc
        return digest

    def _commit(self, staged: _Staged) -> None:
        """The data first, then the offset that vouches for it."""
        verified = staged.verified
        try:
            os.fsync(staged.fd)
            doc = {"sha256": staged.sha256, "size_bytes": staged.size, "verified_offset": verified}
            write_atomic(staged.folder / PROGRESS_FILE, json.dumps(doc).encode())
        except (OSError, StateError) as exc:
            raise StagingError(f"cannot record progress in {staged.folder}: {exc}") from exc
        staged.durable = verified

    def _save(self, staged: _Staged) -> None:
        """On a temporary stop, make what is verified durable (best effort)."""
        if staged.verified <= staged.durable or staged.size is None:
            return
        try:
            self._commit(staged)
        except StagingError as exc:
            logger.warning("download progress not saved: %s", exc, extra={"sha256": staged.sha256})

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

    def _check_whole(self, staged: _Staged) -> None:
        """The running sha256 has seen every byte of the file, in order."""
        try:
            actual_size = os.fstat(staged.fd).st_size
        except OSError as exc:
            raise StagingError(f"cannot stat the partial blob: {exc.strerror or exc}") from exc
        digest = staged.hasher.hexdigest()
        if actual_size != staged.size or staged.verified != actual_size or digest != staged.sha256:
            # every chunk checked out, the whole does not: start over (the caller discards)
            raise ArtifactMismatch(
                f"downloaded {actual_size} bytes with sha256 {digest[:12]}…, "
                f"expected {staged.sha256[:12]}…"
            )
