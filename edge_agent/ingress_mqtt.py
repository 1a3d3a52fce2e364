"""Local applications' MQTT door: ``InferRequest`` on the device's ``infer`` topic.

Each request must carry an MQTT v5 response topic; the ``InferResponse`` goes there
(QoS 1) with the request's correlation data. The handler runs on paho's network thread
and only hands the request to the serving loop; the answer is published from the loop
when the outcome is ready, so the network thread never waits for inference. Garbage
(undecodable, no response topic) is counted in ``RejectCounter`` and dropped; nothing here
raises into paho. This module knows no HTTP.
"""

from __future__ import annotations

import concurrent.futures
import logging

from edge_agent.clock import Clock
from edge_agent.eventloop import LoopThread
from edge_agent.serving import EmbedOutcome, EmbedRequest, ServingRuntime
from protocol.codec import DecodeError, RejectCounter, decode, encode
from protocol.inference import (
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    EmbeddingBlock,
    InferRequest,
    InferResponse,
)
from protocol.mqtt import BrokerClient, InboundMessage, MqttError
from protocol.topics import DeviceChannel, QoS, Topics

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = MAX_TEXTS * MAX_TEXT_CHARS * 4 + 64 * 1024
"""Largest acceptable request: every text at its limit in 4-byte UTF-8, plus the envelope."""


class MqttIngress:
    """Subscribes to ``{root}/devices/{id}/infer`` and answers on each response topic."""

    def __init__(
        self,
        *,
        runtime: ServingRuntime,
        loop: LoopThread,
        client: BrokerClient,
        device_id: str,
        topics: Topics,
        clock: Clock,
        rejects: RejectCounter,
    ) -> None:
        self._runtime = runtime
        self._loop = loop
        self._client = client
        self._device_id = device_id
        self._topic = topics.device(device_id, DeviceChannel.INFER)
        self._clock = clock
        self._rejects = rejects
        self.received = 0
        self.answered = 0
        self.unanswered = 0
        """Answers that could not be published (broker gone); the result is in the outbox."""

    def attach(self) -> None:
        self._client.subscribe(self._topic, self._on_request, qos=DeviceChannel.INFER.spec.qos)

    def _on_request(self, msg: InboundMessage) -> None:
        try:
            request = decode(msg.payload, InferRequest, max_bytes=MAX_REQUEST_BYTES)
        except DecodeError as exc:
            self._rejects.reject("infer", exc.reason, str(exc), topic=msg.topic)
            return
        if not msg.response_topic:
            self._rejects.reject("infer", "no_response_topic", request.request_id, topic=msg.topic)
            return
        self.received += 1
        deadline = None
        if request.deadline is not None:
            left_s = (request.deadline - self._clock.now()).total_seconds()
            deadline = self._clock.monotonic() + left_s
        future = self._loop.submit(
            self._runtime.serve(
                EmbedRequest(
                    request_id=request.request_id,
                    texts=request.texts,
                    priority=request.priority,
                    deadline=deadline,
                )
            )
        )
        reply_to, correlation = msg.response_topic, msg.correlation_data

        def answer(done: concurrent.futures.Future[EmbedOutcome]) -> None:
            try:
                outcome = done.result()
            except Exception:
                logger.exception("serving %s failed", request.request_id)
                return
            self._answer(outcome, reply_to, correlation)

        future.add_done_callback(answer)

    def _answer(self, outcome: EmbedOutcome, reply_to: str, correlation: bytes | None) -> None:
        response = InferResponse(
            device_id=self._device_id,
            sent_at=self._clock.now(),
            request_id=outcome.request_id,
            status=outcome.status,
            detail=outcome.detail,
            tier=outcome.tier,
            variant=outcome.variant,
            queued_ms=outcome.queued_ms,
            compute_ms=outcome.compute_ms,
            embeddings=(
                None
                if outcome.embeddings is None
                else EmbeddingBlock.from_array(outcome.embeddings)
            ),
        )
        try:
            self._client.publish(
                reply_to, encode(response), qos=QoS.AT_LEAST_ONCE, correlation_data=correlation
            )
        except MqttError as exc:
            self.unanswered += 1
            logger.warning("answer to %s not published: %s", outcome.request_id, exc)
            return
        self.answered += 1
