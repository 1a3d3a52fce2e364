"""What a network impairment is, and how it is written on a command line.

``Impairment`` is a frozen, backend-neutral description: per-direction delay and jitter,
a loss fraction, an optional bandwidth cap and scheduled partitions. The two backends
(``sim.impair_proxy``: a userspace TCP proxy; ``sim.impair_netns``: a veth pair into a
network namespace with ``tc``) each apply it in their own way; this module knows neither.

The command-line form is a comma-separated list of ``key=value``::

    delay=50ms,jitter=10ms,loss=1%,rate=2mbit,partition=20s@30s,partition=5s@90s

* ``delay``, ``jitter`` - durations (``us``, ``ms``, ``s``, ``m``), each **per direction**:
  a round trip gets ``2 x delay``, as with netem on both ends of a link.
* ``loss`` - a percentage (``1%``, ``0.5%``); the ``%`` is required so that ``loss=1``
  cannot mean both 1 % and 100 %.
* ``rate`` - a bandwidth cap per direction: ``bit``, ``kbit``, ``mbit``, ``gbit`` (bits per
  second, tc's units) or ``bps``, ``kbps``, ``mbps`` (bytes per second).
* ``partition`` - ``DURATION@START``: the link is cut at START for DURATION (both
  measured from when the link's schedule starts); repeat the key for several.

Errors (both typed, both one line):

    ImpairmentSpecError (ValueError)   the string does not describe an impairment
    ImpairmentError (RuntimeError)     an impairment could not be applied (backends subclass)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(us|ms|s|m)$")
_DURATION_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_RATE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(bit|kbit|mbit|gbit|bps|kbps|mbps)$")
_RATE_KBIT = {
    "bit": 1e-3,
    "kbit": 1.0,
    "mbit": 1e3,
    "gbit": 1e6,
    "bps": 8e-3,
    "kbps": 8.0,
    "mbps": 8e3,
}
_PERCENT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)%$")
KEYS = ("delay", "jitter", "loss", "rate", "partition")

MIN_RTO_S = 0.2
"""Linux's minimum TCP retransmission timeout (``TCP_RTO_MIN``)."""


class ImpairmentSpecError(ValueError):
    """The text does not describe an impairment; the message names the part and why."""


class ImpairmentError(RuntimeError):
    """An impairment could not be set up or applied; the message says what failed."""


@dataclass(frozen=True)
class Impairment:
    """One link's impairment; the default is a perfect link."""

    delay_ms: float = 0.0
    """Added one-way latency per direction, ms."""
    jitter_ms: float = 0.0
    """Uniform +/- variation around ``delay_ms``, ms (byte order is always kept)."""
    loss: float = 0.0
    """Fraction of packets lost per direction, 0 <= loss < 1 (0.01 is 1 %)."""
    rate_kbit: float | None = None
    """Bandwidth cap per direction in kbit/s; None: no cap."""
    partitions: tuple[tuple[float, float], ...] = ()
    """Scheduled cuts as ``(start_s, duration_s)``, from when the schedule starts."""

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ImpairmentSpecError("delay and jitter must be >= 0")
        if self.jitter_ms > 0 and self.delay_ms == 0:
            raise ImpairmentSpecError("jitter needs a delay (jitter varies the delay)")
        if not 0.0 <= self.loss < 1.0:
            raise ImpairmentSpecError(f"loss must be in [0 %, 100 %), got {self.loss:.2%}")
        if self.rate_kbit is not None and self.rate_kbit <= 0:
            raise ImpairmentSpecError("rate must be > 0")
        for start_s, duration_s in self.partitions:
            if start_s < 0 or duration_s <= 0:
                raise ImpairmentSpecError(
                    f"partition needs a duration > 0 and a start >= 0, got {duration_s:g}s@"
                    f"{start_s:g}s"
                )

    @property
    def is_perfect(self) -> bool:
        """True when nothing is impaired (no delay, loss, cap or partition)."""
        return self == Impairment()

    @property
    def needs_netem(self) -> bool:
        """True when the kernel backend needs ``sch_netem`` (delay, jitter or loss)."""
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss > 0

    @property
    def retransmission_timeout_s(self) -> float:
        """The RTO a Linux TCP sender would settle on over this link:
        ``max(200 ms, srtt + 4 x rttvar)`` with srtt = 2 x delay and rttvar ~ jitter."""
        return max(MIN_RTO_S, (2 * self.delay_ms + 4 * self.jitter_ms) / 1000.0)

    def merged_partitions(self) -> list[tuple[float, float]]:
        """The partition windows as sorted, non-overlapping ``(start_s, end_s)``."""
        merged: list[tuple[float, float]] = []
        for start, duration in sorted(self.partitions):
            end = start + duration
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def __str__(self) -> str:
        """The canonical command-line form (``parse_impairment`` reads it back)."""
        parts: list[str] = []
        if self.delay_ms:
            parts.append(f"delay={self.delay_ms:g}ms")
        if self.jitter_ms:
            parts.append(f"jitter={self.jitter_ms:g}ms")
        if self.loss:
            parts.append(f"loss={self.loss * 100:g}%")
        if self.rate_kbit is not None:
            parts.append(f"rate={self.rate_kbit:g}kbit")
        parts += [f"partition={d:g}s@{s:g}s" for s, d in self.partitions]
        return ",".join(parts) or "none"

    def to_json(self) -> dict[str, object]:
        return {
            "spec": str(self),
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "loss": self.loss,
            "rate_kbit": self.rate_kbit,
            "partitions": [{"start_s": s, "duration_s": d} for s, d in self.partitions],
        }


