"""``spillway bench rollout``: model delivery to N agents vs a raw MQTT fan-out, in one run.

All phases run on one mosquitto, one after the other in the same process, so the machine's
noise hits them alike:

* **raw fan-out** - one paho publisher sends the INT8 artifact's bytes as QoS 1 chunks of
  ``chunk_bytes`` (each with an 8-byte offset header) to N subscribers on one topic (the
  broker copies each publish to the N); time from the first publish until every
  subscriber has every byte. Subscribers only count bytes, once per offset (a QoS 1
  redelivery is not counted twice): this is the **target's reference**.
* **raw receiver** - the same fan-out, but each subscriber also does what a receiver must:
  checks each chunk's sha256, writes it at its offset (by the header, not by arrival
  order) into its own file and keeps a running sha256 over the contiguous prefix, checked
  against the whole file's at the end (no fsync, no resume record, no request per
  chunk). Reported as a second, separately labelled ratio: what the protocol costs on
  top of receiving, as opposed to what receiving costs on this machine.
* **delivery** - the real controller (``spillway controller serve``, its chunk server) holds
  the uploaded INT8 variant; N in-process ``edge_agent.Agent``s (no serving) are assigned
  it over REST (``PUT /api/v1/devices/{id}/model``, the N PUTs sent at once unless
  ``--no-parallel-assign``) and pull it chunk by chunk (chunks
  asked for and broadcast on the artifact's topic, coalesced by the controller;
  sha256-checked, written, hashed as the verified prefix grows; the data file and the
  resume record fsync'ed every ``model_progress_fsync_bytes``); time from the first
  assignment until every agent has the verified artifact (state past ``downloading``), and
  until every agent reports ``active`` (includes each agent's load + warm-up, all N on
  this machine's cores). The N agents share this process (and its GIL) as the N raw
  subscribers do.

Target: delivery (downloaded) <= 1.5 x raw fan-out (count-only). ``sim`` may import both
sides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console

from edge_agent.agent import Agent
from edge_agent.settings import EdgeSettings
from models.signing import SigningKey, public_path, save_signing_key
from protocol.mqtt import InboundMessage, MqttClient, MqttError, MqttSettings
from protocol.topics import QoS
from protocol.transfer import DEFAULT_CHUNK_BYTES
from sim.broker import MosquittoBroker, free_port
from sim.processes import ADMIN_TOKEN_ENV, ChildProcess, bearer, new_admin_token
from sim.registration import MINILM, register_variant
from sim.report import BenchReport, progress

logger = logging.getLogger(__name__)

TARGET_RATIO = 1.5


_SEQ = struct.Struct(">Q")
"""Raw fan-out payload header: the chunk's offset (QoS 1 may redeliver, so a subscriber
places a chunk by it, never by arrival order)."""


class _Receiver:
    """One raw subscriber that does what a receiver must: check each chunk's sha256,
    write it at its offset, feed the contiguous prefix to a running sha256 (as the agent
    does), compare the whole file's digest at the end. No fsync, no resume record."""

    def __init__(self, fd: int, digests: list[str], chunk_bytes: int, whole: str) -> None:
        self.fd = fd
        self.digests = digests
        self.chunk_bytes = chunk_bytes
        self.whole = whole
        self.hasher = hashlib.sha256()
        self.hashed = 0
        self.ahead: dict[int, bytes] = {}
        self.failed: list[str] = []

    def take(self, offset: int, payload: bytes) -> bool:
        """False: the chunk fails its sha256 (not taken; a redelivery may still bring it)."""
        if hashlib.sha256(payload).hexdigest() != self.digests[offset // self.chunk_bytes]:
            self.failed.append(f"chunk at {offset} ({len(payload)} bytes) fails its sha256")
            return False
        os.pwrite(self.fd, payload, offset)
        self.ahead[offset] = payload
        while self.hashed in self.ahead:
            chunk = self.ahead.pop(self.hashed)
            self.hasher.update(chunk)
            self.hashed += len(chunk)
        return True

    def finish(self) -> None:
        if self.hasher.hexdigest() != self.whole:
            self.failed.append("whole file fails its sha256")


def _raw_fanout(
    broker: MosquittoBroker,
    data: bytes,
    *,
    agents: int,
    chunk_bytes: int,
    receiver_dir: Path | None = None,
) -> float:
    """Seconds until every subscriber has every byte.

    Each payload is an 8-byte offset header and the chunk; a subscriber counts a chunk
    once per offset (a QoS 1 redelivery is a duplicate). ``receiver_dir`` None:
    subscribers only count bytes. Otherwise each one is a ``_Receiver`` with its own file.
    """
    topic = f"bench/fanout/{uuid.uuid4().hex[:8]}"
    received = [0] * agents
    seen: list[set[int]] = [set() for _ in range(agents)]
    done = threading.Event()
    lock = threading.Lock()
    finished = [0]
    subscribers: list[MqttClient] = []
    digests = [
        hashlib.sha256(data[o : o + chunk_bytes]).hexdigest()
        for o in range(0, len(data), chunk_bytes)
    ]
    whole = hashlib.sha256(data).hexdigest()
    receivers: list[_Receiver] = []
    retries: list[str] = []
    if receiver_dir is not None:
        receiver_dir.mkdir(parents=True, exist_ok=True)
        for i in range(agents):
            fd = os.open(receiver_dir / f"sub-{i}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            receivers.append(_Receiver(fd, digests, chunk_bytes, whole))

    def handler(i: int) -> Any:
        def on(msg: InboundMessage) -> None:
            (offset,) = _SEQ.unpack_from(msg.payload)
            if offset in seen[i]:
                return  # a redelivery
            payload = msg.payload[_SEQ.size :]
            if receivers and not receivers[i].take(offset, payload):
                return
            seen[i].add(offset)
            with lock:
                received[i] += len(payload)
                complete = received[i] == len(data)
            if complete:
                if receivers:
                    receivers[i].finish()
                with lock:
                    finished[0] += 1
                    if finished[0] == agents:
                        done.set()

        return on

    ready = [threading.Event() for _ in range(agents)]
    for i in range(agents):
        client = MqttClient(
            MqttSettings(host=broker.host, port=broker.port, client_id=f"fan-{i}-{topic[-8:]}")
        )
        client.subscribe(topic, handler(i), qos=QoS.AT_LEAST_ONCE)
        # Subscribed after ``topic``: a probe seen here proves ``topic``'s SUBACK.
        client.subscribe(f"{topic}/ready", _setter(ready[i]), qos=QoS.AT_MOST_ONCE)
        client.start()
        subscribers.append(client)
    publisher = MqttClient(
        MqttSettings(host=broker.host, port=broker.port, client_id=f"pub-{topic[-8:]}")
    )
    publisher.start()
    try:
        for c in [*subscribers, publisher]:
            if not c.wait_connected(20):
                raise RuntimeError("fan-out client did not connect")
        deadline = time.monotonic() + 60
        while not all(e.is_set() for e in ready):  # every subscription in place
            if time.monotonic() > deadline:
                raise RuntimeError("fan-out subscribers did not subscribe")
            publisher.publish(f"{topic}/ready", b"", qos=QoS.AT_LEAST_ONCE)
            time.sleep(0.1)
        started = time.perf_counter()
        for offset in range(0, len(data), chunk_bytes):
            payload = _SEQ.pack(offset) + data[offset : offset + chunk_bytes]
            while True:
                try:
                    publisher.publish(topic, payload, qos=QoS.AT_LEAST_ONCE)
                    break
                except MqttError as exc:  # lost under load: send again once reconnected
                    retries.append(f"chunk at {offset}: {exc}")
                    publisher.wait_connected(30)
        if not done.wait(300):
            failed = [f"subscriber {i}: {f}" for i, r in enumerate(receivers) for f in r.failed]
            raise RuntimeError(f"raw fan-out did not complete: {failed[:3]} {retries[:3]}")
        elapsed = time.perf_counter() - started
        problems = sum(len(r.failed) for r in receivers) + len(retries)
        if problems:
            logger.warning(
                "raw fan-out completed after %d bad or lost publishes (sent again)", problems
            )
        return elapsed
    finally:
        for c in [*subscribers, publisher]:
            c.stop()
        for r in receivers:
            os.close(r.fd)


_CONTROLLER_COUNTERS = {
    "spillway_transfer_chunks_total": "controller_chunk_publishes",
    "spillway_transfer_coalesced_total": "controller_requests_coalesced",
    "spillway_transfer_busy_total": "controller_busy_answers",
}
_AGENT_COUNTERS = {
    "model_chunk_requests": "agent_chunk_requests",
    "model_chunks_verified": "agent_chunks_answered",
    "model_chunks_unasked": "agent_chunks_unasked",
    "model_chunk_retries": "agent_chunk_retries",
    "model_chunk_busy": "agent_busy_answers",
}


def _setter(event: threading.Event) -> Callable[[InboundMessage], None]:
    return lambda _message: event.set()


def _delivery(
    broker: MosquittoBroker,
    variant_dir: Path,
    work: Path,
    *,
    agents: int,
    chunk_bytes: int,
    transfer_workers: int,
    window: int,
    parallel_assign: bool,
) -> tuple[float, float, dict[str, float]]:
    key = SigningKey.generate()
    key_path = work / "keys" / "signing.key"
    save_signing_key(key, key_path)
    port = free_port()
    admin_token = new_admin_token()
    controller = ChildProcess(
        "controller",
        [
            "controller",
            "serve",
            "--port",
            str(port),
            "--mqtt-port",
            str(broker.port),
            "--database-url",
            f"sqlite:///{work / 'controller.db'}",
        ],
        log_path=work / "controller.log",
        env={
            "SPILLWAY_ARTIFACT_DIR": str(work / "artifacts"),
            "SPILLWAY_SIGNING_KEY_PATH": str(key_path),
            "SPILLWAY_MODEL_WATCH_DIR": str(work / "watched"),
            "SPILLWAY_MODEL_WATCH_VARIANTS": "[]",
            "SPILLWAY_MAX_CONCURRENT_TRANSFERS": str(agents),
            "SPILLWAY_TRANSFER_QUEUE_MAX": str(max(256, agents * 8)),
            "SPILLWAY_TRANSFER_WORKERS": str(transfer_workers),
            ADMIN_TOKEN_ENV: admin_token,
        },
    )
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=120, headers=bearer(admin_token)
    )
    fleet: list[Agent] = []
    controller.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"controller not ready: {controller.log_tail(10)}")
            time.sleep(0.2)
        version = register_variant(http, variant_dir, key)
        for i in range(agents):
            agent = Agent(
                EdgeSettings(
                    device_id=f"bench-{i:03d}",
                    mqtt_host=broker.host,
                    mqtt_port=broker.port,
                    state_dir=work / "agents" / f"bench-{i:03d}",
                    trusted_key_file=public_path(key_path),
                    model_chunk_bytes=chunk_bytes,
                    model_chunk_window=window,
                    intra_op_threads=1,
                    heartbeat_interval_s=5,
                )
            )
            agent.start()
            fleet.append(agent)
        for agent in fleet:
            if not agent.wait_connected(30):
                raise RuntimeError("an agent did not connect")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # each device must be registered before PUT
            if all(
                http.get(f"/api/v1/devices/{a.settings.device_id}").status_code == 200
                for a in fleet
            ):
                break
            time.sleep(0.2)

        def assign(agent: Agent) -> None:
            put = http.put(
                f"/api/v1/devices/{agent.settings.device_id}/model",
                json={"name": MINILM, "version": version, "variant": "int8-onnx"},
            )
            put.raise_for_status()

        started = time.perf_counter()
        if parallel_assign:  # a rollout pushes to every device at once
            with ThreadPoolExecutor(max_workers=agents) as pool:
                list(pool.map(assign, fleet))
        else:
            for agent in fleet:
                assign(agent)
        assigned_s = time.perf_counter() - started
        downloaded: dict[str, float] = {}
        active: dict[str, float] = {}
        began: dict[str, float] = {}
        """When each agent was first seen downloading (its assignment verified)."""
        deadline = time.monotonic() + 900
        while len(active) < agents:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{agents - len(active)} agents did not converge")
            now = time.perf_counter() - started
            for agent in fleet:
                status = agent.models.status
                name = agent.settings.device_id
                if status is not None and status.state == "downloading":
                    began.setdefault(name, now)
                if status is None or status.state == "downloading":
                    continue
                if status.state == "failed":
                    raise RuntimeError(f"{name} failed: {status.reason}")
                downloaded.setdefault(name, now)
                if status.state == "active" and status.variant == "int8-onnx":
                    active.setdefault(name, now)
            time.sleep(0.01)
        counts: dict[str, float] = {}
        for line in http.get("/metrics").text.splitlines():
            metric, _, text = line.partition(" ")
            if metric in _CONTROLLER_COUNTERS:
                counts[_CONTROLLER_COUNTERS[metric]] = float(text)
        for agent in fleet:
            for counter, count in agent.counters().items():
                if counter in _AGENT_COUNTERS:
                    label = _AGENT_COUNTERS[counter]
                    counts[label] = counts.get(label, 0) + count
        counts["assign_s"] = round(assigned_s, 3)
        if began:
            counts["first_began_s"] = round(min(began.values()), 3)
            counts["last_began_s"] = round(max(began.values()), 3)
        counts["first_downloaded_s"] = round(min(downloaded.values()), 3)
        return max(downloaded.values()), max(active.values()), counts
    finally:
        for agent in fleet:
            agent.stop()
        http.close()
        controller.stop()


