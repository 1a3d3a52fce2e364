"""Results are never lost: outbox before the answer, uplink until the controller's ack."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from edge_agent.outbox import Outbox, OutboxLimits
from edge_agent.uplink import ResultUplink
from protocol.codec import RejectCounter, decode, encode
from protocol.inference import (
    EmbeddingBlock,
    InferStatus,
    ResultAck,
    ResultBatch,
    ResultRecord,
    Tier,
)
from protocol.mqtt import InboundMessage
from protocol.topics import Topics
from sim.broker import MosquittoBroker, free_port
from tests.agent.helpers import (
    Acker,
    AgentFactory,
    FakeClock,
    ProcessFactory,
    RecordingPublisher,
    outbox_rows,
    post_embed,
    wait_for,
)

STARTUP_S = 60.0  # interpreter, onnxruntime and the model's verification on a loaded machine


def _record(seq: int, request_id: str, dim: int = 8) -> bytes:
    import numpy as np

    rows = np.ones((1, dim), dtype=np.float32)
    return (
        ResultRecord(
            seq=seq,
            request_id=request_id,
            status=InferStatus.OK,
            tier=Tier.EDGE,
            served_at=datetime(2026, 1, 1, tzinfo=UTC),
            embeddings=EmbeddingBlock.from_array(rows),
        )
        .model_dump_json()
        .encode()
    )


def _ack(seqs: list[int], *, boot_epoch: int = 1, device_id: str = "dev-1") -> InboundMessage:
    ack = ResultAck(device_id=device_id, boot_epoch=boot_epoch, seqs=seqs)
    return InboundMessage(topic="t", payload=encode(ack), qos=1, retain=False)


def test_uplink_batches_resends_when_unacked_and_deletes_on_ack(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.db", boot_epoch=1, limits=OutboxLimits())
    outbox.append_many("result", [lambda s: _record(s, f"r{s}") for _ in range(5)], now=0.0)
    publisher = RecordingPublisher()
    rejects = RejectCounter()
    size = len(_record(1, "r1"))
    uplink = ResultUplink(
        outbox=outbox,
        client=publisher,
        connected=lambda: True,
        device_id="dev-1",
        topics=Topics(),
        clock=clock,
        rejects=rejects,
        max_batch_bytes=2 * size + 10,  # two records per batch
        inflight_records=100,
        resend_after_s=5.0,
    )
    assert uplink.send_due() == 5
    batches = [decode(p, ResultBatch) for p in publisher.on("/results")]
    assert [[r.seq for r in b.records] for b in batches] == [[1, 2], [3, 4], [5]]
    assert {b.boot_epoch for b in batches} == {1}
    assert uplink.send_due() == 0  # in flight, not overdue
    uplink._on_ack(_ack([1, 2, 3]))
    uplink._on_ack(_ack([3]))  # a repeated ack is harmless
    uplink._on_ack(_ack([4], device_id="dev-2"))  # someone else's: rejected, counted
    uplink._on_ack(InboundMessage(topic="t", payload=b"garbage", qos=1, retain=False))
    assert [r.seq for r in outbox.pending()] == [4, 5]
    assert rejects.snapshot() == {("acks", "device_mismatch"): 1, ("acks", "malformed"): 1}
    clock.advance(5.0)
    assert uplink.send_due() == 2  # overdue: sent again
    assert uplink.records_resent == 2
    uplink.on_connect(True)  # a reconnect forgets what was in flight
    assert uplink.send_due() == 2
    uplink._on_ack(_ack([4, 5]))
    assert outbox.pending() == [] and uplink.inflight == 0
    assert (uplink.records_acked, uplink.acks_unknown) == (5, 1)


def test_every_served_request_reaches_the_controller_and_leaves_the_outbox(
    serving_agent: AgentFactory, acker: Acker
) -> None:
    agent = serving_agent()
    port = agent.http_port
    assert port is not None and agent.wait_connected(10)
    ids = [post_embed(port, {"texts": [f"text {i}"]}).json()["request_id"] for i in range(12)]
    wait_for(lambda: len(acker.keys()) == 12, 20, what="12 results at the acker")
    wait_for(lambda: outbox_rows(agent.settings.state_dir) == [], 20, what="outbox drained")
    assert acker.keys() == {(1, seq) for seq in range(1, 13)}
    assert sorted(r.request_id for _, r in acker.records.items()) == sorted(ids)


def test_cut_off_from_the_broker_under_load_then_every_seq_arrives_once(
    serving_agent: AgentFactory, acker: Acker, broker: MosquittoBroker
) -> None:
    agent = serving_agent(uplink_resend_after_s=2.0)
    port = agent.http_port
    assert port is not None and agent.wait_connected(10)
    stop = threading.Event()
    served: list[str] = []
    lock = threading.Lock()

    def load() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                r = http.post(f"http://127.0.0.1:{port}/v1/embed", json={"texts": ["load"]})
                assert r.status_code == 200, r.text
                with lock:
                    served.append(r.json()["request_id"])

    with ThreadPoolExecutor(max_workers=3) as pool:
        workers = [pool.submit(load) for _ in range(3)]
        wait_for(lambda: len(acker.keys()) >= 10, 20, what="results flowing")
        broker.stop()
        wait_for(lambda: not agent.is_connected, 10, what="agent notices")
        offline_from = len(served)
        wait_for(lambda: len(served) >= offline_from + 30, 60, what="serving while cut off")
        broker.start()
        wait_for(lambda: len(served) >= offline_from + 45, 60, what="serving after reconnect")
        stop.set()
        for w in workers:
            w.result()
    n = len(served)
    wait_for(lambda: len(acker.keys()) == n, 60, what=f"all {n} results at the acker")
    wait_for(lambda: outbox_rows(agent.settings.state_dir) == [], 30, what="outbox drained")
    assert acker.keys() == {(1, seq) for seq in range(1, n + 1)}  # no gap, nothing extra
    assert sorted(r.request_id for r in acker.records.values()) == sorted(served)
    assert agent.counters()["outbox_dropped"] == 0


def test_kill_9_after_answering_while_the_broker_is_down_delivers_after_restart_once(
    broker: MosquittoBroker,
    acker: Acker,
    agent_process: ProcessFactory,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    state_dir = tmp_path / "state" / "dev-1"
    proc = agent_process(
        "dev-1",
        extra=[
            "--model-dir",
            str(model_dir),
            "--http-port",
            str(port),
            "--intra-op-threads",
            "1",
        ],
    )
    proc.env["SPILLWAY_EDGE_UPLINK_RESEND_AFTER_S"] = "1"
    proc.start()

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, STARTUP_S, what="agent serving")
    broker.stop()  # the answer is given, but the result cannot be published
    r = post_embed(port, {"texts": ["must not be lost"], "request_id": "precious"})
    assert r.status_code == 200 and r.json()["status"] == "ok"
    proc.signal(signal.SIGKILL)
    proc.wait()
    (pending,) = outbox_rows(state_dir)  # committed before the answer: it survived the kill
    assert (pending[0], pending[1], pending[2].request_id) == (1, 1, "precious")

    broker.start()
    proc.start()  # boot epoch 2; the boot-1 record is still pending
    wait_for(lambda: acker.by_request("precious"), STARTUP_S, what="delivered after restart")
    wait_for(lambda: outbox_rows(state_dir) == [], 30, what="acked and deleted")
    ((key, record),) = acker.by_request("precious")
    assert key == ("dev-1", 1, 1)
    assert record.embeddings is not None and record.embeddings.count == 1
    assert acker.keys() == {(1, 1)}  # exactly once at the controller, nothing else


def test_records_handed_over_from_another_thread_are_group_committed_before_done(
    tmp_path: Path,
) -> None:
    import asyncio

    from edge_agent.clock import SystemClock
    from edge_agent.results import ResultWriter

    outbox = Outbox(tmp_path / "o.db", boot_epoch=1, limits=OutboxLimits())
    block = EmbeddingBlock.from_array(np.zeros((1, 4), dtype=np.float32))
    seen: list[tuple[int | Exception, int]] = []

    def record(rid: str) -> ResultRecord:
        return ResultRecord(
            seq=1,
            request_id=rid,
            status=InferStatus.OK,
            tier=Tier.EDGE,
            queued_ms=0.0,
            latency_ms=1.0,
            served_at=datetime(2026, 1, 1, tzinfo=UTC),
            embeddings=block,
        )

    def done(outcome: int | Exception) -> None:
        seen.append((outcome, outbox.size()[0]))  # stored by the time we hear of it

    async def scenario() -> int:
        writer = ResultWriter(outbox, clock=SystemClock())
        writer.start()
        worker = threading.Thread(
            target=writer.submit, args=([record("a"), record("b")], [done, done])
        )
        worker.start()
        worker.join()
        seq = await writer.commit(record("c"))
        await writer.stop()
        return seq

    assert asyncio.run(scenario()) == 3
    assert [s for s, _ in seen] == [1, 2]
    assert all(stored >= 2 for _, stored in seen)
    outbox.close()


def _served(request_id: str, **changes: object) -> ResultRecord:
    record = ResultRecord(
        seq=1,
        request_id=request_id,
        status=InferStatus.OK,
        tier=Tier.EDGE,
        queued_ms=0.25,
        latency_ms=3.5,
        served_at=datetime(2026, 1, 1, 12, 30, tzinfo=UTC),
        embeddings=EmbeddingBlock.from_array(np.arange(6, dtype=np.float32).reshape(1, 6)),
    )
    return record.model_copy(update=changes) if changes else record


def test_a_stored_payload_is_exactly_the_record_with_its_seq(tmp_path: Path) -> None:
    from edge_agent.results import payload_factory
    from protocol.inference import OffloadReason

    records = [
        _served("plain"),
        _served("cloud", tier=Tier.CLOUD, offload_reason=OffloadReason.OVERFLOW, variant="v"),
        _served("none", embeddings=None),
    ]
    for record in records:
        make = payload_factory(record)
        for seq in (1, 2, 10, 123456789):
            expected = record.model_copy(update={"seq": seq}).model_dump_json().encode()
            assert make(seq) == expected
            assert ResultRecord.model_validate_json(make(seq)).seq == seq


def test_write_commits_on_the_calling_thread_and_returns_each_seq_or_why_not(
    tmp_path: Path,
) -> None:
    import asyncio

    from edge_agent.clock import SystemClock
    from edge_agent.outbox import FullPolicy, OutboxFull
    from edge_agent.results import ResultWriter

    limits = OutboxLimits(max_bytes=1024, policy=FullPolicy.REJECT_NEW)
    outbox = Outbox(tmp_path / "o.db", boot_epoch=1, limits=limits)
    committed_on: list[str] = []
    writer = ResultWriter(
        outbox,
        clock=SystemClock(),
        on_committed=lambda: committed_on.append(threading.current_thread().name),
    )
    too_big = _served("too big", variant="x" * 2000)

    async def scenario() -> list[int | Exception]:
        writer.start()
        try:
            return await asyncio.to_thread(
                lambda: list(writer.write([_served("a"), too_big, _served("b")]))
            )
        finally:
            await writer.stop()

    first, refused, last = asyncio.run(scenario())
    assert (first, last) == (1, 2)  # the refused record took no seq
    assert isinstance(refused, OutboxFull)
    assert [ResultRecord.model_validate_json(r.payload).request_id for r in outbox.pending()] == [
        "a",
        "b",
    ]
    assert committed_on and "result-commit" not in committed_on
    assert (writer.records, writer.failed) == (2, 1)
    outbox.close()
