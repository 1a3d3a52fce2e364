"""The chunk server over a real mosquitto: a device pulls an artifact in checked chunks
and reassembles it exactly; bad ranges, unknown and deprecated digests are refused; the
concurrent-transfer bound answers ``busy``; only the requested range is ever read; and
devices listening on an artifact's broadcast topic share one publish per chunk."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import Session

from cloud_controller import artifacts, registry
from cloud_controller.entities import VersionSource, VersionState
from edge_agent.clock import SystemClock
from edge_agent.download import ChunkPuller, PullSettings
from protocol.codec import encode
from protocol.mqtt import InboundMessage, MqttClient
from protocol.topics import QoS, Topics
from protocol.transfer import (
    ChunkRequest,
    ChunkResponse,
    TransferDone,
    TransferListening,
    decode_chunk,
)
from sim.broker import MosquittoBroker
from tests.controller.helpers import Controller, ManualClock, mqtt_client, wait_for
from tests.controller.model_helpers import ChunkClient, built_manifest, synthetic, upload

MakeController = Callable[..., Controller]


@pytest.fixture
def clients(broker: MosquittoBroker) -> Iterator[Callable[[str], ChunkClient]]:
    made: list[ChunkClient] = []

    def make(device_id: str) -> ChunkClient:
        client = ChunkClient(broker, device_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


def _controller(make: MakeController, database_url: str, models: Path, **kw: object) -> Controller:
    return make(
        database_url,
        clock=ManualClock(datetime.now(UTC)),
        trusted_keys_dir=models / "keys",
        **kw,
    )


def test_a_device_pulls_a_real_artifact_chunk_by_chunk(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    clients: Callable[[str], ChunkClient],
) -> None:
    controller = _controller(make_controller, database_url, test_models)
    variant_dir = test_models / "fp32-onnx"
    response = upload(
        controller.http,
        "minilm",
        synthetic_for_file(test_models, variant_dir / "model.onnx"),
        variant_dir / "model.onnx",
        tokenizer=variant_dir / "tokenizer.json",
    )
    assert response.status_code == 201, response.text
    expected = built_manifest(test_models, "fp32-onnx")["manifest"]
    client = clients("edge-pull-1")

    chunk = controller.settings.transfer_max_chunk_bytes
    data = client.fetch(expected["sha256"], chunk_bytes=chunk)
    assert len(data) == expected["size_bytes"]
    assert hashlib.sha256(data).hexdigest() == expected["sha256"]
    chunks = -(-expected["size_bytes"] // chunk)
    assert controller.metric("spillway_transfer_chunks_total") == chunks
    assert controller.metric("spillway_transfer_bytes_total") == expected["size_bytes"]

    # The tokenizer is served by its digest too, here in small chunks; resuming from an
    # offset is just asking for it.
    tokenizer = (variant_dir / "tokenizer.json").read_bytes()
    whole = client.fetch(expected["tokenizer_sha256"], chunk_bytes=100_000)
    assert whole == tokenizer
    header, tail = client.ask(expected["tokenizer_sha256"], 400_000, 100_000)
    assert header.status == "ok" and tail == tokenizer[400_000:]
    assert header.total_bytes == len(tokenizer)
    assert controller.metric("spillway_transfer_active") == 0  # last chunk fetched


def synthetic_for_file(models: Path, path: Path) -> bytes:
    """A dev-key manifest naming the model ``minilm`` for the real file at ``path``."""
    manifest = built_manifest(models, "fp32-onnx")["manifest"]
    return synthetic(
        models,
        b"",
        model_name="minilm",
        sha256=manifest["sha256"],
        size_bytes=manifest["size_bytes"],
    )


def _register_blob(controller: Controller, data: bytes, models: Path, *, version: str) -> str:
    tokenizer = (models / "fp32-onnx" / "tokenizer.json").read_bytes()
    manifest = synthetic(models, data, model_name="tiny", model_version=version)
    response = upload(controller.http, "tiny", manifest, data, tokenizer=tokenizer)
    assert response.status_code == 201, response.text
    return hashlib.sha256(data).hexdigest()


def test_bad_ranges_unknown_and_deprecated_artifacts_are_refused(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    clients: Callable[[str], ChunkClient],
) -> None:
    controller = _controller(
        make_controller, database_url, test_models, transfer_max_chunk_bytes=4096
    )
    data = os.urandom(10_000)
    sha = _register_blob(controller, data, test_models, version="1.0.0")
    client = clients("edge-refused-1")

    header, body = client.ask(sha, 8192, 4096)  # the last, shorter chunk
    assert header.status == "ok" and body == data[8192:] and header.total_bytes == 10_000
    header, body = client.ask(sha, 10_000, 10)
    assert header.status == "bad_range" and body == b"" and "past the end" in (header.detail or "")
    header, _ = client.ask(sha, 0, 4097)
    assert header.status == "bad_range" and "largest chunk" in (header.detail or "")
    unknown = "0" * 64
    header, _ = client.ask(unknown, 0, 10)
    assert header.status == "not_found" and "registered" in (header.detail or "")

    assert controller.http.post("/api/v1/models/tiny/versions/1.0.0/deprecate").status_code == 200
    header, _ = client.ask(sha, 0, 10)
    assert header.status == "not_found"
    assert "tiny@1.0.0, which is deprecated" in (header.detail or "")
    assert controller.metric("spillway_transfer_refused_total", status="bad_range") == 2
    assert controller.metric("spillway_transfer_refused_total", status="not_found") == 2


def test_the_concurrent_transfer_bound_answers_busy(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    clients: Callable[[str], ChunkClient],
) -> None:
    controller = _controller(
        make_controller,
        database_url,
        test_models,
        max_concurrent_transfers=1,
        transfer_retry_after_ms=1234,
    )
    data = os.urandom(3000)
    sha = _register_blob(controller, data, test_models, version="1.0.0")
    first, second = clients("edge-busy-a"), clients("edge-busy-b")

    assert first.ask(sha, 0, 1000)[0].status == "ok"  # a is transferring now
    assert controller.metric("spillway_transfer_active") == 1
    header, body = second.ask(sha, 0, 1000)
    assert header.status == "busy" and header.retry_after_ms == 1234 and body == b""
    assert first.ask(sha, 1000, 1000)[0].status == "ok"  # a keeps its slot
    assert first.ask(sha, 2000, 1000)[0].status == "ok"  # a's last chunk frees the slot
    header, body = second.ask(sha, 0, 1000)
    assert header.status == "ok" and body == data[:1000]
    assert controller.metric("spillway_transfer_busy_total") == 1


def test_only_the_requested_range_is_read_from_a_huge_sparse_artifact(
    make_controller: MakeController,
    database_url: str,
    clients: Callable[[str], ChunkClient],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    controller = make_controller(database_url)
    store = controller.app.state.runtime.store
    size = 64 * 2**30  # 64 GiB, sparse: reading it whole would never finish
    sha = "ab" * 32  # the server looks blobs up by digest, it does not rehash them
    path = store.path_for(sha)
    path.parent.mkdir(parents=True)
    marker = b"the bytes at the far end"
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(size - 4096)
        f.write(marker)
    now = controller.clock()
    with Session(controller.app.state.runtime.engine) as session:
        row = registry.begin_version(
            session, "huge", "1.0.0", source=VersionSource.UPLOAD, state=VersionState.READY, now=now
        )
        assert row.id is not None
        manifest = {
            "manifest": {
                "variant": "fp32-onnx",
                "precision": "fp32",
                "runtime": "onnxruntime",
                "sha256": sha,
                "size_bytes": size,
                "tokenizer_sha256": "cd" * 32,
                "release": 1,
            }
        }
        registry.add_variant(
            session, row.id, signed=manifest, artifact_path=store.relative_path(sha), now=now
        )
        session.commit()

    reads: list[tuple[int, int, int]] = []
    real = artifacts.read_range

    def counting(path: Path, offset: int, length: int) -> bytes:
        data = real(path, offset, length)
        reads.append((offset, length, len(data)))
        return data

    monkeypatch.setattr(artifacts, "read_range", counting)
    client = clients("edge-sparse-1")
    header, data = client.ask(sha, size - 4096, 64 * 1024)
    assert header.status == "ok" and header.total_bytes == size
    assert data == marker + bytes(4096 - len(marker))  # clipped at the end of the file
    header, data = client.ask(sha, 2**30, 1000)
    assert header.status == "ok" and data == bytes(1000)
    assert reads == [(size - 4096, 4096, 4096), (2**30, 1000, 1000)]


def test_devices_asking_for_the_same_chunk_cost_one_read(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    clients: Callable[[str], ChunkClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    controller = _controller(
        make_controller,
        database_url,
        test_models,
        transfer_max_chunk_bytes=4096,
        transfer_chunk_cache_bytes=8192,
    )
    data = os.urandom(20_000)
    sha = _register_blob(controller, data, test_models, version="1.0.0")
    reads: list[tuple[int, int]] = []
    real = artifacts.read_range

    def counting(path: Path, offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return real(path, offset, length)

    monkeypatch.setattr(artifacts, "read_range", counting)
    first, second = clients("edge-cache-a"), clients("edge-cache-b")
    for client in (first, second):
        header, body = client.ask(sha, 4096, 4096)
        assert header.status == "ok" and body == data[4096:8192]
        assert header.chunk_sha256 == hashlib.sha256(body).hexdigest()
    assert reads == [(4096, 4096)], "the second device was served from the cache"

    # At most two 4 KiB chunks are kept: the oldest one is read again.
    for offset in (8192, 12288, 4096):
        header, body = first.ask(sha, offset, 4096)
        assert header.status == "ok" and body == data[offset : offset + 4096]
    assert reads == [(4096, 4096), (8192, 4096), (12288, 4096), (4096, 4096)]

    # A cached chunk of a deprecated version is not served.
    assert controller.http.post("/api/v1/models/tiny/versions/1.0.0/deprecate").status_code == 200
    header, body = second.ask(sha, 4096, 4096)
    assert header.status == "not_found" and body == b""


# -- broadcast: one publish per chunk for every listening device ----------------------------


class Listener:
    """A device listening on an artifact's broadcast topic and asking the way agents do:
    response topic = that topic, a listener id per subscription, an attempt number."""

    def __init__(self, broker: MosquittoBroker, device_id: str, sha256: str) -> None:
        self.device_id = device_id
        self.sha256 = sha256
        self.topics = Topics()
        self.topic = self.topics.artifact_chunks(sha256)
        self.listener = uuid.uuid4().hex
        self.frames: queue.Queue[tuple[ChunkResponse, bytes, bytes | None]] = queue.Queue()
        self.client = mqtt_client(broker, device_id)
        self.client.subscribe(self.topic, self._on_frame, qos=QoS.AT_LEAST_ONCE)
        probe = f"{self.topic}-probe-{device_id}"  # subscribed after the topic: its SUBACK
        seen = threading.Event()
        self.client.subscribe(probe, lambda _m: seen.set(), qos=QoS.AT_LEAST_ONCE)
        while not seen.wait(0.1):
            self.client.publish(probe, b"", qos=QoS.AT_LEAST_ONCE)

    def _on_frame(self, message: InboundMessage) -> None:
        header, data = decode_chunk(message.payload, max_bytes=8 << 20)
        self.frames.put((header, data, message.correlation_data))

    def ask(self, offset: int, length: int, *, attempt: int = 1) -> bytes:
        correlation = uuid.uuid4().bytes
        request = ChunkRequest(
            device_id=self.device_id,
            artifact_sha256=self.sha256,
            offset=offset,
            length=length,
            listener=self.listener,
            attempt=attempt,
        )
        self.client.publish(
            self.topics.model_chunks(),
            encode(request),
            qos=QoS.AT_LEAST_ONCE,
            response_topic=self.topic,
            correlation_data=correlation,
            wait_s=5,
        )
        return correlation

    def announce(self) -> None:
        """What an agent sends right after subscribing (``TransferListening``)."""
        message = TransferListening(
            device_id=self.device_id, artifact_sha256=self.sha256, listener=self.listener
        )
        self.client.publish(self.topics.model_chunks(), encode(message), qos=QoS(1), wait_s=5)

    def done(self) -> None:
        message = TransferDone(device_id=self.device_id, artifact_sha256=self.sha256)
        self.client.publish(self.topics.model_chunks(), encode(message), qos=QoS(1), wait_s=5)

    def next_frame(self, timeout_s: float = 20.0) -> tuple[ChunkResponse, bytes, bytes | None]:
        return self.frames.get(timeout=timeout_s)

    def no_frame(self, within_s: float = 0.5) -> bool:
        try:
            self.frames.get(timeout=within_s)
        except queue.Empty:
            return True
        return False

    def stop(self) -> None:
        self.client.stop()


def test_equal_requests_of_listening_devices_cost_one_publish(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    broker: MosquittoBroker,
) -> None:
    controller = _controller(
        make_controller, database_url, test_models, transfer_max_chunk_bytes=4096
    )
    data = os.urandom(20_000)
    sha = _register_blob(controller, data, test_models, version="1.0.0")
    a, b = Listener(broker, "edge-cast-a", sha), Listener(broker, "edge-cast-b", sha)
    try:
        a.ask(0, 4096)
        for listener in (a, b):  # one publish reaches both
            header, body, _ = listener.next_frame()
            assert (header.status, header.offset, body) == ("ok", 0, data[:4096])
        # b was never seen before this publish: it may have subscribed after it, so its
        # first request gets a publish of its own (a sees it too)...
        b.ask(0, 4096)
        assert b.next_frame()[0].offset == 0 and a.next_frame()[0].offset == 0
        assert controller.metric("spillway_transfer_chunks_total") == 2
        # ...but a was listening before that publish began: no third one.
        a.ask(0, 4096)
        assert a.no_frame() and b.no_frame()
        assert controller.metric("spillway_transfer_chunks_total") == 2
        assert controller.metric("spillway_transfer_coalesced_total") == 1
        # A retry is never taken as answered by an earlier publish.
        a.ask(0, 4096, attempt=2)
        assert a.next_frame()[0].offset == 0 and b.next_frame()[0].offset == 0
        assert controller.metric("spillway_transfer_chunks_total") == 3

        # Both known: the same chunk asked by both is published once, whoever comes
        # second (its job still queued, or its publish already begun).
        for offset in range(4096, 20_000, 4096):
            correlation = a.ask(offset, 4096)
            b.ask(offset, 4096)
            for listener in (a, b):
                header, body, got = listener.next_frame()
                assert header.offset == offset and body == data[offset : offset + 4096]
                assert header.chunk_sha256 == hashlib.sha256(body).hexdigest()
            assert got == correlation  # the publish answers the first request
        assert a.no_frame() and b.no_frame()
        assert controller.metric("spillway_transfer_chunks_total") == 3 + 4
        assert controller.metric("spillway_transfer_coalesced_total") == 1 + 4
        assert controller.metric("spillway_transfer_bytes_total") == 3 * 4096 + 20_000 - 4096

        # Deprecation stops the chunks at once: the listeners are told, nothing is sent.
        deprecate = controller.http.post("/api/v1/models/tiny/versions/1.0.0/deprecate")
        assert deprecate.status_code == 200
        correlation = b.ask(0, 4096, attempt=2)
        header, body, got = b.next_frame()
        assert header.status == "not_found" and body == b"" and got == correlation
    finally:
        a.stop()
        b.stop()


def test_an_announced_listener_joins_a_publish_that_began_after_its_announcement(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    broker: MosquittoBroker,
) -> None:
    controller = _controller(
        make_controller, database_url, test_models, transfer_max_chunk_bytes=4096
    )
    data = os.urandom(8192)
    sha = _register_blob(controller, data, test_models, version="1.0.0")
    a, b = Listener(broker, "edge-told-a", sha), Listener(broker, "edge-told-b", sha)
    try:
        b.announce()  # subscribed, then told the controller so (no request yet)
        assert wait_for(lambda: controller.metric("spillway_transfer_active") == 1, 10)
        a.ask(0, 4096)
        for listener in (a, b):
            assert listener.next_frame()[0].offset == 0
        # b's first request: its listener was known before that publish began, so the
        # publish already answered it (without the announcement it would get its own).
        b.ask(0, 4096)
        assert a.no_frame() and b.no_frame()
        assert controller.metric("spillway_transfer_chunks_total") == 1
        assert controller.metric("spillway_transfer_coalesced_total") == 1
    finally:
        a.stop()
        b.stop()


def test_transfer_done_frees_the_slot_at_once(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    broker: MosquittoBroker,
) -> None:
    controller = _controller(
        make_controller,
        database_url,
        test_models,
        max_concurrent_transfers=1,
        transfer_retry_after_ms=1234,
    )
    data = os.urandom(3000)
    sha = _register_blob(controller, data, test_models, version="1.0.0")
    a, b = Listener(broker, "edge-slot-a", sha), Listener(broker, "edge-slot-b", sha)
    try:
        a.ask(0, 1000)
        assert a.next_frame()[0].status == "ok" and b.next_frame()[0].status == "ok"
        correlation = b.ask(1000, 1000)
        while True:  # a sees b's refusal too, and ignores it by its correlation
            header, _, got = b.next_frame()
            if got == correlation:
                break
        assert header.status == "busy" and header.retry_after_ms == 1234
        # a asked for no last chunk: it is still transferring until it says it is done.
        assert controller.metric("spillway_transfer_active") == 1
        a.done()
        assert wait_for(lambda: controller.metric("spillway_transfer_active") == 0, 10)
        b.ask(1000, 1000, attempt=2)
        header, body, _ = b.next_frame()
        assert header.status == "ok" and body == data[1000:2000]
    finally:
        a.stop()
        b.stop()


def _connected(client: MqttClient) -> Callable[[], bool]:
    return lambda: client.is_connected


def test_a_device_joining_mid_broadcast_completes_and_shares_chunks(
    make_controller: MakeController,
    database_url: str,
    test_models: Path,
    broker: MosquittoBroker,
    tmp_path: Path,
) -> None:
    """Two agents' real pullers: the lead stalls at 40 %, a late one joins from zero and
    passes it. The late one gets every chunk it asks for, the lead takes the chunks the
    late one asked for without asking, both finish with the right digest, and the
    controller publishes fewer chunks than it would answering each device on its own."""
    chunk = 16 * 1024
    controller = _controller(
        make_controller, database_url, test_models, transfer_max_chunk_bytes=chunk
    )
    data = os.urandom(40 * chunk + 123)
    sha = _register_blob(controller, data, test_models, version="1.0.0")
    chunks = -(-len(data) // chunk)
    clients = [mqtt_client(broker, name) for name in ("edge-lead", "edge-late")]
    pullers = [
        ChunkPuller(
            client=client,
            device_id=name,
            topics=Topics(),
            staging_root=tmp_path / name,
            settings=PullSettings(chunk_bytes=chunk, window=2, timeout_s=5.0),
            clock=SystemClock(),
            connected=_connected(client),
        )
        for client, name in zip(clients, ("edge-lead", "edge-late"), strict=True)
    ]
    halfway, passed = threading.Event(), threading.Event()
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def stalls(done: int, total: int) -> None:
        if done >= total * 0.4 and not halfway.is_set():
            halfway.set()  # the lead stops verifying until the late one has passed it
            assert passed.wait(60), "the late one did not get past the lead"

    def passes(done: int, total: int) -> None:
        if done >= total * 0.8:
            passed.set()

    def run(index: int, progress: Callable[[int, int], None] | None) -> None:
        try:
            path = pullers[index].fetch(sha, len(data), progress=progress)
            results[str(index)] = path.read_bytes()
        except BaseException as exc:  # reported below
            errors.append(exc)

    lead = threading.Thread(target=run, args=(0, stalls))
    late = threading.Thread(target=run, args=(1, passes))
    try:
        lead.start()
        assert halfway.wait(60), "the lead did not get to 40 %"
        late.start()
        lead.join(120)
        late.join(120)
    finally:
        for client in clients:
            client.stop()
    assert not errors, errors
    assert results == {"0": data, "1": data}
    lead_counts, late_counts = (p.counters() for p in pullers)
    assert lead_counts["chunks_unasked"] > 0, "the lead took chunks the late one asked for"
    assert lead_counts["chunk_requests"] < chunks, "so it did not ask for every chunk"
    publishes = controller.metric("spillway_transfer_chunks_total")
    assert chunks <= publishes < 2 * chunks
    assert publishes <= lead_counts["chunk_requests"] + late_counts["chunk_requests"]
