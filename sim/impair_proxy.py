"""The portable impairment backend: a userspace TCP proxy in front of the broker.

Clients connect to ``endpoint`` instead of the broker; every accepted connection gets its
own upstream connection, and each direction is a pipe of three stages:

1. **read** - bytes are read as they come and stamped with a release time:
   ``now + delay +/- jitter`` (uniform), never earlier than the previous chunk's release,
   so TCP's byte order is kept (jitter cannot reorder a stream). At most ``buffer_bytes``
   wait per direction; beyond that the proxy stops reading (like a full send buffer).
2. **shape** - at its release time a chunk passes a token bucket of ``rate_kbit`` (burst:
   10 ms of rate, at least two 1500-byte packets), in pieces of at most 4 KiB.
3. **deliver** - unless the link is partitioned: then every byte is held, both ways.

**Partition** is a cut cable, not a closed socket: both sockets stay open, nothing passes,
and nothing is lost - what was sent during the cut arrives after ``heal()``, as TCP's
retransmissions would deliver it (a real stack may take up to its backed-off RTO longer).
So MQTT keepalive and Last Will behave as in a real partition: a short cut is invisible
to the session, a cut past 1.5 x keepalive makes the broker drop the client and publish its
Will, and the client's own keepalive makes it give up and reconnect. A connection opened
during a cut is accepted locally but reaches the broker only at heal (a SYN that gets no
answer); if the client gives up first it never reaches the broker at all. Closes (FIN)
and resets (RST) are forwarded in order with the data, and are held by a cut too.

**Loss** cannot be emulated on a byte stream: TCP never shows a lost segment to the
application, it retransmits it. The proxy models what the application sees instead: each
1448-byte segment of a chunk is lost with probability ``loss`` (again for every
retransmission), and a chunk with a lost segment - with everything behind it (head-of-line
blocking) - is delayed by ``RTO x (2^k - 1)`` for ``k`` consecutive losses, RTO being
``Impairment.retransmission_timeout_s`` (Linux: at least 200 ms). No byte is ever
dropped; fast retransmit (recovery in about one RTT when later segments keep flowing) is
not modelled, so this is the pessimistic, tail-latency view of loss. Counted as
``retransmits_modelled``.

The proxy runs its own asyncio loop on a daemon thread; ``partition()``/``heal()`` and
``stats()`` are safe from any thread, and ``partition()`` has taken effect when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from sim.impair_partition import PartitionSwitch
from sim.impair_spec import Impairment, ImpairmentError

logger = logging.getLogger(__name__)

SEGMENT_BYTES = 1448
"""TCP payload of one 1500-byte Ethernet packet with timestamps: the unit of modelled loss."""
PIECE_BYTES = 4096
"""Largest write under a rate cap, so a capped stream flows instead of arriving in lumps."""
READ_BYTES = 65536
MAX_RETRANSMISSIONS = 6


@dataclass
class ProxyStats:
    """Counters of one proxy since it started (a snapshot: ``ImpairmentProxy.stats()``)."""

    connections: int = 0
    """Client connections accepted."""
    active: int = 0
    """Connections open now."""
    abandoned: int = 0
    """Closed by the client during a partition, before reaching the upstream."""
    refused: int = 0
    """Upstream connection failed (the client got a reset)."""
    bytes_up: int = 0
    """Bytes delivered client -> upstream."""
    bytes_down: int = 0
    """Bytes delivered upstream -> client."""
    retransmits_modelled: int = 0
    """Chunks delayed by a modelled retransmission (``loss``)."""
    cuts: int = 0
    """Partitions so far (scheduled and manual)."""
    partitioned_s: float = 0.0
    """Seconds partitioned so far, the current cut included."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TokenBucket:
    """Bytes per second with a burst allowance; ``delay_s`` may go into debt (pure)."""

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float, *, now: float) -> None:
        self.rate = rate_bytes_per_s
        self.burst = burst_bytes
        self.tokens = burst_bytes
        self.stamp = now

    def delay_s(self, n: int, *, now: float) -> float:
        """Take ``n`` bytes at ``now``; seconds to wait before sending them."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def loss_penalty_s(nbytes: int, *, loss: float, rto_s: float, rng: random.Random) -> float:
    """Extra delay of a chunk of ``nbytes`` under ``loss``: RTO x (2^k - 1) for the worst
    segment's ``k`` consecutive losses (pure, given ``rng``)."""
    if loss <= 0:
        return 0.0
    worst = 0
    for _ in range(max(1, math.ceil(nbytes / SEGMENT_BYTES))):
        k = 0
        while k < MAX_RETRANSMISSIONS and rng.random() < loss:
            k += 1
        worst = max(worst, k)
    return rto_s * (2**worst - 1)


