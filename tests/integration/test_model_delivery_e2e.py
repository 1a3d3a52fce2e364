"""Model delivery end to end: the real ``spillway controller serve`` registers an uploaded
INT8 variant, ``PUT /api/v1/devices/{id}/model`` assigns it, and a real ``spillway agent
run`` process pulls it from the controller's chunk server, verifies it with the
controller's public key and reports it ``active`` with the right digest."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from models.manifest import Manifest, sign
from models.signing import SigningKey, public_path, save_signing_key
from sim.broker import MosquittoBroker
from sim.processes import ChildProcess
from tests.integration.fleet import Fleet, wait_for

BUILD_DIR = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))
TIMEOUT_S = 240.0
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class DeliveryFleet(Fleet):
    """A controller that signs with a key this test made, so the agent can trust it."""

    def __init__(self, broker: MosquittoBroker, work: Path) -> None:
        super().__init__(broker, work)
        self.key_path = work / "keys" / "signing.key"
        self.key = SigningKey.generate()
        save_signing_key(self.key, self.key_path)
        self.controller = ChildProcess(
            "controller",
            self.controller.args,
            log_path=work / "controller.log",
            env={
                "SPILLWAY_ARTIFACT_DIR": str(work / "artifacts"),
                "SPILLWAY_SIGNING_KEY_PATH": str(self.key_path),
                "SPILLWAY_MODEL_WATCH_DIR": str(work / "watched"),
                "SPILLWAY_MODEL_WATCH_VARIANTS": "[]",
            },
        )

    def delivery_agent(self, device_id: str) -> ChildProcess:
        proc = ChildProcess(
            device_id,
            [
                "agent",
                "run",
                "--device-id",
                device_id,
                "--mqtt-port",
                str(self.broker.port),
                "--state-dir",
                str(self.work / "agents" / device_id),
                "--keepalive-s",
                "2",
                "--heartbeat-interval-s",
                "1",
                "--trusted-key",
                str(public_path(self.key_path)),
                "--intra-op-threads",
                "1",
            ],
            log_path=self.work / f"{device_id}.log",
            env={},
        )
        self.agents[device_id] = proc
        return proc


@pytest.fixture(scope="module")
def int8_dir() -> Path:
    from models.build import BuildOptions, build_all

    build_all(BuildOptions(out=BUILD_DIR, eval_sentences=200, variants=("int8-onnx",)))
    return BUILD_DIR / "int8-onnx"


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path) -> Iterator[DeliveryFleet]:
    fleet = DeliveryFleet(broker, tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


def resigned(variant_dir: Path, key: SigningKey) -> bytes:
    body: dict[str, Any] = json.loads((variant_dir / "manifest.json").read_text())["manifest"]
    now = datetime.now(UTC)
    body.update(created_at=now.isoformat(), expires_at=(now + timedelta(days=30)).isoformat())
    return sign(Manifest.model_validate(body), key).model_dump_json().encode()


@pytest.mark.slow
def test_assigned_model_is_pulled_verified_and_activated(
    fleet: DeliveryFleet, int8_dir: Path
) -> None:
    fleet.start_controller()
    artifact = int8_dir / "model.onnx"
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    with artifact.open("rb") as model, (int8_dir / "tokenizer.json").open("rb") as tok:
        response = fleet.http.post(
            f"/api/v1/models/{MINILM}/versions",
            files={
                "manifest": ("manifest.json", resigned(int8_dir, fleet.key), "application/json"),
                "artifact": ("artifact", model, "application/octet-stream"),
                "tokenizer": ("tokenizer.json", tok, "application/json"),
            },
            timeout=120,
        )
    assert response.status_code == 201, response.text
    version = response.json()["version"]

    agent = fleet.delivery_agent("e2e-1")
    agent.start()
    wait_for(lambda: fleet.status("e2e-1") == "online", 60, what="agent online")
    put = fleet.http.put(
        "/api/v1/devices/e2e-1/model",
        json={"name": MINILM, "version": version, "variant": "int8-onnx"},
    )
    assert put.status_code == 200, put.text
    generation = put.json()["generation"]

    def model_section() -> dict[str, Any]:
        reported = fleet.device("e2e-1").get("reported") or {}
        section: dict[str, Any] = (reported.get("policy") or {}).get("model") or {}
        return section

    wait_for(
        lambda: (
            model_section().get("state") in {"active", "failed"}
            and fleet.observed_generation("e2e-1") == generation
        ),
        TIMEOUT_S,
        what="the agent to converge",
    )
    section = model_section()
    assert section["state"] == "active", (section, agent.log_tail(30))
    assert section["artifact_sha256"] == digest
    assert section["variant"] == "int8-onnx"
    installed = fleet.work / "agents" / "e2e-1" / "models" / digest / "model.onnx"
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == digest
