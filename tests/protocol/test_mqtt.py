"""The paho adapter against a real mosquitto."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol.mqtt import (
    InboundMessage,
    MqttClient,
    MqttSettings,
    NotConnected,
    Will,
)
from protocol.topics import QoS
from sim.broker import MosquittoBroker


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def clients(broker: MosquittoBroker) -> Iterator[Callable[..., MqttClient]]:
    made: list[MqttClient] = []

    def make(client_id: str, *, will: Will | None = None, keepalive_s: int = 5) -> MqttClient:
        settings = MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            keepalive_s=keepalive_s,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        )
        client = MqttClient(settings, will=will)
        client.start()
        assert client.wait_connected(5)
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


def test_publish_subscribe_with_response_topic(clients: Callable[..., MqttClient]) -> None:
    server, caller = clients("server"), clients("caller")
    got: list[InboundMessage] = []

    def answer(msg: InboundMessage) -> None:
        assert msg.response_topic is not None
        server.publish(
            msg.response_topic,
            msg.payload.upper(),
            qos=QoS.AT_LEAST_ONCE,
            correlation_data=msg.correlation_data,
        )

    server.subscribe("req", answer, qos=QoS.AT_LEAST_ONCE)
    caller.subscribe("resp/caller", got.append, qos=QoS.AT_LEAST_ONCE)
    time.sleep(0.2)
    caller.publish(
        "req",
        b"ping",
        qos=QoS.AT_LEAST_ONCE,
        response_topic="resp/caller",
        correlation_data=b"c-42",
        expiry_s=30,
        wait_s=5,
    )
    assert wait_for(lambda: len(got) == 1)
    assert got[0].payload == b"PING" and got[0].correlation_data == b"c-42"


def test_shared_subscription_spreads_work(clients: Callable[..., MqttClient]) -> None:
    counts = {"w1": 0, "w2": 0}
    lock = threading.Lock()

    def worker(name: str) -> Callable[[InboundMessage], None]:
        def handle(_: InboundMessage) -> None:
            with lock:
                counts[name] += 1

        return handle

    for name in counts:
        clients(name).subscribe("$share/pool/jobs", worker(name), qos=QoS.AT_LEAST_ONCE)
    producer = clients("producer")
    time.sleep(0.2)
    for i in range(40):
        producer.publish("jobs", str(i).encode(), qos=QoS.AT_LEAST_ONCE)
    assert wait_for(lambda: sum(counts.values()) == 40)
    assert counts["w1"] > 0 and counts["w2"] > 0  # each job once, to one worker


def test_will_is_published_when_link_dies(clients: Callable[..., MqttClient]) -> None:
    watcher = clients("watcher")
    seen: list[InboundMessage] = []
    watcher.subscribe("status/dev", seen.append, qos=QoS.AT_LEAST_ONCE)
    dev = clients("dev", will=Will("status/dev", b"offline", QoS.AT_LEAST_ONCE, retain=True))
    time.sleep(0.2)
    dev._stopping.set()  # no reconnect, no DISCONNECT: the socket just dies
    sock = dev._client.socket()
    assert sock is not None
    sock.close()
    assert wait_for(lambda: any(m.payload == b"offline" for m in seen), timeout_s=10)


def test_reconnects_after_broker_restart_and_keeps_qos1(
    broker: MosquittoBroker, clients: Callable[..., MqttClient]
) -> None:
    sub, pub = clients("sub"), clients("pub")
    got: list[bytes] = []
    sub.subscribe("t", lambda m: got.append(m.payload), qos=QoS.AT_LEAST_ONCE)
    time.sleep(0.2)
    broker.stop()
    assert wait_for(lambda: not pub.is_connected)
    with pytest.raises(NotConnected):
        pub.publish("t", b"lost-qos0", qos=QoS.AT_MOST_ONCE)
    pub.publish("t", b"kept-qos1", qos=QoS.AT_LEAST_ONCE)  # queued by the adapter
    broker.start()
    assert wait_for(lambda: pub.is_connected and sub.is_connected, timeout_s=15)
    assert wait_for(lambda: b"kept-qos1" in got, timeout_s=10)
    assert pub.connects >= 2 and sub.connects >= 2
    assert b"lost-qos0" not in got


def _burst(broker: MosquittoBroker, total: int) -> set[int]:
    """A slow subscriber stalls while ``total`` QoS 1 messages are published, then drains."""
    published = threading.Event()
    received: set[int] = set()
    lock = threading.Lock()
    base = dict(host=broker.host, port=broker.port, keepalive_s=60)
    sub = MqttClient(MqttSettings(client_id="slow", **base))  # type: ignore[arg-type]

    def slow(msg: InboundMessage) -> None:
        published.wait(120)  # the first message blocks the consumer until the burst is in
        with lock:
            received.add(int(msg.payload))

    sub.subscribe("burst", slow, qos=QoS.AT_LEAST_ONCE)
    sub.start()
    pub = MqttClient(MqttSettings(client_id="fast", **base))  # type: ignore[arg-type]
    pub.start()
    try:
        assert sub.wait_connected(5) and pub.wait_connected(5)
        time.sleep(0.3)
        for i in range(total - 1):
            pub.publish("burst", str(i).encode(), qos=QoS.AT_LEAST_ONCE)
        pub.publish("burst", str(total - 1).encode(), qos=QoS.AT_LEAST_ONCE, wait_s=120)
        published.set()
        last, still_since = -1, time.monotonic()
        while len(received) < total and time.monotonic() - still_since < 3.0:
            if len(received) != last:  # drain until complete or nothing arrives for 3 s
                last, still_since = len(received), time.monotonic()
            time.sleep(0.05)
        return received
    finally:
        published.set()
        pub.stop()
        sub.stop()


def test_slow_consumer_loses_nothing_from_a_20000_qos1_burst(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path / "limits") as broker:
        assert len(_burst(broker, 20_000)) == 20_000


def test_mosquitto_defaults_would_have_dropped_some(tmp_path: Path) -> None:
    """The same burst on mosquitto's defaults loses messages: the limits are what fix it."""
    with MosquittoBroker(tmp_path / "defaults", limits=False) as broker:
        assert len(_burst(broker, 5_000)) < 5_000