class _End:
    """Markers that travel in a pipe after the data: the source closed (FIN) or reset."""

    def __init__(self, reset: bool) -> None:
        self.reset = reset


_EOF = _End(reset=False)
_RESET = _End(reset=True)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a peer's reset is forwarded."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Pipe:
    """One direction of one connection: read -> stamp -> shape -> deliver."""

    def __init__(self, proxy: ImpairmentProxy, direction: str) -> None:
        self.proxy = proxy
        self.direction = direction
        self.queue: asyncio.Queue[tuple[float, bytes | _End]] = asyncio.Queue()
        self.buffered = 0
        self.room = asyncio.Event()
        self.room.set()
        self.last_release = 0.0
        spec = proxy.spec
        loop = asyncio.get_running_loop()
        self.bucket = (
            TokenBucket(
                spec.rate_kbit * 125.0,
                max(3000.0, spec.rate_kbit * 125.0 / 100),
                now=loop.time(),
            )
            if spec.rate_kbit is not None
            else None
        )

    def _release_at(self, nbytes: int) -> float:
        proxy, spec = self.proxy, self.proxy.spec
        delay_s = spec.delay_ms / 1000.0
        if spec.jitter_ms:
            delay_s = max(0.0, delay_s + proxy.rng.uniform(-1, 1) * spec.jitter_ms / 1000.0)
        penalty = loss_penalty_s(
            nbytes, loss=spec.loss, rto_s=spec.retransmission_timeout_s, rng=proxy.rng
        )
        if penalty:
            proxy.counters.retransmits_modelled += 1
        release = max(asyncio.get_running_loop().time() + delay_s + penalty, self.last_release)
        self.last_release = release
        return release

    async def read_from(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                data = await reader.read(READ_BYTES)
            except (ConnectionError, OSError):
                self.queue.put_nowait((self._release_at(0), _RESET))
                return
            if not data:
                self.queue.put_nowait((self._release_at(0), _EOF))
                return
            self.queue.put_nowait((self._release_at(len(data)), data))
            self.buffered += len(data)
            if self.buffered >= self.proxy.buffer_bytes:
                self.room.clear()
                await self.room.wait()

    async def write_to(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            release, item = await self.queue.get()
            if (wait := release - loop.time()) > 0:
                await asyncio.sleep(wait)
            if isinstance(item, _End):
                await self.proxy.wait_healed()
                if item.reset:
                    _reset(writer)
                elif writer.can_write_eof() and not writer.is_closing():
                    try:
                        writer.write_eof()
                    except OSError:
                        writer.transport.abort()
                return
            for at in range(0, len(item), PIECE_BYTES if self.bucket else len(item)):
                piece = item[at : at + PIECE_BYTES] if self.bucket else item
                if (
                    self.bucket is not None
                    and (wait := self.bucket.delay_s(len(piece), now=loop.time())) > 0
                ):
                    await asyncio.sleep(wait)
                await self.proxy.wait_healed()
                if writer.is_closing():
                    return
                try:
                    writer.write(piece)
                    await writer.drain()
                except (ConnectionError, OSError):
                    writer.transport.abort()
                    return
                self.proxy.count(self.direction, len(piece))
            self.buffered -= len(item)
            if self.buffered < self.proxy.buffer_bytes:
                self.room.set()


class ImpairmentProxy:
    """A TCP proxy to ``upstream`` that applies ``spec``; a context manager.

    ``listen_socket``, when given, makes the listening socket (bound and listening, e.g. in
    another network namespace); otherwise the proxy listens on ``listen_host`` at a free
    port (or ``listen_port``). ``schedule_on_start=False`` leaves the spec's partitions
    until ``start_schedule()``.
    """

    backend = "proxy"

    def __init__(
        self,
        spec: Impairment,
        *,
        upstream: tuple[str, int],
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        listen_socket: Callable[[], socket.socket] | None = None,
        seed: int = 0,
        schedule_on_start: bool = True,
        buffer_bytes: int = 4 << 20,
        reason: str = "",
        name: str = "impair-proxy",
    ) -> None:
        self.spec = spec
        self.upstream = upstream
        self.reason = reason
        """Why this backend was chosen (set by ``sim.impair.open_link``)."""
        self.buffer_bytes = buffer_bytes
        self.rng = random.Random(seed)
        self.counters = ProxyStats()
        self._listen = (listen_host, listen_port)
        self._listen_socket = listen_socket
        self._schedule_on_start = schedule_on_start
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._healed: asyncio.Event | None = None
        self._cut = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._endpoint: tuple[str, int] | None = None
        self._switch = PartitionSwitch(self._apply_cut, name=name)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ImpairmentProxy:
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
        self._thread.start()
        try:
            self._endpoint = asyncio.run_coroutine_threadsafe(self._open(), loop).result(10)
        except Exception as exc:
            self.stop()
            raise ImpairmentError(f"impairment proxy could not listen: {exc}") from exc
        logger.info(
            "impairment proxy listening",
            extra={
                "endpoint": f"{self._endpoint[0]}:{self._endpoint[1]}",
                "upstream": f"{self.upstream[0]}:{self.upstream[1]}",
                "impairment": str(self.spec),
            },
        )
        if self._schedule_on_start:
            self.start_schedule()
        return self

    async def _open(self) -> tuple[str, int]:
        self._healed = asyncio.Event()
        self._healed.set()
        if self._listen_socket is not None:
            server = await asyncio.start_server(self._serve, sock=self._listen_socket())
        else:
            server = await asyncio.start_server(self._serve, *self._listen)
        self._server = server
        host, port = server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Close every connection and the listener; idempotent."""
        self._switch.close()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
            except Exception:  # tearing down: log and go on
                logger.exception("impairment proxy did not close cleanly")
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> ImpairmentProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the link's face -------------------------------------------------------------------

    @property
    def endpoint(self) -> tuple[str, int]:
        """Where clients connect instead of ``upstream``."""
        if self._endpoint is None:
            raise ImpairmentError("the impairment proxy is not started")
        return self._endpoint

    def partition(self) -> None:
        """Cut the link (both directions hold every byte) until ``heal()``."""
        self._switch.cut()

    def heal(self) -> None:
        """Let held bytes through; also ends a scheduled partition in progress."""
        self._switch.heal()

    @property
    def partitioned(self) -> bool:
        return self._switch.partitioned

    def start_schedule(self) -> None:
        """Start the spec's partition schedule (times count from now)."""
        self._switch.start_schedule(self.spec.merged_partitions())

    def stats(self) -> ProxyStats:
        cuts, down_s = self._switch.counters()
        snapshot = ProxyStats(**asdict(self.counters))
        snapshot.cuts, snapshot.partitioned_s = cuts, down_s
        return snapshot

    def describe(self) -> dict[str, Any]:
        return {
            "impairment": self.spec.to_json(),
            "backend": self.backend,
            "reason": self.reason,
            "stats": self.stats().to_json(),
        }

    # -- inside the loop -------------------------------------------------------------------

    def _apply_cut(self, cut: bool) -> None:
        """Called by the switch (any thread); returns once the loop holds the new state."""
        loop = self._loop
        if loop is None or not loop.is_running():
            self._cut = cut
            return
        if threading.current_thread() is self._thread:
            self._set_cut(cut)
            return
        done = threading.Event()

        def apply() -> None:
            self._set_cut(cut)
            done.set()

        loop.call_soon_threadsafe(apply)
        done.wait(5)

    def _set_cut(self, cut: bool) -> None:
        self._cut = cut
        if self._healed is not None:
            (self._healed.clear if cut else self._healed.set)()

    async def wait_healed(self) -> None:
        while self._cut and self._healed is not None:
            await self._healed.wait()

    def count(self, direction: str, nbytes: int) -> None:
        if direction == "up":
            self.counters.bytes_up += nbytes
        else:
            self.counters.bytes_down += nbytes

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.counters.connections += 1
        self.counters.active += 1
        try:
            await self._connect_and_pump(creader, cwriter)
        except asyncio.CancelledError:
            pass  # stop(): asyncio 3.11 would log a cancelled connection task as an error
        finally:
            self.counters.active -= 1
            self._tasks.discard(task)

    async def _connect_and_pump(
        self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter
    ) -> None:
        up = _Pipe(self, "up")
        reading = asyncio.create_task(up.read_from(creader))
        pumps: list[asyncio.Task[None]] = [reading]
        uwriter: asyncio.StreamWriter | None = None
        try:
            while self._cut and not reading.done():  # a SYN in a cut cable: wait or give up
                assert self._healed is not None
                healed = asyncio.create_task(self._healed.wait())
                await asyncio.wait({healed, reading}, return_when=asyncio.FIRST_COMPLETED)
                healed.cancel()
            if self._cut:
                self.counters.abandoned += 1
                return
            try:
                ureader, uwriter = await asyncio.open_connection(*self.upstream)
            except OSError as exc:
                self.counters.refused += 1
                logger.warning("impairment proxy: upstream refused", extra={"error": str(exc)})
                _reset(cwriter)
                return
            down = _Pipe(self, "down")
            writers = [
                asyncio.create_task(up.write_to(uwriter)),
                asyncio.create_task(down.write_to(cwriter)),
            ]
            pumps += [*writers, asyncio.create_task(down.read_from(ureader))]
            await asyncio.gather(*writers)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (cwriter, uwriter):
                if writer is not None and not writer.is_closing():
                    writer.close()
