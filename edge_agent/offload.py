"""When to send a request to the cloud pool instead of serving it here: the overflow policy.

``decide`` is pure: given the local load (queued texts x measured service time per text),
the request's objective (its deadline, else the default SLO), what the cloud last said and
the rate budget, it returns ``Local(why)`` or ``Offload(reason)`` plus the new hysteresis
state. Reasons (``OffloadReason``): ``deadline`` (this request's own deadline cannot be met
locally), ``overflow`` (the predicted wait misses the SLO), ``policy`` (policy samples it).

Against flapping: overflow starts when the predicted wait reaches ``enter_ratio`` x SLO and
stops only once it falls to ``exit_ratio`` x SLO; a token bucket (``TokenBucket``, on the
caller's clock) caps offloads per second. The cloud is used only while it is known to
accept: no pool status seen, back-pressure, or a recent timeout all keep work local.

``OffloadController`` is the small stateful shell the runtime calls: it owns the
hysteresis flag, the bucket and the counters. This module knows no MQTT and no asyncio.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from protocol.inference import OffloadReason


class CloudState(StrEnum):
    """What the edge believes about the cloud pool right now."""

    UNKNOWN = "unknown"
    """No pool status seen (no pool deployed, or not yet): do not offload."""
    ACCEPTING = "accepting"
    BACK_PRESSURE = "back_pressure"
    """The pool said it is not accepting."""
    UNAVAILABLE = "unavailable"
    """Broker away, or a recent offload timed out or was refused (cool-down)."""


@dataclass(frozen=True)
class CloudView:
    state: CloudState
    est_wait_ms: float = 0.0
    """The pool's own estimate of its queueing delay."""

    @property
    def available(self) -> bool:
        return self.state is CloudState.ACCEPTING


@dataclass(frozen=True)
class OffloadPolicy:
    """The overflow policy's values: from ``EdgeSettings`` at start, then from the
    operating policy the controller pushes (``edge_agent.operating``)."""

    enabled: bool = True
    slo_ms: float = 250.0
    """Objective of a request without its own deadline."""
    enter_ratio: float = 1.0
    exit_ratio: float = 0.6
    rate_per_s: float = 50.0
    burst: int = 20
    policy_fraction: float = 0.0
    """Share of requests the policy itself sends to the cloud (picked by request id)."""


@dataclass(frozen=True)
class Local:
    why: str | None = None
    """Why an offload that was wanted did not happen (``cloud_unknown``, ``rate_capped``...);
    None when serving locally was the plan."""


@dataclass(frozen=True)
class Offload:
    reason: OffloadReason


Route = Local | Offload


@dataclass(frozen=True)
class Decision:
    route: Route
    overflowing: bool
    """The hysteresis state after this decision."""
    predicted_wait_ms: float


def predicted_wait_ms(*, queue_items: int, request_items: int, ms_per_item: float) -> float:
    """Local completion estimate: everything queued plus this request, at the measured rate."""
    return (queue_items + request_items) * ms_per_item


def decide(
    *,
    queue_items: int,
    request_items: int,
    ms_per_item: float,
    deadline_ms: float | None,
    cloud: CloudView,
    tokens: float,
    overflowing: bool,
    policy: OffloadPolicy,
    policy_pick: bool = False,
) -> Decision:
    """Route one request. ``deadline_ms`` is the time left to its own deadline (None: none)."""
    wait = predicted_wait_ms(
        queue_items=queue_items, request_items=request_items, ms_per_item=ms_per_item
    )
    if overflowing:
        overflowing = wait > policy.exit_ratio * policy.slo_ms
    else:
        overflowing = wait >= policy.enter_ratio * policy.slo_ms
    reason: OffloadReason | None = None
    if deadline_ms is not None and wait > deadline_ms:
        reason = OffloadReason.DEADLINE
    elif overflowing:
        reason = OffloadReason.OVERFLOW
    elif policy_pick:
        reason = OffloadReason.POLICY
    route: Route
    if reason is None:
        route = Local()
    elif not policy.enabled:
        route = Local("disabled")
    elif not cloud.available:
        route = Local(f"cloud_{cloud.state.value}")
    elif deadline_ms is not None and cloud.est_wait_ms >= deadline_ms:
        route = Local("cloud_too_slow")
    elif tokens < 1.0:
        route = Local("rate_capped")
    else:
        route = Offload(reason)
    return Decision(route=route, overflowing=overflowing, predicted_wait_ms=wait)


def policy_pick(request_id: str, fraction: float) -> bool:
    """Deterministic sampling by request id, so a retried request lands on the same tier."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; time is passed in."""

    def __init__(
        self, *, rate_per_s: float, burst: int, now: float, tokens: float | None = None
    ) -> None:
        """``tokens``: saved up at ``now`` (None: a full bucket)."""
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._tokens = float(burst) if tokens is None else min(float(burst), tokens)
        self._at = now

    def level(self, now: float) -> float:
        elapsed = max(0.0, now - self._at)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
        self._at = max(self._at, now)
        return self._tokens

    def take(self, now: float) -> bool:
        if self.level(now) < 1.0:
            return False
        self._tokens -= 1.0
        return True


class OffloadController:
    """Hysteresis state, rate cap and counters around ``decide``; safe from any thread."""

    def __init__(self, policy: OffloadPolicy, *, now: float) -> None:
        self.policy = policy
        self._bucket = TokenBucket(rate_per_s=policy.rate_per_s, burst=policy.burst, now=now)
        self._lock = threading.Lock()
        self.overflowing = False
        self.decisions = 0
        self.offloads: Counter[str] = Counter()
        """Offloads by reason."""
        self.kept_local: Counter[str] = Counter()
        """Offloads wanted but not done, by why."""
        self.fell_back: Counter[str] = Counter()
        """Offloads that failed at the cloud and were served locally, by why."""

    def route(
        self,
        *,
        request_id: str,
        queue_items: int,
        request_items: int,
        ms_per_item: float,
        deadline_ms: float | None,
        cloud: CloudView,
        now: float,
    ) -> Decision:
        with self._lock:
            decision = decide(
                queue_items=queue_items,
                request_items=request_items,
                ms_per_item=ms_per_item,
                deadline_ms=deadline_ms,
                cloud=cloud,
                tokens=self._bucket.level(now),
                overflowing=self.overflowing,
                policy=self.policy,
                policy_pick=policy_pick(request_id, self.policy.policy_fraction),
            )
            self.overflowing = decision.overflowing
            self.decisions += 1
            route = decision.route
            if isinstance(route, Offload):
                self._bucket.take(now)
                self.offloads[route.reason.value] += 1
            elif route.why is not None:
                self.kept_local[route.why] += 1
            return decision

    def set_policy(self, policy: OffloadPolicy, *, now: float) -> None:
        """Use ``policy`` from the next decision on; the bucket keeps its saved tokens
        (capped at the new burst) and the hysteresis state is kept."""
        with self._lock:
            level = self._bucket.level(now)
            self.policy = policy
            self._bucket = TokenBucket(
                rate_per_s=policy.rate_per_s, burst=policy.burst, now=now, tokens=level
            )

    def fell_back_local(self, why: str) -> None:
        with self._lock:
            self.fell_back[why] += 1

    def snapshot(self) -> tuple[int, dict[str, int], dict[str, int], dict[str, int]]:
        """(decisions, offloads by reason, kept local by why, fell back by why)."""
        with self._lock:
            return (
                self.decisions,
                dict(self.offloads),
                dict(self.kept_local),
                dict(self.fell_back),
            )
