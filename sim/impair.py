"""Optional network impairment for the simulator: delay, jitter, loss, rate and partitions
between simulated agents and the broker.

An ``ImpairedLink`` sits between clients and an upstream (the broker): clients connect to
``link.endpoint`` instead, and ``partition()``/``heal()`` cut and restore it (scheduled
partitions from the spec run from ``start_schedule()``). Two backends implement it:

* ``netns`` (``sim.impair_netns``) - the kernel does it: a veth pair into a network
  namespace with ``tc netem`` on both ends, partition by taking a link down. Needs root,
  and ``sch_netem`` in the kernel for delay, jitter and loss.
* ``proxy`` (``sim.impair_proxy``) - a userspace TCP proxy: portable, no privileges.
  Delay, jitter and rate are faithful at the level TCP's user sees; partitions hold every
  byte with the sockets open; loss is modelled as retransmission delay (RTO), never as
  missing bytes.

``choose_backend`` picks ``netns`` when asked, or under ``auto`` when running as root on a
kernel with ``sch_netem``; otherwise ``proxy``, and its ``reason`` says why (e.g. "netem
unsupported: ... Specified qdisc kind is unknown (kernel 6.18...)"), so every report can
state which backend produced its numbers. ``open_link`` returns the unstarted link; use it
as a context manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

from sim.impair_netns import (
    NetemSupport,
    NetemUnsupported,
    NetnsError,
    NetnsLink,
    netns_unavailable,
    probe_netem,
)
from sim.impair_proxy import ImpairmentProxy, ProxyStats
from sim.impair_spec import (
    Impairment,
    ImpairmentError,
    ImpairmentSpecError,
    parse_impairment,
)

__all__ = [
    "BACKENDS",
    "BackendChoice",
    "BackendName",
    "ImpairedLink",
    "Impairment",
    "ImpairmentError",
    "ImpairmentSpecError",
    "NetemUnsupported",
    "NetnsError",
    "backend_named",
    "choose_backend",
    "open_link",
    "parse_impairment",
]

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "proxy", "netns"]
BACKENDS: tuple[BackendName, ...] = ("auto", "proxy", "netns")


class ImpairedLink(Protocol):
    """What both backends offer; a context manager that starts and tears down the link."""

    backend: str
    reason: str
    spec: Impairment

    @property
    def endpoint(self) -> tuple[str, int]: ...

    @property
    def partitioned(self) -> bool: ...

    def partition(self) -> None: ...

    def heal(self) -> None: ...

    def start_schedule(self) -> None: ...

    def stats(self) -> ProxyStats: ...

    def describe(self) -> dict[str, Any]: ...

    def __enter__(self) -> ImpairedLink: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def backend_named(text: str) -> BackendName:
    """``"auto"``, ``"proxy"`` or ``"netns"``; anything else is an ``ImpairmentSpecError``."""
    for name in BACKENDS:
        if text == name:
            return name
    raise ImpairmentSpecError(f"unknown impairment backend {text!r} (one of {', '.join(BACKENDS)})")


@dataclass(frozen=True)
class BackendChoice:
    backend: Literal["proxy", "netns"]
    reason: str
    """One line: why this backend (and, for the proxy under auto, why not netns)."""


def choose_backend(
    spec: Impairment,
    requested: BackendName = "auto",
    *,
    unavailable: Callable[[], str | None] = netns_unavailable,
    probe: Callable[[], NetemSupport] = probe_netem,
) -> BackendChoice:
    """Which backend applies ``spec``. ``netns`` asked for but impossible raises
    ``NetnsError`` (``NetemUnsupported`` when the spec needs netem); ``auto`` never raises."""
    if requested == "proxy":
        return BackendChoice("proxy", "userspace proxy asked for")
    if requested == "netns":
        why = unavailable()
        if why is not None:
            raise NetnsError(f"netns backend unavailable: {why}")
        if spec.needs_netem:
            support = probe()
            if not support.available:
                raise NetemUnsupported(
                    f"netns backend cannot apply delay/jitter/loss: netem unsupported: "
                    f"{support.reason}"
                )
            return BackendChoice("netns", "netns asked for; sch_netem available")
        return BackendChoice("netns", "netns asked for (link down for partitions, tbf for rate)")
    backend_named(requested)
    why = unavailable()
    if why is not None:
        return BackendChoice("proxy", f"netns backend needs root: {why}")
    support = probe()
    if not support.available:
        return BackendChoice("proxy", f"netem unsupported: {support.reason}")
    return BackendChoice("netns", "root and sch_netem available")


def open_link(
    spec: Impairment,
    *,
    upstream: tuple[str, int],
    backend: BackendName = "auto",
    seed: int = 0,
    schedule_on_start: bool = True,
) -> ImpairedLink:
    """An unstarted link to ``upstream`` applying ``spec`` (``with open_link(...) as link``)."""
    choice = choose_backend(spec, backend)
    logger.info(
        "network impairment",
        extra={"impairment": str(spec), "backend": choice.backend, "reason": choice.reason},
    )
    if choice.backend == "netns":
        return NetnsLink(
            spec, upstream=upstream, schedule_on_start=schedule_on_start, reason=choice.reason
        )
    return ImpairmentProxy(
        spec,
        upstream=upstream,
        seed=seed,
        schedule_on_start=schedule_on_start,
        reason=choice.reason,
    )
