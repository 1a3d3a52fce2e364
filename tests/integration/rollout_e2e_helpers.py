"""Parts of the rollout end-to-end test: a deliberately degraded model variant, a fleet of
real serving agents whose controller signs with the test models' key, and steady local
inference traffic so the agents' quality probe has requests to sample.

The degraded variant is the INT8 ONNX build with strong Gaussian noise added to its word
embedding table: same graph, same tokenizer, same output shape, so it installs, loads and
answers like a good model, but its embeddings point elsewhere (cosine vs. the FP32
reference around 0.45 with ``noise_ratio=2``). Its signed manifest copies the good build's
quality claims: a bad build that slipped past the builder's gate, which is exactly what a
canary is for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from models.manifest import MANIFEST_FILE, Manifest, sign
from models.signing import SigningKey, load_signing_key, public_path
from sim.broker import MosquittoBroker, free_port
from sim.processes import ChildProcess
from tests.integration.fleet import Fleet

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
WORD_EMBEDDINGS = "embeddings.word.weight"
"""The INT8 build's (FP32) word embedding initializer, the one the noise goes into."""
TEXTS = [
    "The cat sat on the mat.",
    "Overflow requests land in the cloud pool.",
    "A canary watches the new model before the fleet gets it.",
    "Edge devices answer locally and offload when their queue is too long.",
    "The rollout engine compares the edge with the cloud's full precision answer.",
    "short",
]


def signed_manifest(variant_dir: Path, key: SigningKey, **changes: Any) -> bytes:
    """The variant's manifest with ``changes``, fresh dates, signed with ``key``."""
    body: dict[str, Any] = json.loads((variant_dir / MANIFEST_FILE).read_text())["manifest"]
    now = datetime.now(UTC)
    body.update(created_at=now.isoformat(), expires_at=(now + timedelta(days=30)).isoformat())
    body.update(changes)
    return sign(Manifest.model_validate(body), key).model_dump_json().encode()