def parse_duration_s(text: str, *, what: str) -> float:
    match = _DURATION.match(text.strip())
    if match is None:
        raise ImpairmentSpecError(f"{what} needs a duration like 50ms or 2s, got {text!r}")
    return float(match.group(1)) * _DURATION_S[match.group(2)]


def _parse_rate_kbit(text: str) -> float:
    match = _RATE.match(text.strip().lower())
    if match is None:
        raise ImpairmentSpecError(
            f"rate needs a bandwidth like 2mbit, 500kbit or 100kbps, got {text!r}"
        )
    return float(match.group(1)) * _RATE_KBIT[match.group(2)]


def _parse_loss(text: str) -> float:
    match = _PERCENT.match(text.strip())
    if match is None:
        raise ImpairmentSpecError(f"loss needs a percentage like 1% or 0.5%, got {text!r}")
    return float(match.group(1)) / 100.0


def _parse_partition(text: str) -> tuple[float, float]:
    duration, at, start = text.partition("@")
    if not at:
        raise ImpairmentSpecError(
            f"partition needs DURATION@START like 20s@30s (cut for 20 s at 30 s), got {text!r}"
        )
    return (
        parse_duration_s(start, what="partition start"),
        parse_duration_s(duration, what="partition duration"),
    )


def parse_impairment(text: str) -> Impairment:
    """``"delay=50ms,loss=1%,partition=20s@30s"`` -> ``Impairment``; one-line errors.

    Raises ``ImpairmentSpecError`` naming the bad part; every key but ``partition`` may
    appear once.
    """
    if not text.strip():
        raise ImpairmentSpecError("empty impairment: expected e.g. delay=50ms,loss=1%")
    values: dict[str, float] = {}
    partitions: list[tuple[float, float]] = []
    rate: float | None = None
    for raw in text.split(","):
        part = raw.strip()
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise ImpairmentSpecError(f"expected key=value, got {part!r} (keys: {', '.join(KEYS)})")
        if key not in KEYS:
            raise ImpairmentSpecError(f"unknown key {key!r} (keys: {', '.join(KEYS)})")
        if key != "partition" and (key in values or (key == "rate" and rate is not None)):
            raise ImpairmentSpecError(f"{key} given twice")
        if key in ("delay", "jitter"):
            values[key] = parse_duration_s(value, what=key) * 1000.0
        elif key == "loss":
            values[key] = _parse_loss(value)
        elif key == "rate":
            rate = _parse_rate_kbit(value)
        else:
            partitions.append(_parse_partition(value))
    try:
        return Impairment(
            delay_ms=values.get("delay", 0.0),
            jitter_ms=values.get("jitter", 0.0),
            loss=values.get("loss", 0.0),
            rate_kbit=rate,
            partitions=tuple(partitions),
        )
    except ImpairmentSpecError as exc:
        raise ImpairmentSpecError(f"{exc} (in {text!r})") from None
