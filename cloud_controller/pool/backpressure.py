"""The pool's back-pressure signal: replicas report their load, the supervisor sums it up.

Each replica's rank 0 publishes a ``ReplicaLoad`` (QoS 0, every ``load_interval_s`` and when
its queue changes). The supervisor keeps the latest per replica, drops replicas silent for
``stale_after_s``, and publishes one retained ``PoolStatus``:

* ``queue_depth`` — requests received by replicas and not yet answered;
* ``est_wait_ms`` — queued texts * measured per-text service time / live replicas;
* ``accepting`` — False with no live replica, or above ``high_water_items`` per replica.

``pool_status`` is pure (tested without a broker). Requests the broker still holds for a
replica beyond its in-flight window are not visible to anyone but the broker; with
Spillway's ``max_inflight_messages 100`` a replica sees up to 100 requests at once.

TODO(lead): move ``ReplicaLoad`` to ``protocol/inference.py`` and the two topic builders to
``protocol.topics.Topics`` (``pool_replica_load(replica_id)``, ``all_pool_replica_loads()``);
they are defined here so the pool could land without touching ``protocol/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from protocol.inference import PoolStatus
from protocol.messages import Envelope
from protocol.topics import Topics, validate_device_id

POOL_ID = "pool"
"""``device_id`` of the pool's own messages (``PoolStatus``)."""


class ReplicaLoad(Envelope):
    """One replica's load; ``device_id`` is the replica's MQTT client id."""

    kind: Literal["pool_replica_load"] = "pool_replica_load"
    ready: bool
    """The model is loaded and the replica takes requests."""
    tp: int = Field(ge=1)
    outstanding_requests: int = Field(ge=0)
    """Requests received and not yet answered (queued or computing)."""
    outstanding_items: int = Field(ge=0)
    """Texts in those requests."""
    per_item_ms: float = Field(ge=0)
    """Measured compute time per text (moving average); 0 before the first batch."""
    answered: int = Field(ge=0)
    """Requests answered since the replica started (computed, cached or refused)."""
    computed: int = Field(ge=0)
    """Requests whose embeddings this replica computed since it started."""


def replica_load_topic(topics: Topics, replica_id: str) -> str:
    return f"{topics.root}/pool/replicas/{validate_device_id(replica_id)}/load"


def all_replica_loads(topics: Topics) -> str:
    return f"{topics.root}/pool/replicas/+/load"


@dataclass(frozen=True)
class SeenLoad:
    load: ReplicaLoad
    received_at: float
    """Supervisor's monotonic clock when it arrived (replica clocks are not trusted)."""


DEFAULT_PER_ITEM_MS = 20.0
"""Per-text service time assumed before any replica has measured one."""


def pool_status(
    seen: Iterable[SeenLoad],
    *,
    now: float,
    stale_after_s: float,
    high_water_items: int,
) -> PoolStatus:
    """The pool-wide signal from the latest load of each replica."""
    live = [s.load for s in seen if s.load.ready and now - s.received_at <= stale_after_s]
    items = sum(load.outstanding_items for load in live)
    measured = [load.per_item_ms for load in live if load.per_item_ms > 0]
    per_item_ms = sum(measured) / len(measured) if measured else DEFAULT_PER_ITEM_MS
    replicas = len(live)
    est_wait_ms = items * per_item_ms / replicas if replicas else 0.0
    return PoolStatus(
        device_id=POOL_ID,
        accepting=replicas > 0 and items < high_water_items * replicas,
        queue_depth=sum(load.outstanding_requests for load in live),
        est_wait_ms=round(est_wait_ms, 1),
        replicas=replicas,
    )


def same_signal(a: PoolStatus | None, b: PoolStatus) -> bool:
    """Whether ``b`` says nothing new compared with ``a`` (envelope fields aside)."""
    return a is not None and (a.accepting, a.queue_depth, a.replicas) == (
        b.accepting,
        b.queue_depth,
        b.replicas,
    )
