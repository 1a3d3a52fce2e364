"""One pool replica: a tensor-parallel group of ranks serving overflow requests from MQTT.

Ranks rendezvous through ``env://`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), so a replica is started the same way by the local supervisor, by
``torchrun --nproc-per-node=TP -m cloud_controller.pool.replica`` or in a Kubernetes pod.

* **Rank 0** connects to the broker as the replica's stable client id with a persistent
  session and manual acknowledgement, takes requests from the shared subscription, queues them
  in ``spillway.batching.DynamicBatcher``, and for each batch tokenizes, broadcasts
  ``[op, B, T]`` then the stacked ``(2, B, T)`` ids/mask to the other ranks, runs its shard,
  and answers. A request is acknowledged (PUBACK) only after its answer's PUBACK came back,
  so a replica killed at any point leaves its unfinished requests with the broker, which
  redelivers them to the restarted replica (same client id, ``clean_start=False``).
* **Other ranks** loop on the broadcast, run their shard (taking part in the all-reduces),
  and stop on the ``STOP`` header.

A failed collective means a peer died: rank 0 exits at once (``EXIT_GROUP_BROKEN``) without
acknowledging anything, and the supervisor restarts the whole group. A request that expired
is answered ``deadline_exceeded`` without being computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from cloud_controller.pool.answered import AnsweredStore
from cloud_controller.pool.backpressure import ReplicaLoad, replica_load_topic
from cloud_controller.pool.metrics import PoolMetrics, serve_metrics
from cloud_controller.pool.settings import PoolSettings
from cloud_controller.pool.tensor_parallel import (
    TPContext,
    TPSentenceEncoder,
    build_tp_encoder,
    init_tp_group,
)
from models.tokenization import EmbeddingTokenizer, load_tokenizer
from protocol.codec import DecodeError, RejectCounter, decode, encode
from protocol.inference import EmbeddingBlock, InferRequest, InferResponse, InferStatus, Tier
from protocol.messages import utc_now
from protocol.mqtt import InboundMessage, MqttClient, MqttError
from protocol.topics import QoS, Topics
from spillway.batching import (
    BatchingError,
    DeadlineExceeded,
    DynamicBatcher,
    MonotonicClock,
    Overloaded,
)

logger = logging.getLogger(__name__)

OP_STOP, OP_BATCH, OP_NOOP = 0, 1, 2
EXIT_GROUP_BROKEN = 70
"""Exit status of a rank whose collective failed (a peer died or hung)."""
VARIANT_PREFIX = "minilm-tp"


def variant_name(tp: int, dtype: str) -> str:
    return f"{VARIANT_PREFIX}{tp}-{dtype}"


class GroupEngine:
    """Rank 0's side of the group: tokenize, broadcast, compute its shard, return ``(B, C)``.

    Every collective runs under one lock, so batches and idle heartbeats never interleave.
    """

    def __init__(
        self,
        model: TPSentenceEncoder,
        ctx: TPContext,
        tokenizer: EmbeddingTokenizer,
        *,
        device: torch.device,
        on_broken: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._model = model
        self._ctx = ctx
        self._tokenizer = tokenizer
        self._device = device
        self._lock = threading.Lock()
        self._on_broken = on_broken or _exit_group_broken
        self.last_collective = time.monotonic()
        self.per_item_ms = 0.0
        self.last_compute_ms = 0.0

    def _header(self, op: int, batch: int = 0, seq_len: int = 0) -> None:
        header = torch.tensor([op, batch, seq_len], dtype=torch.int64, device=self._device)
        dist.broadcast(header, src=0, group=self._ctx.group)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        ids, mask = self._tokenizer.encode_batch(texts)  # (B, T) each; errors stay per-batch
        inputs = torch.from_numpy(np.stack([ids, mask])).to(self._device)  # (2, B, T)
        with self._lock:
            started = time.perf_counter()
            try:
                if self._ctx.world_size > 1:
                    self._header(OP_BATCH, *ids.shape)
                    dist.broadcast(inputs, src=0, group=self._ctx.group)
                with torch.inference_mode():
                    out = self._model(inputs[0], inputs[1])  # (B, C)
                rows = out.float().cpu().numpy()
            except Exception as exc:  # a collective failed: the group is unusable
                self._on_broken(exc)
                raise
            self.last_collective = time.monotonic()
        self.last_compute_ms = (time.perf_counter() - started) * 1000
        per_item = self.last_compute_ms / max(1, len(texts))
        self.per_item_ms = (
            per_item if self.per_item_ms == 0 else 0.8 * self.per_item_ms + 0.2 * per_item
        )
        return np.asarray(rows, dtype=np.float32)

    def heartbeat(self, idle_s: float) -> None:
        """An empty broadcast if the group has been idle ``idle_s``: peers stay in step."""
        if self._ctx.world_size == 1 or time.monotonic() - self.last_collective < idle_s:
            return
        with self._lock:
            try:
                self._header(OP_NOOP)
            except Exception as exc:
                self._on_broken(exc)
                raise
            self.last_collective = time.monotonic()

    def stop_followers(self) -> None:
        if self._ctx.world_size > 1:
            with self._lock, contextlib.suppress(Exception):
                self._header(OP_STOP)


def _exit_group_broken(exc: BaseException) -> None:
    logger.critical("collective failed; exiting so the replica restarts: %s", exc)
    logging.shutdown()
    os._exit(EXIT_GROUP_BROKEN)


def follow(model: TPSentenceEncoder, ctx: TPContext, *, device: torch.device) -> None:
    """Ranks > 0: run every batch rank 0 broadcasts until ``OP_STOP``."""
    while True:
        header = torch.empty(3, dtype=torch.int64, device=device)
        dist.broadcast(header, src=0, group=ctx.group)
        op, batch, seq_len = (int(v) for v in header.tolist())
        if op == OP_STOP:
            return
        if op == OP_NOOP:
            continue
        inputs = torch.empty((2, batch, seq_len), dtype=torch.int64, device=device)  # (2, B, T)
        dist.broadcast(inputs, src=0, group=ctx.group)
        with torch.inference_mode():
            model(inputs[0], inputs[1])  # all-reduces happen inside; the output is rank 0's


class ReplicaServer:
    """Rank 0's MQTT side: consume, deduplicate, batch, answer, acknowledge."""

    def __init__(
        self,
        settings: PoolSettings,
        engine: GroupEngine,
        *,
        replica_id: str,
        answered: AnsweredStore,
        variant: str,
        metrics: PoolMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._replica_id = replica_id
        self._answered = answered
        self._variant = variant
        self._topics = Topics(settings.topic_root)
        self._mqtt = MqttClient(settings.mqtt(replica_id, manual_ack=True))
        self.metrics = metrics or PoolMetrics()
        self._mqtt.add_connect_hook(lambda _: self.metrics.on_connect(self._mqtt.connects))
        self._batcher: DynamicBatcher[str] = DynamicBatcher(self._embed, settings.batcher())
        self._clock = MonotonicClock()
        self._rejects = RejectCounter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[str, list[Callable[[], None]]] = {}  # message_id -> acks
        self._computing: dict[str, asyncio.Future[InferResponse]] = {}  # request_id -> answer
        self._outstanding_items = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._load_changed = asyncio.Event()
        self._accepting = True
        self.answered_count = 0
        self.computed_count = 0
        self.metrics.watch_queue(lambda: self._outstanding_items, lambda: len(self._computing))

    def _embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        self.metrics.batch_items.observe(len(texts))
        return self._engine.embed(texts)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._batcher.start()
        self._mqtt.subscribe(
            self._topics.pool_requests_shared(), self._on_message, qos=QoS.AT_LEAST_ONCE
        )
        self._mqtt.start()
        reporter = asyncio.create_task(self._report_load(stop))
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        logger.info("replica serving", extra={"replica_id": self._replica_id})
        await stop.wait()
        self._accepting = False  # new deliveries stay unacknowledged: redelivered later
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(), timeout=self._settings.publish_timeout_s)
        for task in (reporter, heartbeat):
            task.cancel()
        await asyncio.gather(reporter, heartbeat, return_exceptions=True)
        await self._batcher.stop()
        self._mqtt.stop(before_disconnect=lambda: self._publish_load(ready=False))
        await asyncio.to_thread(self._engine.stop_followers)
        self._answered.close()

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self._settings.heartbeat_s / 2)
            await asyncio.to_thread(self._engine.heartbeat, self._settings.heartbeat_s)

    async def _report_load(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._publish_load(ready=True)
            self._load_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._load_changed.wait(), timeout=self._settings.load_interval_s
                )
            await asyncio.sleep(0.05)  # at most ~20 reports a second under churn

    def _publish_load(self, *, ready: bool) -> None:
        load = ReplicaLoad(
            device_id=self._replica_id,
            ready=ready,
            tp=self._settings.tp,
            outstanding_requests=len(self._computing),
            outstanding_items=self._outstanding_items,
            per_item_ms=round(self._engine.per_item_ms, 3),
            answered=self.answered_count,
            computed=self.computed_count,
        )
        with contextlib.suppress(MqttError):
            self._mqtt.publish(
                replica_load_topic(self._topics, self._replica_id),
                encode(load),
                qos=QoS.AT_MOST_ONCE,
            )

    # -- requests ----------------------------------------------------------------------

    def _on_message(self, msg: InboundMessage) -> None:
        """Network thread: hand the message to the event loop (acknowledged later)."""
        loop = self._loop
        if loop is None or not self._accepting:
            return  # not acknowledged: the broker keeps it for this session
        loop.call_soon_threadsafe(self._spawn, msg)

    def _spawn(self, msg: InboundMessage) -> None:
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: InboundMessage) -> None:
        ack = msg.ack or (lambda: None)
        started = time.monotonic()
        try:
            request = decode(msg.payload, InferRequest)
        except DecodeError as exc:
            self._rejects.reject("pool_requests", exc.reason, str(exc), topic=msg.topic)
            if msg.response_topic:
                refusal = self._response("unknown", InferStatus.INVALID, detail=str(exc)[:2000])
                if not await self._publish(msg, encode(refusal)):
                    return
            ack()
            return
        if msg.response_topic is None:
            self._rejects.reject("pool_requests", "no_response_topic", "", topic=msg.topic)
            ack()
            return
        if self._answered.message_answered(request.message_id):
            ack()  # a redelivery of a message already answered: the answer went out
            return
        acks = self._inflight.get(request.message_id)
        if acks is not None:
            acks.append(ack)  # redelivered after a reconnect while still being handled
            return
        self._inflight[request.message_id] = acks = [ack]
        try:
            response = await self._answer(request)
            payload = encode(response)
            if not await self._publish(msg, payload):
                return  # not acknowledged: redelivered after the broker link is back
            self._answered.record(
                message_id=request.message_id,
                request_id=request.request_id,
                response=payload if response.status == InferStatus.OK else None,
            )
        finally:
            self._inflight.pop(request.message_id, None)
            self._load_changed.set()
        self.answered_count += 1
        latency_s = time.monotonic() - started
        self.metrics.observe(status=response.status.value, latency_s=latency_s)
        # The request id the device gave: the same id is in the agent's log line.
        logger.info(
            "request answered",
            extra={
                "request_id": request.request_id,
                "device_id": request.device_id,
                "status": response.status.value,
                "texts": len(request.texts),
                "latency_ms": round(latency_s * 1000, 3),
            },
        )
        for each in acks:
            each()

    async def _answer(self, request: InferRequest) -> InferResponse:
        """The response: from cache, refused, or computed (at most once per request id)."""
        cached = self._answered.response_for(request.request_id)
        if cached is not None:
            return _from_cache(InferResponse.model_validate_json(cached))
        if request.request_id in self._computing:  # the same request id is computing now
            first = await asyncio.shield(self._computing[request.request_id])
            if first.status == InferStatus.OK:
                return _from_cache(first)
        future: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        self._computing[request.request_id] = future
        items = len(request.texts)
        self._outstanding_items += items
        self._load_changed.set()
        try:
            response = await self._compute(request)
            future.set_result(response)
            return response
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            self._outstanding_items -= items
            del self._computing[request.request_id]

    async def _compute(self, request: InferRequest) -> InferResponse:
        deadline: float | None = None
        if request.deadline is not None:
            remaining_s = (request.deadline - utc_now()).total_seconds()
            if remaining_s <= 0:
                return self._response(
                    request.request_id,
                    InferStatus.DEADLINE_EXCEEDED,
                    detail="deadline passed before the pool received the request",
                )
            deadline = self._clock.monotonic() + remaining_s
        try:
            result = await self._batcher.submit(
                request.texts, priority=request.priority, deadline=deadline
            )
        except DeadlineExceeded as exc:
            return self._response(
                request.request_id, InferStatus.DEADLINE_EXCEEDED, detail=str(exc)
            )
        except Overloaded as exc:
            return self._response(request.request_id, InferStatus.OVERLOADED, detail=str(exc))
        except BatchingError as exc:
            return self._response(request.request_id, InferStatus.ERROR, detail=str(exc)[:2000])
        self.computed_count += 1
        return self._response(
            request.request_id,
            InferStatus.OK,
            queued_ms=max(0.0, result.queued_ms),
            compute_ms=self._engine.last_compute_ms,
            embeddings=EmbeddingBlock.from_array(result.rows),
        )

    def _response(self, request_id: str, status: InferStatus, **fields: Any) -> InferResponse:
        return InferResponse(
            device_id=self._replica_id,
            request_id=request_id,
            status=status,
            tier=Tier.CLOUD,
            variant=self._variant,
            **fields,
        )

    async def _publish(self, msg: InboundMessage, payload: bytes) -> bool:
        """Publish an answer and wait for the broker's PUBACK; False if that failed."""
        assert msg.response_topic is not None
        try:
            await asyncio.to_thread(
                self._mqtt.publish,
                msg.response_topic,
                payload,
                qos=QoS.AT_LEAST_ONCE,
                correlation_data=msg.correlation_data,
                wait_s=self._settings.publish_timeout_s,
            )
        except MqttError as exc:
            logger.warning("answer not published; the request will be redelivered: %s", exc)
            return False
        return True


