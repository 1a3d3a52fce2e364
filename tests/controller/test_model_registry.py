"""The model registry over REST: signed uploads, listing, deprecation, assignment, alerts.

Uploads are checked before anything is stored: a bad signature, an unknown key, a flipped
byte or a wrong size is refused with a 4xx and leaves the artifact store empty.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cloud_controller.entities import VersionSource, VersionState
from models.signing import SigningKey
from tests.controller.helpers import Controller, ManualClock, SimAgent, wait_for
from tests.controller.model_helpers import (
    MINILM,
    built_manifest,
    store_files,
    synthetic,
    tamper,
    upload,
)

MakeController = Callable[..., Controller]


@pytest.fixture
def registry_controller(
    make_controller: MakeController, database_url: str, test_models: Path
) -> Controller:
    """A controller whose clock is now (the built manifests expire in 90 days) and which
    trusts the dev key the test models were signed with."""
    return make_controller(
        database_url,
        clock=ManualClock(datetime.now(UTC)),
        trusted_keys_dir=test_models / "keys",
    )


def test_upload_of_a_built_variant_registers_it_ready(
    registry_controller: Controller, test_models: Path
) -> None:
    http = registry_controller.http
    variant_dir = test_models / "fp32-onnx"
    manifest = (variant_dir / "manifest.json").read_bytes()
    response = upload(
        http,
        MINILM,
        manifest,
        variant_dir / "model.onnx",
        tokenizer=variant_dir / "tokenizer.json",
    )
    assert response.status_code == 201, response.text
    body = response.json()
    expected = built_manifest(test_models, "fp32-onnx")["manifest"]
    assert body["model"] == MINILM and body["version"] == expected["model_version"]
    assert body["state"] == VersionState.READY and body["source"] == VersionSource.UPLOAD
    (variant,) = body["variants"]
    assert variant["variant"] == "fp32-onnx"
    assert variant["artifact_sha256"] == expected["sha256"]
    assert variant["size_bytes"] == expected["size_bytes"]
    assert variant["manifest"] == built_manifest(test_models, "fp32-onnx")

    sha = expected["sha256"]
    stored = registry_controller.settings.artifact_dir / sha[:2] / sha
    assert stored.stat().st_size == expected["size_bytes"]
    tokenizer = registry_controller.settings.artifact_dir / expected["tokenizer_sha256"][:2]
    assert (tokenizer / expected["tokenizer_sha256"]).is_file()

    listed = http.get("/api/v1/models").json()
    assert listed["total"] == 1
    assert listed["items"][0] == {
        "name": MINILM,
        "created_at": listed["items"][0]["created_at"],
        "current_version": "1.0.0",
        "versions": 1,
    }
    model = http.get(f"/api/v1/models/{MINILM}").json()
    assert model["current_version"] == "1.0.0"
    assert [v["version"] for v in model["versions"]] == ["1.0.0"]
    one = http.get(f"/api/v1/models/{MINILM}/versions/1.0.0").json()
    assert one == body

    again = upload(http, MINILM, manifest, variant_dir / "model.onnx")
    assert again.status_code == 409, again.text
    assert again.json()["reason"] in {"variant_exists", "artifact_exists"}
    assert registry_controller.metric("spillway_model_uploads_total", outcome="ready") == 1


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_uploads_that_fail_a_check_are_refused_and_store_nothing(
    registry_controller: Controller, test_models: Path
) -> None:
    http = registry_controller.http
    data = os.urandom(10_000)
    tokenizer = (test_models / "fp32-onnx" / "tokenizer.json").read_bytes()
    good = synthetic(test_models, data, model_name="tiny", variant="fp32-onnx")
    stranger = SigningKey.generate()
    cases = {
        "digest_mismatch": (422, good, _flip(data, 5_000)),
        "size_mismatch": (422, good, data[:-1]),
        "bad_signature": (422, tamper(good, release=99), data),
        "unknown_key": (
            422,
            synthetic(test_models, data, key=stranger, model_name="tiny"),
            data,
        ),
        "name_mismatch": (422, synthetic(test_models, data, model_name="other"), data),
        "bad_manifest": (400, b"{not json", data),
    }
    for reason, (status, manifest, artifact) in cases.items():
        response = upload(http, "tiny", manifest, artifact, tokenizer=tokenizer)
        assert response.status_code == status, (reason, response.text)
        assert response.json()["reason"] == reason, response.text
        assert response.json()["detail"]
    longer = upload(http, "tiny", good, data + b"x", tokenizer=tokenizer)
    assert longer.status_code == 422 and longer.json()["reason"] == "size_mismatch"

    assert store_files(registry_controller) == []
    assert http.get("/api/v1/models").json()["total"] == 0
    assert http.get("/api/v1/models/tiny").status_code == 404

    ok = upload(http, "tiny", good, data, tokenizer=tokenizer)
    assert ok.status_code == 201, ok.text
    assert registry_controller.metric("spillway_model_uploads_total", outcome="unknown_key") == 1


def test_expired_manifest_and_oversized_upload(
    make_controller: MakeController, database_url: str, test_models: Path
) -> None:
    controller = make_controller(
        database_url,
        clock=ManualClock(datetime(2100, 1, 1, tzinfo=UTC)),
        trusted_keys_dir=test_models / "keys",
        max_upload_bytes=5_000,
    )
    data = os.urandom(1_000)
    expired = upload(controller.http, "tiny", synthetic(test_models, data, model_name="tiny"), data)
    assert expired.status_code == 422 and expired.json()["reason"] == "manifest_expired"

    big = os.urandom(6_000)
    manifest = synthetic(
        test_models, big, model_name="tiny", now=datetime(2099, 12, 31, tzinfo=UTC)
    )
    too_large = upload(controller.http, "tiny", manifest, big)
    assert too_large.status_code == 413, too_large.text
    assert store_files(controller) == []


def test_a_tokenizer_must_come_with_the_first_upload(
    registry_controller: Controller, test_models: Path
) -> None:
    data = os.urandom(1_000)
    manifest = synthetic(test_models, data, model_name="tiny")
    response = upload(registry_controller.http, "tiny", manifest, data)
    assert response.status_code == 422 and response.json()["reason"] == "tokenizer_missing"
    assert store_files(registry_controller) == []


def _register_tiny(
    controller: Controller, models_dir: Path, *, version: str = "1.0.0", variant: str = "fp32-onnx"
) -> dict[str, object]:
    data = os.urandom(3_000)
    tokenizer = (models_dir / "fp32-onnx" / "tokenizer.json").read_bytes()
    manifest = synthetic(
        models_dir, data, model_name="tiny", model_version=version, variant=variant
    )
    response = upload(controller.http, "tiny", manifest, data, tokenizer=tokenizer)
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_versions_order_and_deprecation(registry_controller: Controller, test_models: Path) -> None:
    http = registry_controller.http
    _register_tiny(registry_controller, test_models, version="1.2.0")
    _register_tiny(registry_controller, test_models, version="1.10.0")
    _register_tiny(registry_controller, test_models, version="1.10.0", variant="fp16-onnx")
    model = http.get("/api/v1/models/tiny").json()
    assert model["current_version"] == "1.10.0"  # PEP 440 order, not string order
    assert [v["version"] for v in model["versions"]] == ["1.10.0", "1.2.0"]
    assert [v["variant"] for v in model["versions"][0]["variants"]] == ["fp16-onnx", "fp32-onnx"]

    deprecated = http.post("/api/v1/models/tiny/versions/1.10.0/deprecate")
    assert deprecated.status_code == 200, deprecated.text
    assert deprecated.json()["state"] == VersionState.DEPRECATED
    assert http.get("/api/v1/models/tiny").json()["current_version"] == "1.2.0"
    twice = http.post("/api/v1/models/tiny/versions/1.10.0/deprecate")
    assert twice.status_code == 409 and twice.json()["reason"] == "already_deprecated"

    late = _register_tiny_response(registry_controller, test_models, "1.10.0", "fp32-onnx")
    assert late.status_code == 409 and late.json()["reason"] == "version_deprecated"
    assert http.post("/api/v1/models/tiny/versions/9.9.9/deprecate").status_code == 404
    assert http.get("/api/v1/models/tiny/versions/9.9.9").status_code == 404
    assert http.get("/api/v1/models/nope").status_code == 404


def _register_tiny_response(
    controller: Controller, models_dir: Path, version: str, variant: str
) -> object:
    data = os.urandom(2_000)
    manifest = synthetic(
        models_dir, data, model_name="tiny", model_version=version, variant=variant
    )
    return upload(controller.http, "tiny", manifest, data)


def test_assigning_a_model_sets_the_desired_state_and_keeps_the_policy(
    registry_controller: Controller,
    test_models: Path,
    agents: Callable[..., SimAgent],
) -> None:
    http = registry_controller.http
    version = _register_tiny(registry_controller, test_models)
    variants = version["variants"]
    assert isinstance(variants, list)
    variant = variants[0]
    agent = agents("edge-model-1")
    agent.hello()
    assert wait_for(lambda: registry_controller.has_device("edge-model-1"))
    first = http.put("/api/v1/devices/edge-model-1/desired", json={"policy": {"batch": 8}})
    assert first.status_code == 200, first.text

    body = {"name": "tiny", "version": "1.0.0", "variant": "fp32-onnx"}
    response = http.put("/api/v1/devices/edge-model-1/model", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["generation"] == 2
    policy = registry_controller.device("edge-model-1")["desired"]["policy"]
    assert policy["batch"] == 8
    assert policy["model"] == {
        "name": "tiny",
        "version": "1.0.0",
        "variant": "fp32-onnx",
        "artifact_sha256": variant["artifact_sha256"],
        "size_bytes": variant["size_bytes"],
        "tokenizer_sha256": variant["tokenizer_sha256"],
        "manifest": variant["manifest"],
    }
    manifest = policy["model"]["manifest"]["manifest"]
    assert manifest["sha256"] == variant["artifact_sha256"]

    unknown = http.put("/api/v1/devices/edge-model-1/model", json={**body, "variant": "x"})
    assert unknown.status_code == 404
    no_device = http.put("/api/v1/devices/nobody/model", json=body)
    assert no_device.status_code == 404
    extra = http.put("/api/v1/devices/edge-model-1/model", json={**body, "sha": "1"})
    assert extra.status_code == 422
    assert http.post("/api/v1/models/tiny/versions/1.0.0/deprecate").status_code == 200
    gone = http.put("/api/v1/devices/edge-model-1/model", json=body)
    assert gone.status_code == 409 and gone.json()["reason"] == "version_deprecated"
    assert registry_controller.device("edge-model-1")["desired"]["generation"] == 2


def test_alerts_are_paged_newest_first(registry_controller: Controller) -> None:
    from sqlmodel import Session

    from cloud_controller import registry

    engine = registry_controller.app.state.runtime.engine
    with Session(engine) as session:
        for i in range(5):
            registry.raise_alert(
                session,
                kind="model_rejected" if i % 2 == 0 else "other",
                subject=f"m@{i}",
                message=f"number {i}",
                now=registry_controller.clock(),
            )
    page = registry_controller.http.get("/api/v1/alerts", params={"page_size": 2}).json()
    assert page["total"] == 5 and [a["subject"] for a in page["items"]] == ["m@4", "m@3"]
    only = registry_controller.http.get("/api/v1/alerts", params={"kind": "model_rejected"})
    assert [a["subject"] for a in only.json()["items"]] == ["m@4", "m@2", "m@0"]
    too_big = registry_controller.http.get("/api/v1/alerts", params={"page_size": 10_000})
    assert too_big.status_code == 422


def test_sha256_of_stored_blob_matches_its_name(
    registry_controller: Controller, test_models: Path
) -> None:
    _register_tiny(registry_controller, test_models)
    blobs = [p for p in store_files(registry_controller) if p.parent.name != "tmp"]
    assert blobs
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        assert blob.parent.name == blob.name[:2]