def degraded_variant(
    source: Path,
    out: Path,
    key: SigningKey,
    *,
    version: str,
    release: int,
    noise_ratio: float = 2.0,
    seed: int = 7,
) -> Path:
    """Write ``out`` (model.onnx, tokenizer.json, manifest.json): ``source``'s model with
    Gaussian noise of ``noise_ratio`` x the table's std added to its word embeddings,
    signed as ``version`` with ``release``. Returns ``out``."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(source / "model.onnx"))
    table = next(i for i in graph.graph.initializer if i.name == WORD_EMBEDDINGS)
    weights = numpy_helper.to_array(table)
    noise = np.random.default_rng(seed).normal(0.0, noise_ratio * weights.std(), weights.shape)
    table.CopyFrom(numpy_helper.from_array((weights + noise).astype(np.float32), WORD_EMBEDDINGS))
    out.mkdir(parents=True, exist_ok=True)
    artifact = out / "model.onnx"
    onnx.save(graph, str(artifact))
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    data = artifact.read_bytes()
    manifest = signed_manifest(
        source,
        key,
        model_version=version,
        release=release,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )
    (out / MANIFEST_FILE).write_bytes(manifest)
    return out


class ServingFleet(Fleet):
    """A controller and serving agents that all trust the test models' signing key: the
    controller signs desired state with it and accepts uploads signed with it; the agents
    start serving ``fp32-onnx`` from the build folder (their "factory" model) and verify
    delivered manifests with it. The rollout engine steps every ``rollout_tick_s``."""

    def __init__(
        self, broker: MosquittoBroker, work: Path, models: Path, *, rollout_tick_s: float = 0.5
    ) -> None:
        keys = work / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        for name in ("signing.key", "signing.key.pub"):
            shutil.copyfile(models / "keys" / name, keys / name)
        (keys / "signing.key").chmod(0o600)
        super().__init__(broker, work)  # loads the copied key instead of making one
        self.models = models
        self.key = load_signing_key(self.key_path)
        self.controller = ChildProcess(
            "controller",
            self.controller.args,
            log_path=work / "controller.log",
            env={
                "SPILLWAY_ARTIFACT_DIR": str(work / "artifacts"),
                "SPILLWAY_SIGNING_KEY_PATH": str(self.key_path),
                "SPILLWAY_ROLLOUT_TICK_S": str(rollout_tick_s),
            },
        )
        self.http_ports: dict[str, int] = {}

    def serving_agent(self, device_id: str, *, variant: str = "fp32-onnx") -> ChildProcess:
        port = free_port()
        proc = ChildProcess(
            device_id,
            [
                "agent",
                "run",
                "--device-id",
                device_id,
                "--hardware-class",
                "jetson-orin-nx",
                "--label",
                "site=lab",
                "--mqtt-port",
                str(self.broker.port),
                "--state-dir",
                str(self.work / "agents" / device_id),
                "--keepalive-s",
                "2",
                "--heartbeat-interval-s",
                "1",
                "--telemetry-interval-s",
                "1",
                "--model-dir",
                str(self.models),
                "--variant",
                variant,
                "--trusted-key",
                str(public_path(self.key_path)),
                "--http-port",
                str(port),
                "--intra-op-threads",
                "1",
            ],
            log_path=self.work / f"{device_id}.log",
            env={"SPILLWAY_EDGE_DESIRED_KEY_FILES": json.dumps([str(self.desired_key_file)])},
        )
        self.agents[device_id] = proc
        self.http_ports[device_id] = port
        return proc

    def upload(self, variant_dir: Path, manifest: bytes) -> dict[str, Any]:
        """Register a version's variant (``POST /api/v1/models/{name}/versions``)."""
        with (
            (variant_dir / "model.onnx").open("rb") as model,
            (variant_dir / "tokenizer.json").open("rb") as tokenizer,
        ):
            response = self.http.post(
                f"/api/v1/models/{MINILM}/versions",
                files={
                    "manifest": ("manifest.json", manifest, "application/json"),
                    "artifact": ("artifact", model, "application/octet-stream"),
                    "tokenizer": ("tokenizer.json", tokenizer, "application/json"),
                },
                timeout=120,
            )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def model_section(self, device_id: str) -> dict[str, Any]:
        """The ``model`` section the device last reported (empty: none)."""
        reported = self.device(device_id).get("reported") or {}
        section: dict[str, Any] = (reported.get("policy") or {}).get("model") or {}
        return section

    def running(self, device_id: str) -> tuple[str | None, str | None]:
        """``(version, artifact_sha256)`` the device reports active; Nones otherwise."""
        section = self.model_section(device_id)
        if section.get("state") != "active":
            return None, None
        return section.get("version"), section.get("artifact_sha256")

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        response = self.http.get(f"/api/v1/rollouts/{rollout_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


class Traffic:
    """One thread per agent posting small ``/v1/embed`` requests until ``stop()``; counts
    answers by ``(status, tier, variant)`` per device."""

    def __init__(self, ports: dict[str, int], *, pause_s: float = 0.05) -> None:
        self._ports = dict(ports)
        self._pause_s = pause_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: dict[str, Counter[tuple[str, str, str]]] = {d: Counter() for d in ports}
        self.failures: Counter[str] = Counter()
        self._threads = [
            threading.Thread(target=self._drive, args=(d,), name=f"traffic-{d}", daemon=True)
            for d in self._ports
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _drive(self, device_id: str) -> None:
        url = f"http://127.0.0.1:{self._ports[device_id]}/v1/embed"
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                texts = [TEXTS[i % len(TEXTS)], TEXTS[(i + 1) % len(TEXTS)]]
                i += 1
                try:
                    response = client.post(url, json={"texts": texts})
                    body = response.json()
                    key = (str(body.get("status")), str(body.get("tier")), str(body.get("variant")))
                    with self._lock:
                        self.answers[device_id][key] += 1
                except (httpx.HTTPError, ValueError) as exc:
                    with self._lock:
                        self.failures[f"{device_id}: {type(exc).__name__}"] += 1
                    time.sleep(0.2)  # the agent is not listening yet
                self._stop.wait(self._pause_s)

    def served(self, device_id: str, tier: str = "edge") -> int:
        with self._lock:
            return sum(
                n for (s, t, _), n in self.answers[device_id].items() if (s, t) == ("ok", tier)
            )