def _round(
    step: Callable[[str], None],
    work: Path,
    data: bytes,
    variant_dir: Path,
    *,
    agents: int,
    chunk_bytes: int,
    transfer_workers: int,
    window: int,
    parallel_assign: bool,
) -> dict[str, Any]:
    """Raw fan-out, raw receiver and delivery, one after the other on a fresh broker (no
    retained state from an earlier round)."""
    with MosquittoBroker(work / "broker") as broker:
        raw_s = _raw_fanout(broker, data, agents=agents, chunk_bytes=chunk_bytes)
        step(f"raw fan-out {raw_s:.2f} s")
        receiver_s = _raw_fanout(
            broker, data, agents=agents, chunk_bytes=chunk_bytes, receiver_dir=work / "raw"
        )
        step(f"raw receiver {receiver_s:.2f} s")
        downloaded_s, active_s, counts = _delivery(
            broker,
            variant_dir,
            work,
            agents=agents,
            chunk_bytes=chunk_bytes,
            transfer_workers=transfer_workers,
            window=window,
            parallel_assign=parallel_assign,
        )
        step(f"delivery {downloaded_s:.2f} s")
    return {
        "raw_fanout_s": round(raw_s, 3),
        "raw_receiver_s": round(receiver_s, 3),
        "delivery_downloaded_s": round(downloaded_s, 3),
        "delivery_active_s": round(active_s, 3),
        "ratio_downloaded": round(downloaded_s / raw_s, 3),
        "ratio_active": round(active_s / raw_s, 3),
        "ratio_downloaded_vs_receiver": round(downloaded_s / receiver_s, 3),
        "counts": counts,
    }


