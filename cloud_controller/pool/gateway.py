"""The gateway's way into the pool: ``PoolClient`` and the ``POST /api/v1/embed`` route.

Clients without a device send texts to the controller; the controller publishes the same
``InferRequest`` an edge would (``device_id="gateway"``, QoS 1, MQTT v5 response topic and
correlation data) to the pool's shared queue and waits for the ``InferResponse``. It also
reads the retained ``PoolStatus`` and refuses at once (429) while the pool is not accepting.

``POST /api/v1/embed`` needs a viewer token (``ViewerDep``): it changes no state, it only
reads an answer. Whoever mounts ``pool_router`` puts a ``PoolClient`` on
``app.state.pool_client`` and starts it in the lifespan.

Errors a caller of ``PoolClient.embed`` gets::

    PoolError
    ├── PoolUnavailable   temporary: the pool is not accepting or answered ``overloaded`` (429)
    ├── PoolTimeout       temporary: no answer in time, or the deadline passed (504)
    ├── PoolRejected      permanent: the pool found the request invalid (422)
    └── PoolFailed        the pool answered ``error`` (502)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from cloud_controller.auth import ViewerDep
from protocol.codec import DecodeError, RejectCounter, decode, encode
from protocol.inference import MAX_TEXT_CHARS, MAX_TEXTS, InferRequest, InferResponse, InferStatus
from protocol.inference import PoolStatus as PoolStatusMessage
from protocol.messages import utc_now
from protocol.mqtt import InboundMessage, MqttClient, MqttError
from protocol.topics import QoS, Topics

logger = logging.getLogger(__name__)

GATEWAY_ID = "gateway"


class PoolError(Exception):
    http_status = 502


class PoolUnavailable(PoolError):
    http_status = 429


class PoolTimeout(PoolError):
    http_status = 504


class PoolRejected(PoolError):
    http_status = 422


class PoolFailed(PoolError):
    http_status = 502


class PoolClient:
    """Request/response over the broker; safe to share between requests of one event loop."""

    def __init__(
        self,
        mqtt: MqttClient,
        *,
        client_id: str,
        topics: Topics | None = None,
        sender_id: str = GATEWAY_ID,
        default_timeout_s: float = 30.0,
    ) -> None:
        self._mqtt = mqtt
        self._topics = topics or Topics()
        self._reply_topic = self._topics.replies(client_id)
        self._sender_id = sender_id
        self._default_timeout_s = default_timeout_s
        self._lock = threading.Lock()
        self._waiting: dict[bytes, tuple[asyncio.AbstractEventLoop, asyncio.Future[InferResponse]]]
        self._waiting = {}
        self._status: PoolStatusMessage | None = None
        self._rejects = RejectCounter()
        self.duplicates = 0
        """Answers that arrived for a request already answered (dropped)."""

    def start(self) -> None:
        self._mqtt.subscribe(self._reply_topic, self._on_reply, qos=QoS.AT_LEAST_ONCE)
        self._mqtt.subscribe(self._topics.pool_status(), self._on_status, qos=QoS.AT_LEAST_ONCE)
        self._mqtt.start()

    def stop(self) -> None:
        self._mqtt.stop()

    @property
    def status(self) -> PoolStatusMessage | None:
        """The pool's latest back-pressure signal, None before the first."""
        return self._status

    async def embed(
        self,
        texts: list[str],
        *,
        deadline_s: float | None = None,
        priority: int = 1,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> InferResponse:
        """Embed ``texts`` in the pool; returns the ``ok`` response or raises a ``PoolError``."""
        status = self._status
        if status is not None and not status.accepting:
            raise PoolUnavailable(
                f"pool not accepting (queue depth {status.queue_depth}, {status.replicas} replicas)"
            )
        request = InferRequest(
            device_id=self._sender_id,
            request_id=request_id or uuid.uuid4().hex,
            texts=texts,
            deadline=None if deadline_s is None else utc_now() + timedelta(seconds=deadline_s),
            priority=priority,
        )
        correlation = uuid.uuid4().bytes
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferResponse] = loop.create_future()
        with self._lock:
            self._waiting[correlation] = (loop, future)
        wait_s = timeout_s or (deadline_s + 1.0 if deadline_s else self._default_timeout_s)
        try:
            await asyncio.to_thread(
                self._mqtt.publish,
                self._topics.pool_requests(),
                encode(request),
                qos=QoS.AT_LEAST_ONCE,
                response_topic=self._reply_topic,
                correlation_data=correlation,
                expiry_s=max(1, int(wait_s) + 1),
                wait_s=min(wait_s, 10.0),
            )
            response = await asyncio.wait_for(future, timeout=wait_s)
        except MqttError as exc:
            raise PoolUnavailable(f"broker did not take the request: {exc}") from exc
        except TimeoutError as exc:
            raise PoolTimeout(f"no answer from the pool within {wait_s:.1f}s") from exc
        finally:
            with self._lock:
                self._waiting.pop(correlation, None)
        return _raise_for_status(response)

    def _on_reply(self, msg: InboundMessage) -> None:
        with self._lock:
            waiter = self._waiting.get(msg.correlation_data or b"")
        if waiter is None:
            self.duplicates += 1  # late, or a second answer: the first one counted
            return
        try:
            response = decode(msg.payload, InferResponse, max_bytes=4 * 1024 * 1024)
        except DecodeError as exc:
            self._rejects.reject("pool_replies", exc.reason, str(exc), topic=msg.topic)
            return
        loop, future = waiter
        loop.call_soon_threadsafe(_resolve, future, response)

    def _on_status(self, msg: InboundMessage) -> None:
        try:
            self._status = decode(msg.payload, PoolStatusMessage)
        except DecodeError as exc:
            self._rejects.reject("pool_status", exc.reason, str(exc), topic=msg.topic)


