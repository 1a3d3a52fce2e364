"""The kernel impairment backend (root): a veth pair into a network namespace, ``tc``.

::

    root namespace                          namespace spw-<pid>-<n>
    clients -> ns_address:port  --veth-->   relay listener (ns side)
                host_address  <-- spwh..  |  spwn.. --> ns_address
    broker  <- relay's upstream connection (root namespace, unimpaired)

Everything crossing the veth pair is impaired by the kernel: ``tc netem`` (delay, jitter,
loss, rate) on both ends, so each direction gets the spec, as with the proxy; when the
spec asks only for a rate and the kernel has no ``sch_netem``, a ``tbf`` qdisc caps it.
A partition takes the namespace's end of the pair down: the root end loses its carrier but
keeps its route, so packets vanish both ways while every socket stays open - a cut cable.
Bringing it up again lets TCP retransmit what was held.

Two ways to put traffic on the link:

* **in-process clients** connect to ``endpoint``: a pass-through relay (``ImpairmentProxy``
  with a perfect spec) whose *listening socket* lives in the namespace (created on a
  short-lived thread that ``setns(2)``-ed into it), so client <-> relay crosses the veth
  and relay <-> broker does not;
* **agent processes** run inside the namespace (``exec_prefix()``: ``ip netns exec NAME``)
  and connect to the broker at ``host_address``, where the broker must listen (or on
  ``0.0.0.0``).

The kernel decides what works: this module tries and reports. ``probe_netem()`` adds a
netem qdisc to the loopback of a throw-away namespace and says why it failed (e.g. a kernel
built without ``sch_netem``: "Specified qdisc kind is unknown"). Errors::

    ImpairmentError (sim.impair_spec)
    └── NetnsError          ip/tc failed or this process cannot manage namespaces (permanent)
        └── NetemUnsupported   the spec needs netem and the kernel has none

``NetnsLink`` is a context manager and removes its namespace and veth pair on exit, also
after an error; namespaces left by a killed process (``spw-<pid>-<n>``, pid no longer
running) are removed by the next link that starts.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import random
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from sim.impair_partition import PartitionSwitch
from sim.impair_proxy import ImpairmentProxy, ProxyStats
from sim.impair_spec import Impairment, ImpairmentError

logger = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
PREFIX = "spw-"
_counter = itertools.count(1)


class NetnsError(ImpairmentError):
    """A namespace, link or qdisc could not be made; permanent on this host."""


class NetemUnsupported(NetnsError):
    """The spec needs ``tc netem`` and this kernel does not have it."""


@dataclass(frozen=True)
class NetemSupport:
    available: bool
    reason: str
    """Why not (or what was found), one line."""


def _run(argv: list[str], *, what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{what}: {' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetnsError(f"{what}: {' '.join(argv)}: {message[0] if message else proc.returncode}")
    return proc.stdout


def netns_unavailable() -> str | None:
    """Why this process cannot build the link (None: it may try)."""
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()})"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (iproute2)"
    return None


def probe_netem() -> NetemSupport:
    """Try a netem qdisc in a throw-away namespace; never raises."""
    why = netns_unavailable()
    if why is not None:
        return NetemSupport(False, why)
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", name], what="netem probe")
    except NetnsError as exc:
        return NetemSupport(False, str(exc))
    try:
        proc = subprocess.run(
            ["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return NetemSupport(False, f"tc netem: {exc}")
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    if proc.returncode == 0:
        return NetemSupport(True, "sch_netem available")
    said = (proc.stderr or proc.stdout).strip().splitlines()
    error = said[0].removeprefix("Error: ").rstrip(".") if said else f"exit {proc.returncode}"
    return NetemSupport(False, f"tc netem: {error} (kernel {os.uname().release})")


def remove_stale_namespaces() -> list[str]:
    """Delete ``spw-<pid>-*`` namespaces whose process is gone; returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def socket_in_namespace(namespace: str, bind: tuple[str, int]) -> socket.socket:
    """A listening TCP socket that lives in ``namespace``: made on a thread of its own that
    enters the namespace (``setns`` changes only the calling thread) and then ends."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(bind)
            sock.listen(128)
            made.append(sock)
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=make, name=f"setns-{namespace}")
    thread.start()
    thread.join()
    if failed:
        raise NetnsError(f"listening socket in {namespace}: {failed[0]}") from failed[0]
    return made[0]


def _free_subnet() -> tuple[str, str]:
    """(host_address, ns_address) of a /30 in 10.200-254.x.x that no interface uses."""
    used = _run(["ip", "-4", "-o", "addr", "show"], what="list addresses")
    rng = random.Random()
    for _ in range(100):
        base = f"10.{rng.randrange(200, 255)}.{rng.randrange(256)}"
        last = rng.randrange(0, 256, 4)
        if f" {base}.{last + 1}/" not in used and f" {base}.{last + 2}/" not in used:
            return f"{base}.{last + 1}", f"{base}.{last + 2}"
    raise NetnsError("no free /30 in 10.200.0.0-10.254.255.255")


def qdisc_args(spec: Impairment, *, netem: bool) -> list[str]:
    """The ``tc qdisc add ... root`` tail that applies ``spec`` to one direction (pure)."""
    if netem:
        args = ["netem"]
        if spec.delay_ms or spec.jitter_ms:
            args += ["delay", f"{spec.delay_ms:g}ms"]
            if spec.jitter_ms:
                args.append(f"{spec.jitter_ms:g}ms")
        if spec.loss:
            args += ["loss", f"{spec.loss * 100:g}%"]
        if spec.rate_kbit is not None:
            args += ["rate", f"{spec.rate_kbit:g}kbit"]
        return args
    if spec.rate_kbit is None:
        return []
    burst = max(3000, int(spec.rate_kbit * 125 / 100))  # 10 ms of rate, >= two packets
    return ["tbf", "rate", f"{spec.rate_kbit:g}kbit", "burst", str(burst), "latency", "1s"]


class NetnsLink:
    """A veth pair into a fresh namespace with ``spec`` applied by the kernel."""

    backend = "netns"

    def __init__(
        self,
        spec: Impairment,
        *,
        upstream: tuple[str, int],
        schedule_on_start: bool = True,
        reason: str = "",
    ) -> None:
        self.spec = spec
        self.upstream = upstream
        self.reason = reason
        n = next(_counter)
        self.namespace = f"{PREFIX}{os.getpid()}-{n}"
        self.host_veth = f"spwh{os.getpid():x}x{n:x}"[:15]
        self.ns_veth = f"spwn{os.getpid():x}x{n:x}"[:15]
        self.host_address = ""
        self.ns_address = ""
        self.qdisc: list[str] = []
        """The qdisc on each end (``tc`` arguments), empty when none was needed."""
        self._schedule_on_start = schedule_on_start
        self._relay: ImpairmentProxy | None = None
        self._made = False
        self._switch = PartitionSwitch(self._apply_cut, name=self.namespace)

    def start(self) -> NetnsLink:
        why = netns_unavailable()
        if why is not None:
            raise NetnsError(f"netns backend unavailable: {why}")
        remove_stale_namespaces()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        logger.info(
            "netns link up",
            extra={
                "namespace": self.namespace,
                "endpoint": f"{self.endpoint[0]}:{self.endpoint[1]}",
                "qdisc": " ".join(self.qdisc) or "none",
                "impairment": str(self.spec),
            },
        )
        if self._schedule_on_start:
            self.start_schedule()
        return self

    def _build(self) -> None:
        ns, host, peer = self.namespace, self.host_veth, self.ns_veth
        _run(["ip", "netns", "add", ns], what="create namespace")
        self._made = True
        self.host_address, self.ns_address = _free_subnet()
        _run(
            ["ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns],
            what="create veth pair",
        )
        _run(["ip", "addr", "add", f"{self.host_address}/30", "dev", host], what="address")
        _run(["ip", "link", "set", host, "up"], what="link up")
        _run(["ip", "-n", ns, "addr", "add", f"{self.ns_address}/30", "dev", peer], what="address")
        _run(["ip", "-n", ns, "link", "set", peer, "up"], what="link up")
        _run(["ip", "-n", ns, "link", "set", "lo", "up"], what="loopback up")
        self._add_qdiscs()
        self._relay = ImpairmentProxy(
            Impairment(),
            upstream=self.upstream,
            listen_socket=lambda: socket_in_namespace(ns, (self.ns_address, 0)),
            name=f"relay-{ns}",
        )
        self._relay.start()

    def _add_qdiscs(self) -> None:
        spec = self.spec
        if spec.needs_netem:
            self.qdisc = qdisc_args(spec, netem=True)
        elif spec.rate_kbit is not None:
            self.qdisc = qdisc_args(spec, netem=False)
        if not self.qdisc:
            return
        for prefix, dev in ((["tc"], self.host_veth), (["tc", "-n", self.namespace], self.ns_veth)):
            try:
                _run([*prefix, "qdisc", "add", "dev", dev, "root", *self.qdisc], what="tc")
            except NetnsError as exc:
                if self.qdisc[0] == "netem" and "unknown" in str(exc).lower():
                    raise NetemUnsupported(
                        f"the kernel ({os.uname().release}) has no sch_netem: {exc}"
                    ) from exc
                raise

    def close(self) -> None:
        """Stop the schedule and the relay, delete the veth pair and the namespace."""
        self._switch.close()
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        if self._made:
            # The root end first: deleting it destroys the pair at once (a namespace's
            # devices go only when the kernel frees the namespace, which may lag).
            subprocess.run(["ip", "link", "del", self.host_veth], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, check=False)
            self._made = False
            logger.info("netns link removed", extra={"namespace": self.namespace})

    def __enter__(self) -> NetnsLink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the link's face -------------------------------------------------------------------

    @property
    def endpoint(self) -> tuple[str, int]:
        """Where in-process clients connect: the relay, across the veth pair."""
        if self._relay is None:
            raise ImpairmentError("the netns link is not started")
        return self._relay.endpoint

    def exec_prefix(self) -> list[str]:
        """Prefix of a command line that runs a process inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def partition(self) -> None:
        """Take the namespace's end of the veth pair down until ``heal()``."""
        self._switch.cut()

    def heal(self) -> None:
        self._switch.heal()

    @property
    def partitioned(self) -> bool:
        return self._switch.partitioned

    def start_schedule(self) -> None:
        self._switch.start_schedule(self.spec.merged_partitions())

    def _apply_cut(self, cut: bool) -> None:
        _run(
            ["ip", "-n", self.namespace, "link", "set", self.ns_veth, "down" if cut else "up"],
            what="partition" if cut else "heal",
        )

    def stats(self) -> ProxyStats:
        """The relay's counters (bytes, connections) with this link's cuts."""
        snapshot = self._relay.stats() if self._relay is not None else ProxyStats()
        snapshot.cuts, snapshot.partitioned_s = self._switch.counters()
        return snapshot

    def describe(self) -> dict[str, Any]:
        return {
            "impairment": self.spec.to_json(),
            "backend": self.backend,
            "reason": self.reason,
            "namespace": self.namespace,
            "veth": [self.host_veth, self.ns_veth],
            "addresses": {"host": self.host_address, "namespace": self.ns_address},
            "qdisc": " ".join(self.qdisc) or None,
            "stats": self.stats().to_json(),
        }
