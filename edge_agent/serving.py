"""The inference runtime: one request in, one answer out, the result stored before it.

``ServingRuntime.serve`` is the single path every ingress (HTTP, MQTT, the benchmark)
goes through::

    route (offload.decide) --Offload--> cloud pool --fails--> (local)
          |                               \\--ok--> ResultWriter.commit --> answer
          \\--Local--> DynamicBatcher --> model thread --records--> commit thread (queue busy)
                                                 |  (next batch)       (outbox, fsync) --> answer
                                                 \\--(queue idle) outbox, fsync ------------> answer

When more work is queued, the model thread hands each batch's records straight to the
writer's commit thread and goes on with the next batch, so compute and fsync overlap.
When nothing else is waiting, it commits the batch itself: a lone request's answer then
crosses threads twice (loop -> model thread -> loop), its rows and its outbox seq
together. Either way an answer waits for its own record to be durable.

It never raises for one request's trouble: the outcome carries ``overloaded``,
``deadline_exceeded``, ``invalid`` or ``error`` with a detail. It runs on one asyncio loop
(``eventloop.LoopThread`` in the agent); the model runs on a worker thread, so the loop
keeps accepting while a batch computes. Batching itself is ``spillway.batching``.

``load_serving_model`` opens the configured variant through ``models.loader`` (signature,
digest, compatibility and a probe inference checked first) and turns its typed errors into
``ModelUnavailable``. This module knows no MQTT and no HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edge_agent.clock import Clock
from edge_agent.cloud import CloudClient, CloudRefused, CloudUnavailable
from edge_agent.metrics import ServingMetrics
from edge_agent.offload import Offload, OffloadController, OffloadPolicy
from edge_agent.outbox import OutboxError
from edge_agent.padding import PaddedEmbedder
from edge_agent.results import Done, ResultWriter, Stored, answer_on
from edge_agent.runtime_policy import batcher_settings, local_policy, runtime_offload
from edge_agent.settings import EdgeSettings
from protocol.inference import (
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    EmbeddingBlock,
    InferRequest,
    InferStatus,
    OffloadReason,
    ResultRecord,
    Tier,
)
from spillway.batching import (
    BatcherSettings,
    BatchingError,
    BatchShapeError,
    DeadlineExceeded,
    DynamicBatcher,
    Overloaded,
)

if TYPE_CHECKING:
    from models.loader import LoadedModel

logger = logging.getLogger(__name__)

Rows = npt.NDArray[np.float32]


class ServingError(RuntimeError):
    """The runtime cannot serve at all."""


class ModelUnavailable(ServingError):
    """The configured variant could not be loaded (``temporary``: worth retrying later)."""

    def __init__(self, message: str, *, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary


@dataclass(frozen=True)
class ServingModel:
    """What the runtime calls: texts -> ``(len(texts), dim)`` float32 rows."""

    variant: str
    device: str
    embed: Callable[[list[str]], Rows]


def load_serving_model(settings: EdgeSettings) -> ServingModel:
    """Verify and open ``settings.model_variant``; ``ModelUnavailable`` says why not."""
    from models.errors import ModelError, TemporaryModelError
    from models.loader import load_model
    from models.signing import keyring, load_public_key

    key_path = settings.public_key_file()
    try:
        key = load_public_key(key_path)
    except OSError as exc:
        raise ModelUnavailable(f"trusted key {key_path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # cryptography: bad PEM, not Ed25519
        raise ModelUnavailable(f"trusted key {key_path} is not an Ed25519 key: {exc}") from exc
    try:
        loaded = load_model(
            settings.variant_dir(),
            trusted_keys=keyring([key]),
            intra_op_threads=settings.intra_op_threads,
        )
    except ModelError as exc:
        raise ModelUnavailable(
            f"variant {settings.model_variant}: {exc}",
            temporary=isinstance(exc, TemporaryModelError),
        ) from exc
    return serving_model(loaded)


def serving_model(loaded: LoadedModel) -> ServingModel:
    """A loaded variant as the runtime calls it: length-grouped batches (``padding``)."""
    embed = PaddedEmbedder(
        loaded.tokenizer, loaded.backend, max_length=loaded.manifest.max_sequence_length
    )
    return ServingModel(variant=loaded.manifest.variant, device=loaded.device, embed=embed)


@dataclass(frozen=True)
class EmbedRequest:
    request_id: str
    texts: list[str]
    priority: int = 1
    """0 runs first ... 9."""
    deadline: float | None = None
    """On the runtime clock's ``monotonic``; None: no deadline."""


