"""Model auto-loading end to end: the real ``spillway controller serve`` process watches a
folder; a good model dropped there becomes a ready version over REST, a corrupt one is
rejected with an alert (REST and the controller's error log) and the good one stays
current."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sim.broker import MosquittoBroker
from sim.processes import ChildProcess
from tests.integration.fleet import Fleet, wait_for

BUILD_DIR = Path(os.environ.get("SPILLWAY_TEST_MODELS", ".cache/test-models"))
TIMEOUT_S = 240.0


class RegistryFleet(Fleet):
    """A ``Fleet`` whose controller watches ``work/watched`` and stores under ``work``."""

    def __init__(self, broker: MosquittoBroker, work: Path) -> None:
        super().__init__(broker, work)
        self.watched = work / "watched"
        self.controller = ChildProcess(
            "controller",
            self.controller.args,
            log_path=work / "controller.log",
            env={
                "SPILLWAY_MODEL_WATCH_DIR": str(self.watched),
                "SPILLWAY_MODEL_WATCH_INTERVAL_S": "0.2",
                "SPILLWAY_MODEL_WATCH_VARIANTS": "[]",
                "SPILLWAY_MODEL_EVAL_SENTENCES": "50",
                "SPILLWAY_ARTIFACT_DIR": str(work / "artifacts"),
                "SPILLWAY_SIGNING_KEY_PATH": str(work / "keys" / "signing.key"),
            },
        )

    def version(self, name: str, version: str) -> dict[str, Any]:
        response = self.http.get(f"/api/v1/models/{name}/versions/{version}")
        if response.status_code == 404:
            return {}
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def drop(self, folder: str, files: dict[str, Path | bytes], meta: dict[str, str]) -> None:
        """Write the folder hidden, then rename it into view (the atomic way)."""
        hidden = self.watched / f".{folder}"
        hidden.mkdir(parents=True)
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, hidden / name)
            else:
                (hidden / name).write_bytes(content)
        (hidden / "model.json").write_text(json.dumps(meta))
        hidden.rename(self.watched / folder)


@pytest.fixture(scope="module")
def fp32_dir() -> Path:
    from models.build import BuildOptions, build_all

    warnings.filterwarnings("ignore")
    build_all(BuildOptions(out=BUILD_DIR, eval_sentences=200, variants=("fp32-onnx",)))
    return BUILD_DIR / "fp32-onnx"


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path) -> Iterator[RegistryFleet]:
    fleet = RegistryFleet(broker, tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.mark.slow
def test_dropped_models_are_registered_or_rejected(fleet: RegistryFleet, fp32_dir: Path) -> None:
    fleet.start_controller()
    fleet.drop(
        "minilm-1.0.0",
        {"model.onnx": fp32_dir / "model.onnx", "tokenizer.json": fp32_dir / "tokenizer.json"},
        {"name": "minilm", "version": "1.0.0"},
    )
    wait_for(
        lambda: fleet.version("minilm", "1.0.0").get("state") in {"ready", "rejected"},
        TIMEOUT_S,
        what="minilm 1.0.0 to settle",
    )
    good = fleet.version("minilm", "1.0.0")
    assert good["state"] == "ready", (good, fleet.controller.log_tail(20))
    assert [v["variant"] for v in good["variants"]] == ["fp32-onnx"]

    corrupt = (fp32_dir / "model.onnx").read_bytes()[:300_000]
    fleet.drop("minilm-1.1.0", {"model.onnx": corrupt}, {"name": "minilm", "version": "1.1.0"})
    wait_for(
        lambda: fleet.version("minilm", "1.1.0").get("state") == "rejected",
        TIMEOUT_S,
        what="minilm 1.1.0 to be rejected",
    )
    assert "not a valid ONNX model" in fleet.version("minilm", "1.1.0")["reason"]
    alerts = fleet.http.get("/api/v1/alerts").json()
    assert [a["subject"] for a in alerts["items"]] == ["minilm@1.1.0"]
    assert alerts["items"][0]["kind"] == "model_rejected"
    model = fleet.http.get("/api/v1/models/minilm").json()
    assert model["current_version"] == "1.0.0"

    def logged() -> bool:
        for line in fleet.controller.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("level") == "error" and record.get("msg", "").startswith("alert"):
                return bool(record.get("subject") == "minilm@1.1.0")
        return False

    wait_for(logged, 10, what="the alert in the controller's error log")