def bench_rollout(
    out: Path = typer.Option(Path("var/bench"), "--out", help="rollout.json/.md/.png go here."),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the JSON document here."
    ),
    agents: int = typer.Option(20, help="Agents (and raw subscribers)."),
    model_dir: Path = typer.Option(
        Path("var/models"), help="Built variants (spillway models build)."
    ),
    chunk_bytes: int = typer.Option(DEFAULT_CHUNK_BYTES, help="Chunk size, both sides."),
    transfer_workers: int = typer.Option(8, help="The controller's chunk-server threads."),
    window: int = typer.Option(8, help="Chunk requests in flight per agent."),
    rounds: int = typer.Option(
        3, min=1, help="Rounds of (raw, receiver, delivery); the median ratio is reported."
    ),
    parallel_assign: bool = typer.Option(
        True,
        help="Send the N assignment PUTs at once (a rollout); --no-parallel-assign sends "
        "them one after the other (the agents then start seconds apart on a loaded box).",
    ),
) -> None:
    """Delivery of the INT8 MiniLM to N agents vs the same bytes fanned out raw."""
    variant_dir = model_dir / "int8-onnx"
    if not (variant_dir / "manifest.json").is_file():
        from models.build import INT8_ONNX, BuildOptions, build_all

        build_all(BuildOptions(out=model_dir, variants=(INT8_ONNX,)))
    data = (variant_dir / "model.onnx").read_bytes()
    measured: list[dict[str, Any]] = []
    settings = {
        "agents": agents,
        "artifact_bytes": len(data),
        "artifact_sha256": hashlib.sha256(data).hexdigest(),
        "chunk_bytes": chunk_bytes,
        "transfer_workers": transfer_workers,
        "window": window,
        "parallel_assign": parallel_assign,
    }
    report = BenchReport(
        "rollout", f"Delivery of {len(data) / 2**20:.1f} MiB to {agents} agents vs raw fan-out"
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp,
        progress(3 * rounds, "bench rollout") as step,
    ):
        for index in range(rounds):
            work = Path(tmp) / f"round-{index}"
            measured.append(
                _round(
                    _prefixed(step, f"round {index + 1}/{rounds}"),
                    work,
                    data,
                    variant_dir,
                    agents=agents,
                    chunk_bytes=chunk_bytes,
                    transfer_workers=transfer_workers,
                    window=window,
                    parallel_assign=parallel_assign,
                )
            )
            shutil.rmtree(work, ignore_errors=True)  # 2 x N copies of the artifact
    fill_report(report, measured, settings)
    paths = report.write(out)
    console = Console(stderr=True)
    console.print(report.markdown(), highlight=False)
    console.print(f"report      {paths['md']}", highlight=False)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")


