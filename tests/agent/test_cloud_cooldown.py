"""The cloud cool-down grows while the pool keeps failing and resets on an answer
(``edge_agent.cloud.MqttCloudClient``, with a broker client that never answers)."""

from __future__ import annotations

import asyncio
from typing import Any

from edge_agent.cloud import CloudTimeout, MqttCloudClient
from edge_agent.offload import CloudState
from protocol.codec import RejectCounter, encode
from protocol.inference import InferRequest, InferResponse, InferStatus, PoolStatus
from protocol.mqtt import InboundMessage
from protocol.topics import Topics
from tests.agent.helpers import FakeClock


class _SilentBroker:
    """Takes publishes, answers only when told to."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.published: list[tuple[str, bytes | None]] = []

    def subscribe(self, topic_filter: str, handler: Any, *, qos: Any = None) -> None:
        self.handlers[topic_filter] = handler

    def publish(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        self.published.append((topic, kwargs.get("correlation_data")))


def _cloud() -> tuple[MqttCloudClient, _SilentBroker, FakeClock]:
    broker, clock = _SilentBroker(), FakeClock()
    cloud = MqttCloudClient(
        broker,
        device_id="dev-1",
        topics=Topics(),
        connected=lambda: True,
        clock=clock,
        cooldown_s=8.0,
        cooldown_min_s=1.0,
        rejects=RejectCounter(),
    )
    cloud.attach()
    status = PoolStatus(device_id="pool", accepting=True, queue_depth=0, est_wait_ms=1, replicas=1)
    broker.handlers[Topics().pool_status()](
        InboundMessage(Topics().pool_status(), encode(status), qos=1, retain=True)
    )
    return cloud, broker, clock


def _request(i: int) -> InferRequest:
    return InferRequest(device_id="dev-1", request_id=f"r{i}", texts=["a"])


def _time_out(cloud: MqttCloudClient) -> None:
    try:
        asyncio.run(cloud.infer(_request(0), timeout_s=0.01))
    except CloudTimeout:
        return
    raise AssertionError("the silent pool answered")


def _cool_for(cloud: MqttCloudClient, clock: FakeClock) -> float:
    """Seconds until the cloud is available again (0.25 s steps)."""
    waited = 0.0
    while cloud.view(clock.monotonic()).state is CloudState.UNAVAILABLE:
        clock.advance(0.25)
        waited += 0.25
    return waited


def test_cooldown_doubles_per_failure_up_to_its_maximum() -> None:
    cloud, _, clock = _cloud()
    assert cloud.view(clock.monotonic()).available
    cools = []
    for _ in range(5):
        _time_out(cloud)
        cools.append(_cool_for(cloud, clock))
    assert cools == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_failures_within_one_cooldown_do_not_grow_it() -> None:
    cloud, _, clock = _cloud()
    _time_out(cloud)
    _time_out(cloud)  # in flight together: the same episode
    _time_out(cloud)
    assert _cool_for(cloud, clock) == 1.0


def test_an_answer_resets_the_cooldown() -> None:
    cloud, broker, clock = _cloud()
    for _ in range(3):
        _time_out(cloud)
        _cool_for(cloud, clock)

    async def answered() -> InferResponse:
        task = asyncio.ensure_future(cloud.infer(_request(1), timeout_s=5))
        await asyncio.sleep(0)
        topic, correlation = broker.published[-1]
        reply = InferResponse(
            device_id="pool", request_id="r1", status=InferStatus.OK, tier="cloud"
        )
        broker.handlers[Topics().replies("dev-1")](
            InboundMessage(topic, encode(reply), qos=1, retain=False, correlation_data=correlation)
        )
        return await task

    assert asyncio.run(answered()).status is InferStatus.OK
    _time_out(cloud)
    assert _cool_for(cloud, clock) == 1.0
