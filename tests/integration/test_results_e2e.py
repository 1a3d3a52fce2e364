"""Exactly once, end to end: results sent through a broker that stops and comes back reach
the controller's database once each, with no gap.

The controller is the real ``spillway controller serve`` process; the device is a
``protocol.mqtt.MqttClient`` that behaves like an outbox sender: it keeps every record
until the controller acknowledges it, and resends what is unacknowledged after every
(re)connect and now and then. Redeliveries are expected; duplicates in the database are not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocol.codec import decode, encode
from protocol.inference import InferStatus, ResultAck, ResultBatch, ResultRecord, Tier
from protocol.mqtt import InboundMessage, MqttClient, MqttSettings
from protocol.topics import DeviceChannel, QoS, Topics
from sim.broker import MosquittoBroker
from tests.integration.fleet import Fleet, wait_for

DEVICE = "edge-outbox"
BOOT_EPOCH = 1
N = 150
BATCH = 5
RESEND_EVERY_S = 3.0


class OutboxSender:
    """Records stay here until acked; unacked ones go out again after every CONNACK."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.device_id = device_id
        self.topics = Topics()
        self._outbox: dict[int, ResultRecord] = {}
        self._lock = threading.Lock()
        self.acks = 0
        self.client = MqttClient(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                client_id=device_id,
                keepalive_s=2,
                backoff_initial_s=0.05,
                backoff_max_s=0.5,
            )
        )
        self.client.subscribe(
            self.topics.device(device_id, DeviceChannel.ACKS), self._on_ack, qos=QoS.AT_LEAST_ONCE
        )
        self.client.add_connect_hook(lambda session_present: self.resend())
        self.client.start()

    def _on_ack(self, message: InboundMessage) -> None:
        ack = decode(message.payload, ResultAck)
        assert ack.device_id == self.device_id and ack.boot_epoch == BOOT_EPOCH
        with self._lock:
            self.acks += 1
            for seq in ack.seqs:
                self._outbox.pop(seq, None)

    def send(self, records: list[ResultRecord]) -> None:
        """Keep the records, then publish them (QoS 1; paho holds it while disconnected)."""
        with self._lock:
            for record in records:
                self._outbox[record.seq] = record
        self._publish(records)

    def resend(self) -> None:
        with self._lock:
            unacked = [self._outbox[seq] for seq in sorted(self._outbox)]
        for start in range(0, len(unacked), 100):
            self._publish(unacked[start : start + 100])

    def unacked(self) -> int:
        with self._lock:
            return len(self._outbox)

    def _publish(self, records: list[ResultRecord]) -> None:
        if not records:
            return
        batch = ResultBatch(device_id=self.device_id, boot_epoch=BOOT_EPOCH, records=records)
        spec = DeviceChannel.RESULTS.spec
        self.client.publish(
            self.topics.device(self.device_id, DeviceChannel.RESULTS),
            encode(batch),
            qos=spec.qos,
            retain=spec.retain,
        )

    def stop(self) -> None:
        self.client.stop()


def _records(seqs: range) -> list[ResultRecord]:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    return [
        ResultRecord(
            seq=seq,
            request_id=f"{DEVICE}-{seq}",
            status=InferStatus.OK,
            tier=Tier.EDGE,
            latency_ms=float(seq),
            served_at=start + timedelta(milliseconds=seq),
        )
        for seq in seqs
    ]


def _send(sender: OutboxSender, seqs: range) -> None:
    for first in range(seqs.start, seqs.stop, BATCH):
        sender.send(_records(range(first, min(first + BATCH, seqs.stop))))


def _metric(fleet: Fleet, name: str) -> float:
    for family in text_string_to_metric_families(fleet.http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker, tmp_path)
    f.start_controller()
    yield f
    f.close()


def test_every_result_is_stored_exactly_once_across_a_broker_restart(
    fleet: Fleet, broker: MosquittoBroker
) -> None:
    sender = OutboxSender(broker, DEVICE)
    try:
        assert sender.client.wait_connected(10), "the device did not connect"
        _send(sender, range(1, 51))

        broker.stop()  # SIGTERM: sessions and queued QoS 1 are persisted
        wait_for(lambda: not sender.client.is_connected, 15, what="the device sees the outage")
        _send(sender, range(51, 101))  # while the broker is away
        broker.start()
        _send(sender, range(101, N + 1))

        last_resend = time.monotonic()

        def drained() -> bool:
            nonlocal last_resend
            if sender.unacked() == 0:
                return True
            if time.monotonic() - last_resend > RESEND_EVERY_S:
                sender.resend()  # what an outbox does with records acked by no one
                last_resend = time.monotonic()
            return False

        wait_for(drained, 90, what="every record acknowledged")
    finally:
        sender.stop()

    seqs: list[int] = []
    page = 1
    while True:
        response = fleet.http.get(
            "/api/v1/results", params={"device_id": DEVICE, "page": page, "page_size": 200}
        )
        response.raise_for_status()
        body = response.json()
        assert body["total"] == N
        assert {item["boot_epoch"] for item in body["items"]} <= {BOOT_EPOCH}
        seqs += [item["seq"] for item in body["items"]]
        if page * body["page_size"] >= body["total"]:
            break
        page += 1
    assert seqs == list(range(1, N + 1))  # each once, none missing, in serving order

    assert _metric(fleet, "spillway_results_ingested_total") == N
    assert _metric(fleet, "spillway_result_gaps") == 0
    # The outage made the device send records twice (paho's queue and the resend after
    # CONNACK); the database kept one of each.
    assert _metric(fleet, "spillway_results_duplicates_total") > 0
    assert _metric(fleet, "spillway_result_acks_total") >= N / BATCH
    one = fleet.http.get(f"/api/v1/results/{DEVICE}-77").json()
    assert (one["seq"], one["latency_ms"]) == (77, 77.0)
