"""Model delivery on the agent, against a real mosquitto and a test chunk responder:
resumable download, verification before activation, atomic swap under load, revert."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.clock import SystemClock
from edge_agent.download import (
    ArtifactMismatch,
    ArtifactUnavailable,
    ChunkPuller,
    DownloadCancelled,
    PullSettings,
)
from edge_agent.serving import EmbedRequest, ServingModel
from models.signing import SigningKey, public_path, save_signing_key
from protocol.inference import InferStatus
from protocol.mqtt import MqttClient, MqttSettings
from protocol.topics import Topics
from sim.broker import MosquittoBroker
from tests.agent.delivery_helpers import ChunkResponder, assignment, model_policy
from tests.agent.helpers import AgentFactory, AgentProcess, Cloud, ProcessFactory, wait_for

INT8 = "int8-onnx"
FP32 = "fp32-onnx"


@pytest.fixture(scope="session")
def test_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def key_file(tmp_path: Path, test_key: SigningKey) -> Path:
    save_signing_key(test_key, tmp_path / "keys" / "test.key")
    return public_path(tmp_path / "keys" / "test.key")


@pytest.fixture
def responder(broker: MosquittoBroker) -> Iterator[ChunkResponder]:
    r = ChunkResponder(broker, {})
    yield r
    r.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_status(cloud: Cloud, device_id: str = "dev-1") -> list[dict[str, Any]]:
    return [r.policy["model"] for r in cloud.reports(device_id) if "model" in r.policy]


def last_state(cloud: Cloud, device_id: str = "dev-1") -> str | None:
    statuses = model_status(cloud, device_id)
    return statuses[-1]["state"] if statuses else None


# -- the puller on its own ------------------------------------------------------------


@pytest.fixture
def puller_client(broker: MosquittoBroker) -> Iterator[MqttClient]:
    client = MqttClient(
        MqttSettings(host=broker.host, port=broker.port, client_id="dev-p", backoff_max_s=0.3)
    )
    yield client
    client.stop()


def make_puller(client: MqttClient, root: Path, **kw: Any) -> ChunkPuller:
    values: dict[str, Any] = {"chunk_bytes": 16 * 1024, "window": 3, "timeout_s": 2.0}
    values.update(kw)
    puller = ChunkPuller(
        client=client,
        device_id="dev-p",
        topics=Topics(),
        staging_root=root,
        settings=PullSettings(**values),
        clock=SystemClock(),
        connected=lambda: client.is_connected,
    )
    puller.attach()
    client.start()
    assert client.wait_connected(10)
    return puller


def test_download_resumes_from_the_verified_offset(
    puller_client: MqttClient, responder: ChunkResponder, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 1500 + b"tail"  # 384,004 bytes: 24 chunks, the last short
    digest = responder.add(data)
    puller = make_puller(puller_client, tmp_path / "staging")
    cancel = threading.Event()
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done >= len(data) * 0.4:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        puller.fetch(digest, len(data), progress=progress, cancel=cancel)
    verified = puller.verified_offset(digest)
    assert len(data) * 0.4 <= verified < len(data)
    responder.reset()

    path = puller.fetch(digest, len(data), progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == data
    offsets = {a.offset for a in responder.requests(digest)}
    # A chunk asked for before the cancel may still arrive and be taken, so the first new
    # request can lie past the verified offset, never before it.
    assert offsets and min(offsets) >= verified, "resumed from the verified offset"
    assert seen[-1] == (len(data), len(data))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_busy_is_waited_out_and_unknown_digests_fail_permanently(
    puller_client: MqttClient, responder: ChunkResponder, tmp_path: Path
) -> None:
    data = b"x" * 50_000
    digest = responder.add(data)
    responder.busy_left = 3
    puller = make_puller(puller_client, tmp_path / "staging")
    # size unknown (the tokenizer case): learnt from the first answer
    assert puller.fetch(digest, None).read_bytes() == data
    assert puller.counters()["chunk_busy"] == 3
    with pytest.raises(ArtifactUnavailable):
        puller.fetch("0" * 64, 10)


@pytest.mark.parametrize("corruption", ["flipped", "truncated", "appended"])
def test_corrupt_blobs_are_refused_and_restart_from_zero(
    puller_client: MqttClient, responder: ChunkResponder, tmp_path: Path, corruption: str
) -> None:
    data = bytes(range(256)) * 300
    served = {
        "flipped": data[:1000] + bytes([data[1000] ^ 1]) + data[1001:],
        "truncated": data[:-100],
        "appended": data + b"!",
    }[corruption]
    digest = responder.add(data, served)
    puller = make_puller(puller_client, tmp_path / "staging")
    with pytest.raises(ArtifactMismatch):
        puller.fetch(digest, len(data))
    assert puller.verified_offset(digest) == 0
    assert not puller.staging_dir(digest).exists()


# -- the install pipeline in an agent ------------------------------------------------------


def delivery_settings(key_file: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "trusted_key_file": key_file,
        "model_chunk_bytes": 1024 * 1024 - 4096,
        "model_chunk_timeout_s": 2.0,
        "model_progress_interval_s": 0.2,
    }
    values.update(overrides)
    return values


def install_int8(
    cloud: Cloud,
    responder: ChunkResponder,
    model_dir: Path,
    key: SigningKey,
    *,
    generation: int,
    release: int = 1,
    device_id: str = "dev-1",
) -> dict[str, Any]:
    variant_dir = model_dir / INT8
    responder.add((variant_dir / "model.onnx").read_bytes())
    responder.add((variant_dir / "tokenizer.json").read_bytes())
    section = assignment(variant_dir, key, version=f"1.0.{release}", release=release)
    cloud.publish_desired(device_id, generation, model_policy(section))
    return section


def test_install_reports_each_step_and_survives_a_broker_restart(
    broker: MosquittoBroker,
    cloud: Cloud,
    responder: ChunkResponder,
    make_agent: AgentFactory,
    model_dir: Path,
    key_file: Path,
    test_key: SigningKey,
) -> None:
    responder.delay_s = 0.05  # ~23 chunks: slow enough to restart the broker halfway
    agent = make_agent(**delivery_settings(key_file, model_chunk_window=1))
    assert agent.wait_connected(10)
    section = install_int8(cloud, responder, model_dir, test_key, generation=1)
    size = section["size_bytes"]
    wait_for(
        lambda: responder.served_bytes.get(section["artifact_sha256"], 0) > size * 0.4,
        30,
        what="40 % served",
    )
    broker.restart()
    wait_for(lambda: last_state(cloud) == "active", 90, what="the model to become active")
    states = [s["state"] for s in model_status(cloud)]
    assert "downloading" in states and "loading" in states
    progress = [s["progress"] for s in model_status(cloud) if s["state"] == "downloading"]
    assert progress == sorted(progress) and 0 < max(progress) <= 1
    final = model_status(cloud)[-1]
    assert final["artifact_sha256"] == section["artifact_sha256"]
    assert agent.applied_state.generation == 1
    record = agent.models.ledger.current.active
    assert record is not None and record.release == 1
    installed = agent.models.ledger.folder(record) / "model.onnx"
    assert sha(installed.read_bytes()) == section["artifact_sha256"]
    assert agent.counters()["model_alerts"] == 0


REJECTIONS = ["flipped", "truncated", "appended", "no_signature", "unknown_key", "expired"]


@pytest.mark.parametrize("case", REJECTIONS)
def test_bad_deliveries_are_rejected_before_activation(
    cloud: Cloud,
    responder: ChunkResponder,
    serving_agent: AgentFactory,
    model_dir: Path,
    key_file: Path,
    test_key: SigningKey,
    int8_model: ServingModel,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = serving_agent(**delivery_settings(key_file))
    assert agent.wait_connected(10)
    variant_dir = model_dir / INT8
    fake = b"not really a model " * 5000
    responder.add((variant_dir / "tokenizer.json").read_bytes())
    served = {
        "flipped": fake[:500] + b"?" + fake[501:],
        "truncated": fake[:-1],
        "appended": fake + b"\0",
    }.get(case, fake)
    responder.add(fake, served)
    section = assignment(variant_dir, test_key, artifact=fake)
    expected_reason = {
        "flipped": "digest_mismatch",
        "truncated": "digest_mismatch",
        "appended": "digest_mismatch",
        "no_signature": "manifest_format",
        "unknown_key": "unknown_key",
        "expired": "manifest_expired",
    }[case]
    if case == "no_signature":
        section["manifest"] = {"manifest": section["manifest"]["manifest"]}
    elif case == "unknown_key":
        section = assignment(variant_dir, SigningKey.generate(), artifact=fake)
    elif case == "expired":
        section["manifest"] = assignment(
            variant_dir, test_key, artifact=fake, expires_at="2025-01-01T00:00:00+00:00"
        )["manifest"]
    cloud.publish_desired("dev-1", 1, model_policy(section))

    wait_for(lambda: last_state(cloud) == "failed", 30, what="the failed report")
    failed = model_status(cloud)[-1]
    assert failed["reason"].startswith(expected_reason), failed
    assert failed["active"]["variant"] == INT8
    report = cloud.reports("dev-1")[-1]
    assert report.outcome == "failed" and report.error and expected_reason in report.error
    serving = agent.serving
    assert serving is not None and serving.runtime.model is int8_model
    assert agent.models.ledger.current.active is None
    assert agent.counters()["model_alerts"] == 1
    assert any(r.levelname == "ERROR" and "alert" in r.getMessage() for r in caplog.records)
    if case in {"no_signature", "unknown_key", "expired"}:
        assert responder.requests(section["artifact_sha256"]) == [], "refused before download"


def test_replayed_older_release_is_refused_also_after_a_restart(
    broker: MosquittoBroker,
    cloud: Cloud,
    responder: ChunkResponder,
    make_agent: AgentFactory,
    model_dir: Path,
    key_file: Path,
    test_key: SigningKey,
    tmp_path: Path,
) -> None:
    settings = delivery_settings(key_file)
    agent = make_agent(**settings)
    assert agent.wait_connected(10)
    install_int8(cloud, responder, model_dir, test_key, generation=1, release=2)
    wait_for(lambda: last_state(cloud) == "active", 60, what="release 2 active")
    install_int8(cloud, responder, model_dir, test_key, generation=2, release=1)
    # the same artifact, so only the release counter can refuse it
    wait_for(lambda: last_state(cloud) == "failed", 30, what="the refusal reported")
    assert model_status(cloud)[-1]["reason"].startswith("rollback")
    agent.stop()

    responder.reset()
    again = make_agent(**settings)
    assert again.wait_connected(10)
    assert again.models.ledger.min_release("sentence-transformers/all-MiniLM-L6-v2/int8-onnx") == 2
    old = assignment(model_dir / INT8, test_key, version="0.9", release=1)
    cloud.publish_desired("dev-1", 3, model_policy(old))
    wait_for(
        lambda: (
            (again.applied_state.last_failure or None) is not None
            and again.applied_state.last_failure.generation == 3
        ),  # type: ignore[union-attr]
        30,
        what="the replay refused after the restart",
    )
    assert "rollback" in (again.applied_state.last_failure.error or "")  # type: ignore[union-attr]
    assert again.counters()["model_alerts"] >= 1
    assert responder.requests() == []
    record = again.models.ledger.current.active
    assert record is not None and record.release == 2


def test_swap_under_load_loses_nothing_and_revert_is_instant(
    cloud: Cloud,
    responder: ChunkResponder,
    serving_agent: AgentFactory,
    model_dir: Path,
    key_file: Path,
    test_key: SigningKey,
    int8_model: ServingModel,
) -> None:
    agent = serving_agent(**delivery_settings(key_file, max_queue_items=100_000))
    assert agent.wait_connected(10)
    serving = agent.serving
    assert serving is not None
    fp32_dir = model_dir / FP32
    responder.add((fp32_dir / "model.onnx").read_bytes())
    responder.add((fp32_dir / "tokenizer.json").read_bytes())
    section = assignment(fp32_dir, test_key, version="2.0.0")

    outcomes: list[Any] = []
    stop = threading.Event()

    async def load() -> None:
        n = 0
        while not stop.is_set():
            batch = [
                serving.runtime.serve(EmbedRequest(f"r{n}-{i}", [f"sentence {n} {i}"]))
                for i in range(4)
            ]
            n += 1
            outcomes.extend(await asyncio.gather(*batch))

    runner = threading.Thread(target=lambda: serving.loop.call(load(), timeout_s=300))
    runner.start()
    try:
        wait_for(lambda: len(outcomes) >= 8, 30, what="load running")
        cloud.publish_desired("dev-1", 1, model_policy(section))
        wait_for(lambda: last_state(cloud) == "active", 120, what="fp32 active")
        served_before = len(outcomes)
        wait_for(lambda: len(outcomes) >= served_before + 8, 30, what="load after the swap")
    finally:
        stop.set()
        runner.join(60)
    assert outcomes and all(o.status is InferStatus.OK for o in outcomes), [
        (o.status, o.detail) for o in outcomes if o.status is not InferStatus.OK
    ]
    variants = [o.variant for o in outcomes]
    assert variants[0] == INT8 and variants[-1] == FP32
    first_new = variants.index(FP32)
    assert all(v == FP32 for v in variants[first_new + 4 :]), "no request went back to the old"

    previous = agent.models.slots.previous
    assert previous is not None and previous.model is int8_model
    agent.models.revert()
    assert serving.runtime.model is int8_model
    assert agent.models.status is not None and agent.models.status.variant == INT8


# -- kill -9 during the download -------------------------------------------------------------


CHUNK = 256 * 1024


def killable_agent(
    agent_process: ProcessFactory, key_file: Path, *, fsync_bytes: int
) -> AgentProcess:
    proc = agent_process("dev-1", extra=["--trusted-key", str(key_file), "--intra-op-threads", "1"])
    proc.env["SPILLWAY_EDGE_MODEL_CHUNK_BYTES"] = str(CHUNK)
    proc.env["SPILLWAY_EDGE_MODEL_CHUNK_WINDOW"] = "2"
    proc.env["SPILLWAY_EDGE_MODEL_PROGRESS_FSYNC_BYTES"] = str(fsync_bytes)
    return proc


def recorded_offset(progress_file: Path) -> int:
    """The offset the resume record claims (0 while there is none)."""
    try:
        return int(json.loads(progress_file.read_text())["verified_offset"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_agent_resumes_the_download_and_finishes(
    cloud: Cloud,
    responder: ChunkResponder,
    agent_process: ProcessFactory,
    model_dir: Path,
    key_file: Path,
    test_key: SigningKey,
    tmp_path: Path,
) -> None:
    """kill -9 once 30 %, 60 %, 99 % are durable; each restart resumes where the record
    says and the last one finishes with the right digest. The responder holds every
    chunk a little past the target, so no kill can land after the download finished."""
    fsync_bytes = 4 * CHUNK
    variant_dir = model_dir / INT8
    data = (variant_dir / "model.onnx").read_bytes()
    digest = responder.add(data)
    responder.add((variant_dir / "tokenizer.json").read_bytes())
    section = assignment(variant_dir, test_key)
    cloud.publish_desired("dev-1", 1, model_policy(section))
    proc = killable_agent(agent_process, key_file, fsync_bytes=fsync_bytes)
    progress_file = tmp_path / "state" / "dev-1" / "staging" / digest / "progress.json"
    last_chunk = (len(data) - 1) // CHUNK * CHUNK

    resumed_from: list[int] = []
    for fraction in (0.3, 0.6, 0.99):
        target = int(len(data) * fraction)
        responder.hold_from[digest] = min(last_chunk, -(-target // CHUNK) * CHUNK + fsync_bytes)
        proc.start()
        wait_for(
            lambda t=target: recorded_offset(progress_file) >= t,  # type: ignore[misc]
            60,
            what=f"{fraction:.0%} durable",
        )
        proc.signal(signal.SIGKILL)
        proc.wait()
        if resumed_from:  # this run was a restart: it asked nothing before where it resumed
            assert min(a.offset for a in responder.requests(digest)) == resumed_from[-1]
        resumed_from.append(recorded_offset(progress_file))
        assert resumed_from[-1] < len(data)
        responder.reset()
    responder.hold_from.clear()
    proc.start()
    wait_for(lambda: last_state(cloud) == "active", 90, what="active after the kills")
    assert min(a.offset for a in responder.requests(digest)) == resumed_from[-1]
    assert resumed_from == sorted(resumed_from)
    installed = tmp_path / "state" / "dev-1" / "models" / digest / "model.onnx"
    assert sha(installed.read_bytes()) == digest
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_kill_between_fsync_points_resumes_from_the_last_durable_offset(
    cloud: Cloud,
    responder: ChunkResponder,
    agent_process: ProcessFactory,
    model_dir: Path,
    key_file: Path,
    test_key: SigningKey,
    tmp_path: Path,
) -> None:
    """Chunks verified and written after the last fsync point are not claimed by the
    resume record: after a kill -9 there, the agent truncates them away, asks again from
    the recorded offset (not beyond it) and still ends with the right digest."""
    fsync_bytes = 16 * CHUNK
    hold = 24 * CHUNK  # between the fsync points at 16 and 32 chunks
    variant_dir = model_dir / INT8
    data = (variant_dir / "model.onnx").read_bytes()
    digest = responder.add(data)
    responder.add((variant_dir / "tokenizer.json").read_bytes())
    responder.hold_from[digest] = hold
    section = assignment(variant_dir, test_key)
    cloud.publish_desired("dev-1", 1, model_policy(section))
    proc = killable_agent(agent_process, key_file, fsync_bytes=fsync_bytes)
    staging = tmp_path / "state" / "dev-1" / "staging" / digest

    def written_up_to_hold() -> bool:
        try:
            with (staging / "partial").open("rb") as f:
                return f.read(hold) == data[:hold]
        except OSError:
            return False

    proc.start()
    wait_for(written_up_to_hold, 60, what="every chunk before the held one written")
    wait_for(lambda: any(a.offset == hold for a in responder.requests(digest)), 10)
    proc.signal(signal.SIGKILL)
    proc.wait()
    durable = recorded_offset(staging / "progress.json")
    assert hold - fsync_bytes < durable < hold, "the record claims exactly the last fsync point"
    assert (staging / "partial").stat().st_size >= hold, "bytes past the record were written"

    responder.reset()
    responder.hold_from.clear()
    proc.start()
    wait_for(lambda: last_state(cloud) == "active", 90, what="active after the kill")
    asked = sorted({a.offset for a in responder.requests(digest)})
    assert asked[0] == durable, "resumed from the durable offset, not beyond nor before"
    assert set(range(durable, hold, CHUNK)) <= set(asked), "the unrecorded chunks came again"
    installed = tmp_path / "state" / "dev-1" / "models" / digest / "model.onnx"
    assert sha(installed.read_bytes()) == digest
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_restarted_agent_keeps_the_installed_model(
    cloud: Cloud,
    responder: ChunkResponder,
    make_agent: AgentFactory,
    broker: MosquittoBroker,
    model_dir: Path,
    key_file: Path,
    test_key: SigningKey,
    tmp_path: Path,
) -> None:
    """The ledger survives restarts: a re-delivered assignment is not installed twice."""
    settings = delivery_settings(key_file)
    agent = make_agent(**settings)
    assert agent.wait_connected(10)
    install_int8(cloud, responder, model_dir, test_key, generation=1)
    wait_for(lambda: last_state(cloud) == "active", 60, what="active")
    agent.stop()
    responder.reset()
    again: Agent = make_agent(**settings)
    assert again.wait_connected(10)
    wait_for(lambda: again.applied_state.generation == 1, 10, what="state loaded")
    assert again.models.status is not None and again.models.status.state == "active"
    assert responder.requests() == []