def test_a_backlog_arrives_whole_and_in_order(broker: MosquittoBroker) -> None:
    """3,000 QoS 1 messages queued for an offline session: each reaches the matching
    handler once and in order, none reaches the other one."""
    settings = MqttSettings(host=broker.host, port=broker.port, client_id="backlog")
    got: list[bytes] = []
    stray: list[InboundMessage] = []

    def subscriber() -> MqttClient:
        client = MqttClient(settings)
        client.subscribe(
            "burst/+", lambda message: got.append(message.payload), qos=QoS.AT_LEAST_ONCE
        )
        client.subscribe("other/#", stray.append, qos=QoS.AT_LEAST_ONCE)
        client.start()
        assert client.wait_connected(5)
        return client

    first = subscriber()
    producer = MqttClient(
        MqttSettings(host=broker.host, port=broker.port, client_id="backlog-producer")
    )
    producer.start()
    try:
        assert producer.wait_connected(5)
        producer.publish("burst/probe", b"probe", qos=QoS.AT_LEAST_ONCE)
        assert wait_for(lambda: got == [b"probe"])  # subscribed
        first.stop()
        for i in range(3000):
            producer.publish(f"burst/{i % 50}", str(i).encode(), qos=QoS.AT_LEAST_ONCE)
        producer.publish("burst/last", b"last", qos=QoS.AT_LEAST_ONCE, wait_s=30)
    finally:
        producer.stop()
    second = subscriber()
    try:
        assert wait_for(lambda: len(got) >= 3002, timeout_s=30)
    finally:
        second.stop()
    assert got == [b"probe", *(str(i).encode() for i in range(3000)), b"last"]
    assert not stray


def test_works_when_its_socket_is_numbered_above_1023(
    clients: Callable[..., MqttClient],
) -> None:
    """select() cannot watch such a socket; a busy controller (or a long test run) has them."""
    import os
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"open-file limit {soft} is below 1200")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        high = clients("high-fd")
        sock = high._client.socket()
        assert sock is not None and sock.fileno() > 1023
        got: list[InboundMessage] = []
        high.subscribe("fd/echo", got.append, qos=QoS.AT_LEAST_ONCE)
        time.sleep(0.2)
        clients("low-fd-sender").publish("fd/echo", b"x", qos=QoS.AT_LEAST_ONCE, wait_s=5)
        high.publish("fd/echo", b"y", qos=QoS.AT_LEAST_ONCE, wait_s=5)
        assert wait_for(lambda: len(got) == 2)
    finally:
        for fd in held:
            os.close(fd)


def test_a_socket_closed_under_the_loop_is_a_lost_link_not_a_dead_thread(
    clients: Callable[..., MqttClient],
) -> None:
    client = clients("closed-under")
    sock = client._client.socket()
    assert sock is not None
    sock.close()  # as if the kernel had dropped it between two waits
    assert wait_for(lambda: client.connects >= 2, timeout_s=10)  # reconnected
    assert client._thread is not None and client._thread.is_alive()
