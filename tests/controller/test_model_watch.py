"""The model auto-loader: a good model dropped into the watched folder becomes a ready
version; a corrupt or incompatible one is rejected with an alert (REST and an error log)
and the previous version stays the current one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.controller.helpers import Controller, wait_for
from tests.controller.model_helpers import ChunkClient, drop_folder

MakeController = Callable[..., Controller]
TIMEOUT_S = 180.0


def _version(controller: Controller, name: str, version: str) -> dict[str, Any]:
    response = controller.http.get(f"/api/v1/models/{name}/versions/{version}")
    return dict(response.json()) if response.status_code == 200 else {}


def _settled(controller: Controller, name: str, version: str) -> dict[str, Any]:
    """Poll until the version is ready or rejected; return it."""
    assert wait_for(
        lambda: _version(controller, name, version).get("state") in {"ready", "rejected"},
        timeout_s=TIMEOUT_S,
    ), f"{name}@{version} never settled: {_version(controller, name, version)}"
    return _version(controller, name, version)


def _tiny_onnx(*, input_name: str = "input_ids") -> bytes:
    """A valid ONNX graph that does not match the embedding schema."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], ["embedding"])],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 384])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 384])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@pytest.fixture
def watch_controller(
    make_controller: MakeController, database_url: str, tmp_path: Path
) -> Controller:
    return make_controller(
        database_url,
        model_watch_dir=tmp_path / "watched",
        model_watch_interval_s=0.1,
        model_watch_variants=(),  # the dropped FP32 only: the INT8 build has its own test
        model_eval_sentences=50,
    )


def test_good_drop_registers_and_corrupt_drops_are_rejected_with_an_alert(
    watch_controller: Controller,
    test_models: Path,
    caplog: pytest.LogCaptureFixture,
    broker: Any,
) -> None:
    caplog.set_level(logging.INFO)
    http = watch_controller.http
    watched = watch_controller.settings.model_watch_dir
    assert watched is not None
    fp32 = test_models / "fp32-onnx"
    drop_folder(
        watched,
        "minilm-1.0.0",
        source=fp32 / "model.onnx",
        metadata={"name": "minilm", "version": "1.0.0"},
        tokenizer=fp32 / "tokenizer.json",
    )
    good = _settled(watch_controller, "minilm", "1.0.0")
    assert good["state"] == "ready", good
    assert good["source"] == "watch" and good["reason"] is None
    (variant,) = good["variants"]
    assert variant["variant"] == "fp32-onnx" and variant["release"] == 1
    assert variant["size_bytes"] == (fp32 / "model.onnx").stat().st_size
    manifest = variant["manifest"]["manifest"]
    assert manifest["model_name"] == "minilm" and manifest["model_version"] == "1.0.0"
    assert manifest["opset"] == 17 and manifest["quality"]["samples"] == 50
    # Signed by the controller's own key, which it trusts: the manifest verifies.
    from datetime import datetime

    from models.manifest import SignedManifest, verify

    runtime = watch_controller.app.state.runtime
    verified = verify(
        SignedManifest.model_validate(variant["manifest"]),
        trusted_keys=runtime.trust.keyring(),
        now=datetime.fromisoformat(manifest["created_at"]),
    )
    assert verified.sha256 == variant["artifact_sha256"]
    assert http.get("/api/v1/models/minilm").json()["current_version"] == "1.0.0"

    truncated = (fp32 / "model.onnx").read_bytes()[: 1 << 20]
    drop_folder(
        watched, "minilm-1.1.0", source=truncated, metadata={"name": "minilm", "version": "1.1.0"}
    )
    drop_folder(
        watched,
        "minilm-1.2.0",
        source=b"\x00garbage" * 1000,
        metadata={"name": "minilm", "version": "1.2.0"},
    )
    drop_folder(
        watched,
        "minilm-1.3.0",
        source=_tiny_onnx(),
        metadata={"name": "minilm", "version": "1.3.0"},
    )
    for version, words in (
        ("1.1.0", "not a valid ONNX model"),
        ("1.2.0", "not a valid ONNX model"),
        ("1.3.0", "does not match the edge's embedding schema"),
    ):
        rejected = _settled(watch_controller, "minilm", version)
        assert rejected["state"] == "rejected", rejected
        assert words in rejected["reason"], rejected["reason"]
        assert rejected["variants"] == []

    model = http.get("/api/v1/models/minilm").json()
    assert model["current_version"] == "1.0.0"  # the previous version stays
    alerts = http.get("/api/v1/alerts", params={"kind": "model_rejected"}).json()
    assert {a["subject"] for a in alerts["items"]} == {
        "minilm@1.1.0",
        "minilm@1.2.0",
        "minilm@1.3.0",
    }
    assert all("rejected" in a["message"] for a in alerts["items"])
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "alert" in r.message]
    assert {getattr(r, "subject", None) for r in errors} >= {"minilm@1.1.0", "minilm@1.2.0"}
    assert watch_controller.metric("spillway_models_rejected_total") == 3
    assert watch_controller.metric("spillway_models_registered_total") == 1
    store = watch_controller.settings.artifact_dir
    blobs = sorted(p.name for p in store.rglob("*") if p.is_file())
    assert variant["artifact_sha256"] in blobs and len(blobs) == 2  # artifact + tokenizer

    # The registered artifact is served to devices.
    client = ChunkClient(broker, "edge-watch-1")
    try:
        header, data = client.ask(variant["artifact_sha256"], 0, 1024)
    finally:
        client.stop()
    assert header.status == "ok" and data == (fp32 / "model.onnx").read_bytes()[:1024]