@dataclass(frozen=True)
class EmbedOutcome:
    request_id: str
    status: InferStatus
    tier: Tier
    variant: str | None = None
    queued_ms: float = 0.0
    compute_ms: float = 0.0
    latency_ms: float = 0.0
    embeddings: Rows | None = None
    offload_reason: OffloadReason | None = None
    detail: str | None = None
    seq: int | None = None
    """Outbox key of the stored result (status ok only)."""


@dataclass(eq=False)
class _Ticket:
    """One local request as the model thread sees it: enough to build and commit its record."""

    request_id: str
    started: float
    """``serve`` began (runtime clock ``monotonic``)."""
    submitted: float
    """Queued in the batcher."""
    done: Done
    """Settles the caller's commit future once the record is durable (commit thread)."""
    stored: Stored | None = None
    """Set by the model thread before the batch returns when it committed the record itself."""


@dataclass(frozen=True)
class _Text:
    text: str
    ticket: _Ticket


def invalid_texts(texts: object) -> str | None:
    """Why ``texts`` is not a servable list (the wire contract's bounds), else None."""
    if not isinstance(texts, list) or not texts:
        return "texts must be a non-empty list of strings"
    if len(texts) > MAX_TEXTS:
        return f"at most {MAX_TEXTS} texts per request, got {len(texts)}"
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            return f"texts[{i}] is not a string"
        if len(text) > MAX_TEXT_CHARS:
            return f"texts[{i}] has {len(text)} characters (max {MAX_TEXT_CHARS})"
    return None