def _from_cache(previous: InferResponse) -> InferResponse:
    """A response already computed, as a new message (the embeddings are the same)."""
    return previous.model_copy(
        update={
            "message_id": uuid.uuid4().hex,
            "sent_at": utc_now(),
            "detail": "answered from cache",
            "queued_ms": 0.0,
            "compute_ms": 0.0,
        }
    )


# -- process entry ------------------------------------------------------------------------


def rank_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as torchrun sets them; a lone process is rank 0 of 1."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world_size, local_rank


def serve_rank(settings: PoolSettings, *, checkpoint: Path | None = None) -> int:
    """Run this process's rank of a replica until SIGTERM/SIGINT (rank 0) or ``OP_STOP``."""
    rank, world_size, local_rank = rank_from_env()
    if world_size != settings.tp:
        raise ValueError(f"WORLD_SIZE {world_size} differs from the configured TP {settings.tp}")
    device = torch.device("cuda", local_rank) if settings.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(settings.torch_threads(ranks_on_host=settings.tp * settings.replicas))
    ctx = init_tp_group(
        rank=rank,
        world_size=world_size,
        device=device,
        timeout_s=settings.collective_timeout_s,
    )
    dtype = getattr(torch, settings.dtype)
    model = build_tp_encoder(ctx, checkpoint=checkpoint, device=device, dtype=dtype)
    try:
        if rank != 0:
            follow(model, ctx, device=device)
            return 0
        replica_id = settings.own_replica_id()
        metrics = PoolMetrics()
        if settings.metrics_port is not None:
            serve_metrics(
                metrics, host=settings.metrics_host or "0.0.0.0", port=settings.metrics_port
            )
        engine = GroupEngine(model, ctx, load_tokenizer(checkpoint), device=device)
        store = AnsweredStore(
            settings.state_dir / replica_id / "answered.sqlite",
            capacity=settings.answered_capacity,
        )
        server = ReplicaServer(
            settings,
            engine,
            replica_id=replica_id,
            answered=store,
            variant=variant_name(settings.tp, settings.dtype),
            metrics=metrics,
        )
        asyncio.run(_serve_until_signal(server))
        return 0
    finally:
        if world_size > 1 and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


async def _serve_until_signal(server: ReplicaServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.run(stop)


def main() -> None:
    """Entry of ``python -m cloud_controller.pool.replica`` and of ``torchrun ... -m`` it."""
    from spillway.logs import configure_json_logging

    configure_json_logging("pool-replica")
    raise SystemExit(serve_rank(PoolSettings()))


if __name__ == "__main__":
    main()