def test_bad_metadata_is_rejected_and_an_existing_version_is_skipped(
    watch_controller: Controller, test_models: Path
) -> None:
    watched = watch_controller.settings.model_watch_dir
    assert watched is not None
    http = watch_controller.http
    drop_folder(watched, "other-2.0.0", source=b"x", metadata={"name": "other"})
    rejected = _settled(watch_controller, "other", "2.0.0")
    assert "model.json is not valid metadata" in rejected["reason"]
    drop_folder(watched, "no-version-here", source=b"x", metadata={"version": "x.y"})
    assert wait_for(
        lambda: any(
            a["subject"].endswith("no-version-here")
            for a in http.get("/api/v1/alerts").json()["items"]
        ),
        timeout_s=TIMEOUT_S,
    )
    # A folder whose version is already registered is left alone (a restart re-scans).
    drop_folder(
        watched, "other-2.0.0-again", source=b"x", metadata={"name": "other", "version": "2.0.0"}
    )
    runtime = watch_controller.app.state.runtime
    assert wait_for(
        lambda: (
            runtime.watcher._seen.get(watched / "other-2.0.0-again") is not None
            and runtime.watcher._seen[watched / "other-2.0.0-again"].done is not None
        ),
        timeout_s=TIMEOUT_S,
    )
    assert len(http.get("/api/v1/alerts").json()["items"]) == 2
    assert _version(watch_controller, "other", "2.0.0")["state"] == "rejected"


def _fp16_controller(make_controller: MakeController, tmp_path: Path) -> Controller:
    return make_controller(
        f"sqlite:///{tmp_path / 'watch.db'}",
        model_watch_dir=tmp_path / "watched",
        model_watch_interval_s=0.1,
        model_watch_variants=("fp16-onnx",),
        model_eval_sentences=100,
    )


def test_a_reduced_precision_variant_is_built_and_gated_from_the_dropped_fp32(
    make_controller: MakeController, tmp_path: Path, test_models: Path
) -> None:
    controller = _fp16_controller(make_controller, tmp_path)
    watched = controller.settings.model_watch_dir
    assert watched is not None
    drop_folder(
        watched,
        "minilm-2.0.0",
        source=test_models / "fp32-onnx" / "model.onnx",
        metadata={"name": "minilm", "version": "2.0.0"},
    )
    version = _settled(controller, "minilm", "2.0.0")
    assert version["state"] == "ready", version
    by_name = {v["variant"]: v for v in version["variants"]}
    assert set(by_name) == {"fp32-onnx", "fp16-onnx"}
    fp16 = by_name["fp16-onnx"]["manifest"]["manifest"]
    assert fp16["precision"] == "fp16" and fp16["quality"]["samples"] == 100
    assert "reference: the FP32 source" in fp16["quality"]["corpus"]
    gate = fp16["quality_gate"]
    assert fp16["quality"]["mean_cosine"] >= gate["min_mean_cosine"]
    assert fp16["quality"]["top1_agreement"] >= gate["min_top1_agreement"]
    assert by_name["fp16-onnx"]["size_bytes"] < by_name["fp32-onnx"]["size_bytes"]


def test_a_variant_below_its_gate_rejects_the_drop(
    make_controller: MakeController,
    tmp_path: Path,
    test_models: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloud_controller import variants
    from models.quality import QualityGate

    impossible = QualityGate(min_mean_cosine=1.01, min_min_cosine=0.0, min_top1_agreement=0.0)
    monkeypatch.setitem(variants.GATES, "fp16-onnx", impossible)
    controller = _fp16_controller(make_controller, tmp_path)
    watched = controller.settings.model_watch_dir
    assert watched is not None
    drop_folder(
        watched,
        "minilm-3.0.0",
        source=test_models / "fp32-onnx" / "model.onnx",
        metadata={"name": "minilm", "version": "3.0.0"},
    )
    version = _settled(controller, "minilm", "3.0.0")
    assert version["state"] == "rejected"
    assert "fp16-onnx below its quality gate: mean cosine" in version["reason"]
    assert controller.http.get("/api/v1/models/minilm").json()["current_version"] is None
    blobs = [p for p in controller.settings.artifact_dir.rglob("*") if p.is_file()]
    assert blobs == []  # nothing of a rejected drop is stored