class ServiceTime:
    """Exponentially weighted model time per text, in ms (0.0 until measured)."""

    def __init__(self, *, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._lock = threading.Lock()
        self.ms_per_item = 0.0

    def observe(self, *, items: int, elapsed_ms: float) -> None:
        if items <= 0:
            return
        sample = elapsed_ms / items
        with self._lock:
            if self.ms_per_item == 0.0:
                self.ms_per_item = sample
            else:
                self.ms_per_item += self._alpha * (sample - self.ms_per_item)


class ServingRuntime:
    """Routes, batches, stores and answers; ``start``/``stop``/``serve`` on one event loop."""

    def __init__(
        self,
        model: ServingModel,
        *,
        settings: EdgeSettings,
        writer: ResultWriter,
        cloud: CloudClient,
        metrics: ServingMetrics,
        clock: Clock,
        host_load: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.model = model
        self._settings = settings
        self._writer = writer
        self._cloud = cloud
        self.metrics = metrics
        self._clock = clock
        self.service_time = ServiceTime()
        policy = local_policy(settings)
        self.offload = OffloadController(runtime_offload(policy.offload), now=clock.monotonic())
        self._batcher: DynamicBatcher[_Text] = DynamicBatcher(
            self._run_batch, batcher_settings(policy.batching), clock=clock, host_load=host_load
        )
        self._cloud_timeout_s = settings.cloud_timeout_ms / 1000.0
        metrics.variant.info({"variant": model.variant, "device": model.device})
        metrics.on_scrape(self.refresh_gauges)
        self.on_served: list[Callable[[EmbedRequest, EmbedOutcome], None]] = []
        """Called on the loop with each answered request (``quality``); must not wait."""

    # -- lifecycle (on the loop) -----------------------------------------------------------

    async def start(self) -> None:
        self._batcher.start()
        self._writer.start()

    async def stop(self) -> None:
        await self._batcher.stop()
        await self._writer.stop()

    # -- inspection ------------------------------------------------------------------------

    @property
    def writer(self) -> ResultWriter:
        return self._writer

    @property
    def queued_items(self) -> int:
        return self._batcher.queued_items

    @property
    def batch_limit(self) -> int:
        return self._batcher.limit.limit

    @property
    def batcher_settings(self) -> BatcherSettings:
        return self._batcher.settings

    async def set_policy(self, batching: BatcherSettings, offload: OffloadPolicy) -> None:
        """Take new batching and offload values (on the loop, between batches)."""
        self._batcher.reconfigure(batching)
        self.offload.set_policy(offload, now=self._clock.monotonic())

    def refresh_gauges(self) -> None:
        self.metrics.queue_items.set(self.queued_items)
        self.metrics.batch_limit.set(self.batch_limit)
        decisions, offloads, _, _ = self.offload.snapshot()
        self.metrics.offload_ratio.set(sum(offloads.values()) / decisions if decisions else 0.0)

    def telemetry(self) -> dict[str, float]:
        decisions, offloads, kept, fell_back = self.offload.snapshot()
        out: dict[str, float] = {
            "queue_items": float(self.queued_items),
            "batch_limit": float(self.batch_limit),
            "max_batch_size": float(self._batcher.settings.max_batch_size),
            "service_ms_per_item": self.service_time.ms_per_item,
            "offload_ratio": sum(offloads.values()) / decisions if decisions else 0.0,
            "overflowing": 1.0 if self.offload.overflowing else 0.0,
        }
        for reason in OffloadReason:
            out[f"offloads_{reason.value}_total"] = float(offloads.get(reason.value, 0))
        for why, count in {**kept, **{f"fallback_{k}": v for k, v in fell_back.items()}}.items():
            out[f"offload_skipped_{why}_total"] = float(count)
        return out

    # -- the one path ------------------------------------------------------------------------

    async def serve(self, request: EmbedRequest) -> EmbedOutcome:
        started = self._clock.monotonic()
        problem = invalid_texts(request.texts)
        if problem is not None:
            outcome = EmbedOutcome(
                request.request_id, InferStatus.INVALID, Tier.EDGE, detail=problem
            )
        else:
            outcome = await self._route(request, started)
        if outcome.status is InferStatus.OK and outcome.seq is None:
            outcome = await self._store(outcome, started)  # served by the cloud
        latency_ms = (self._clock.monotonic() - started) * 1000.0
        outcome = replace(outcome, latency_ms=latency_ms)
        self.metrics.observe_request(
            status=outcome.status.value, tier=outcome.tier.value, latency_s=latency_ms / 1000.0
        )
        for hook in self.on_served:
            hook(request, outcome)
        return outcome

    async def _route(self, request: EmbedRequest, started: float) -> EmbedOutcome:
        deadline_ms = None
        if request.deadline is not None:
            deadline_ms = (request.deadline - started) * 1000.0
            if deadline_ms <= 0:
                return EmbedOutcome(
                    request.request_id,
                    InferStatus.DEADLINE_EXCEEDED,
                    Tier.EDGE,
                    detail="deadline already passed on arrival",
                )
        decision = self.offload.route(
            request_id=request.request_id,
            queue_items=self._batcher.queued_items,
            request_items=len(request.texts),
            ms_per_item=self.service_time.ms_per_item,
            deadline_ms=deadline_ms,
            cloud=self._cloud.view(started),
            now=started,
        )
        route = decision.route
        if isinstance(route, Offload):
            self.metrics.offloads.labels(reason=route.reason.value).inc()
            try:
                return await self._remote(request, route.reason, deadline_ms)
            except CloudUnavailable as exc:
                self.offload.fell_back_local(exc.why)
                self.metrics.kept_local.labels(why=f"fallback_{exc.why}").inc()
        elif route.why is not None:
            self.metrics.kept_local.labels(why=route.why).inc()
        return await self._local(request, started)

    async def _local(self, request: EmbedRequest, started: float) -> EmbedOutcome:
        """Batched on the model thread, which hands the rows straight to the commit thread;
        the answer waits for both the rows and their commit."""
        submitted = self._clock.monotonic()
        rid = request.request_id
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[int] = loop.create_future()
        ticket = _Ticket(rid, started, submitted, answer_on(loop, committed))
        try:
            result = await self._batcher.submit(
                [_Text(text, ticket) for text in request.texts],
                priority=request.priority,
                deadline=request.deadline,
            )
        except Overloaded as exc:
            return EmbedOutcome(rid, InferStatus.OVERLOADED, Tier.EDGE, detail=str(exc))
        except DeadlineExceeded as exc:
            return EmbedOutcome(rid, InferStatus.DEADLINE_EXCEEDED, Tier.EDGE, detail=str(exc))
        except BatchingError as exc:
            return EmbedOutcome(rid, InferStatus.ERROR, Tier.EDGE, detail=str(exc))
        total_ms = (self._clock.monotonic() - submitted) * 1000.0
        stored = ticket.stored  # committed on the model thread: no second wake-up
        try:
            seq = await committed if stored is None else stored
            if isinstance(seq, OutboxError):
                raise seq
        except OutboxError as exc:
            logger.error("result %s not stored: %s", rid, exc)
            return EmbedOutcome(
                rid,
                InferStatus.ERROR,
                Tier.EDGE,
                detail=f"result could not be stored durably: {exc}",
            )
        return EmbedOutcome(
            rid,
            InferStatus.OK,
            Tier.EDGE,
            variant=self.model.variant,
            queued_ms=result.queued_ms,
            compute_ms=max(0.0, total_ms - result.queued_ms),
            embeddings=result.rows,
            seq=seq,
        )

    async def _remote(
        self, request: EmbedRequest, reason: OffloadReason, deadline_ms: float | None
    ) -> EmbedOutcome:
        timeout_s = self._cloud_timeout_s
        deadline = None
        if deadline_ms is not None:
            timeout_s = min(timeout_s, deadline_ms / 1000.0)
            deadline = self._clock.now() + timedelta(milliseconds=deadline_ms)
        message = InferRequest(
            device_id=self._settings.device_id,
            sent_at=self._clock.now(),
            request_id=request.request_id,
            texts=request.texts,
            deadline=deadline,
            priority=request.priority,
            offload_reason=reason,
        )
        response = await self._cloud.infer(message, timeout_s=timeout_s)
        # The same request id is in the pool replica's "request answered" line.
        logger.info(
            "request offloaded",
            extra={
                "request_id": request.request_id,
                "reason": reason.value,
                "status": response.status.value,
                "replica": response.device_id,
            },
        )
        rows = None
        if response.embeddings is not None:
            rows = response.embeddings.to_array()
        if response.status is InferStatus.OK and (
            rows is None or rows.shape[0] != len(request.texts)
        ):
            raise CloudRefused(f"pool answered ok without {len(request.texts)} embeddings")
        return EmbedOutcome(
            request.request_id,
            response.status,
            Tier.CLOUD,
            variant=response.variant,
            queued_ms=response.queued_ms,
            compute_ms=response.compute_ms,
            embeddings=rows,
            offload_reason=reason,
            detail=response.detail,
        )

    async def _store(self, outcome: EmbedOutcome, started: float) -> EmbedOutcome:
        assert outcome.embeddings is not None
        record = ResultRecord(
            seq=1,  # replaced by the outbox key
            request_id=outcome.request_id,
            status=outcome.status,
            tier=outcome.tier,
            variant=outcome.variant,
            offload_reason=outcome.offload_reason,
            queued_ms=outcome.queued_ms,
            latency_ms=(self._clock.monotonic() - started) * 1000.0,
            served_at=self._clock.now(),
            embeddings=EmbeddingBlock.from_array(outcome.embeddings),
        )
        try:
            seq = await self._writer.commit(record)
        except OutboxError as exc:
            logger.error("result %s not stored: %s", outcome.request_id, exc)
            return replace(
                outcome,
                status=InferStatus.ERROR,
                embeddings=None,
                detail=f"result could not be stored durably: {exc}",
            )
        return replace(outcome, seq=seq)

    # -- worker thread -----------------------------------------------------------------------

    def swap_model(self, model: ServingModel) -> ServingModel:
        """Make ``model`` serve every batch that starts from now on; return the old one.

        One reference assignment: a batch already running finishes on the model it started
        with, queued and new requests go to ``model``, nothing is dropped or re-run.
        """
        previous, self.model = self.model, model
        self.metrics.variant.info({"variant": model.variant, "device": model.device})
        logger.info("model swapped", extra={"variant": model.variant, "previous": previous.variant})
        return previous

    def _run_batch(self, items: list[_Text]) -> Rows:
        """Compute one batch, get its records committed, return its rows.

        With more requests queued, the records go to the commit thread, which commits them
        while this thread starts the next batch. With none, this thread commits them
        itself before returning (nothing is waiting for it) and leaves each ticket its
        seq. Either way a caller is answered only once its own record is durable.
        """
        started = self._clock.monotonic()
        model = self.model  # read once: a swap during this batch does not touch it
        rows = model.embed([item.text for item in items])  # (B, dim)
        finished = self._clock.monotonic()
        elapsed_ms = (finished - started) * 1000.0
        self.service_time.observe(items=len(items), elapsed_ms=elapsed_ms)
        self.metrics.observe_batch(len(items))
        if rows.shape[0] != len(items):
            raise BatchShapeError(f"model returned {rows.shape[0]} rows for {len(items)} texts")
        served_at = self._clock.now()
        records: list[ResultRecord] = []
        tickets: list[_Ticket] = []
        start = 0
        while start < len(items):  # a request's texts are contiguous in the batch
            ticket = items[start].ticket
            end = start + 1
            while end < len(items) and items[end].ticket is ticket:
                end += 1
            records.append(
                ResultRecord(
                    seq=1,  # replaced by the outbox key
                    request_id=ticket.request_id,
                    status=InferStatus.OK,
                    tier=Tier.EDGE,
                    variant=model.variant,
                    offload_reason=None,
                    queued_ms=(started - ticket.submitted) * 1000.0,
                    latency_ms=(finished - ticket.started) * 1000.0,
                    served_at=served_at,
                    embeddings=EmbeddingBlock.from_array(rows[start:end]),
                )
            )
            tickets.append(ticket)
            start = end
        if self._batcher.queued_items:  # read across threads: a hint, either way is correct
            self._writer.submit(records, [t.done for t in tickets])
        else:
            for ticket, stored in zip(tickets, self._writer.write(records), strict=True):
                ticket.stored = stored
        return rows