def _resolve(future: asyncio.Future[InferResponse], response: InferResponse) -> None:
    if not future.done():
        future.set_result(response)


def _raise_for_status(response: InferResponse) -> InferResponse:
    detail = response.detail or response.status.value
    if response.status == InferStatus.OK:
        return response
    if response.status == InferStatus.OVERLOADED:
        raise PoolUnavailable(detail)
    if response.status == InferStatus.DEADLINE_EXCEEDED:
        raise PoolTimeout(detail)
    if response.status == InferStatus.INVALID:
        raise PoolRejected(detail)
    raise PoolFailed(detail)


# -- HTTP -----------------------------------------------------------------------------------


class EmbedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1, max_length=MAX_TEXTS
    )
    deadline_ms: int | None = Field(default=None, ge=1, le=600_000)
    """Milliseconds from now after which the answer is useless; None: no deadline."""
    priority: int = Field(default=1, ge=0, le=9)
    """0 runs first."""


class EmbedOut(BaseModel):
    request_id: str
    status: InferStatus
    variant: str | None
    queued_ms: float
    compute_ms: float
    dim: int
    embeddings: list[list[float]]


def get_pool_client(request: Request) -> PoolClient:
    client = getattr(request.app.state, "pool_client", None)
    if not isinstance(client, PoolClient):
        raise HTTPException(status_code=503, detail="the overflow pool is not configured")
    return client


PoolClientDep = Annotated[PoolClient, Depends(get_pool_client)]

pool_router = APIRouter(prefix="/api/v1", tags=["pool"])


@pool_router.post("/embed", response_model=EmbedOut)
async def embed(body: EmbedIn, principal: ViewerDep, pool: PoolClientDep) -> EmbedOut:
    """Embed texts in the cloud pool (full-precision tensor-parallel MiniLM)."""
    try:
        response = await pool.embed(
            body.texts,
            deadline_s=None if body.deadline_ms is None else body.deadline_ms / 1000,
            priority=body.priority,
        )
    except PoolError as exc:
        raise HTTPException(status_code=exc.http_status, detail=str(exc)) from exc
    assert response.embeddings is not None
    rows = response.embeddings.to_array()
    return EmbedOut(
        request_id=response.request_id,
        status=response.status,
        variant=response.variant,
        queued_ms=response.queued_ms,
        compute_ms=response.compute_ms,
        dim=response.embeddings.dim,
        embeddings=rows.tolist(),
    )