def _prefixed(step: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda what: step(f"{prefix}: {what}")


def fill_report(
    report: BenchReport, measured: list[dict[str, Any]], settings: dict[str, Any]
) -> None:
    """Rounds -> table, median ratios (per round, then the median), plot. Pure."""
    rows = [
        {
            "round": i + 1,
            "raw fan-out s": r["raw_fanout_s"],
            "raw receiver s": r["raw_receiver_s"],
            "delivery (downloaded) s": r["delivery_downloaded_s"],
            "ratio vs raw fan-out": r["ratio_downloaded"],
            "vs raw receiver": r["ratio_downloaded_vs_receiver"],
            "all active s": r["delivery_active_s"],
            "chunk publishes": r["counts"].get("controller_chunk_publishes"),
            "PUTs s": r["counts"].get("assign_s"),
        }
        for i, r in enumerate(measured)
    ]
    report.table("rounds", list(rows[0]) if rows else [], rows)
    median = statistics.median
    report.ratio(
        "delivery / raw fan-out (median of rounds)",
        median(r["ratio_downloaded"] for r in measured),
        target=TARGET_RATIO,
        higher_is_better=False,
    )
    report.ratio(
        "delivery / raw receiver (sha256 + write, no fsync)",
        median(r["ratio_downloaded_vs_receiver"] for r in measured),
    )
    report.ratio("all active / raw fan-out", median(r["ratio_active"] for r in measured))
    rounds = [float(i + 1) for i in range(len(measured))]
    for label, key in (
        ("raw fan-out", "raw_fanout_s"),
        ("raw receiver", "raw_receiver_s"),
        ("delivery", "delivery_downloaded_s"),
    ):
        report.series(
            "seconds per round",
            label,
            rounds,
            [r[key] for r in measured],
            xlabel="round",
            ylabel="s",
            kind="scatter",
        )
    report.note(
        "raw fan-out: one paho publisher, the broker copies to N subscribers that only "
        "count bytes; raw receiver: the same, each subscriber checking every chunk's sha256, "
        "writing it and hashing the whole file; delivery: the real controller and N "
        "in-process agents, from the first assignment PUT until every agent downloaded "
        "and verified the artifact."
    )
    report.data.update(settings)
    report.data["rounds"] = measured
