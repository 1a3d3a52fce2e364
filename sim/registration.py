"""Registering a built variant with a running controller, as an operator's upload does.

The benches build their controller with a fresh signing key; a variant built earlier was
signed with the build's key, so its manifest is signed again (with new creation and expiry
times) by the key the controller trusts before ``POST /api/v1/models/{name}/versions``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from models.manifest import Manifest, sign
from models.signing import SigningKey

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def resigned_manifest(variant_dir: Path, key: SigningKey) -> bytes:
    """``variant_dir``'s manifest, valid for 30 days from now and signed by ``key``."""
    body: dict[str, Any] = json.loads((variant_dir / "manifest.json").read_text())["manifest"]
    now = datetime.now(UTC)
    body.update(created_at=now.isoformat(), expires_at=(now + timedelta(days=30)).isoformat())
    return sign(Manifest.model_validate(body), key).model_dump_json().encode()


def upload_variant(
    http: httpx.Client, variant_dir: Path, manifest: bytes, *, model: str = MINILM
) -> httpx.Response:
    """``POST /api/v1/models/{model}/versions`` of an ONNX variant (model, tokenizer and
    ``manifest``); the controller's answer, whatever it is."""
    with (
        (variant_dir / "model.onnx").open("rb") as artifact,
        (variant_dir / "tokenizer.json").open("rb") as tokenizer,
    ):
        return http.post(
            f"/api/v1/models/{model}/versions",
            files={
                "manifest": ("manifest.json", manifest, "application/json"),
                "artifact": ("artifact", artifact, "application/octet-stream"),
                "tokenizer": ("tokenizer.json", tokenizer, "application/json"),
            },
            timeout=120,
        )


def register_variant(
    http: httpx.Client, variant_dir: Path, key: SigningKey, *, model: str = MINILM
) -> str:
    """Upload a variant re-signed by ``key``; returns the registered version.
    ``httpx.HTTPStatusError`` if the controller refuses it."""
    response = upload_variant(http, variant_dir, resigned_manifest(variant_dir, key), model=model)
    response.raise_for_status()
    return str(response.json()["version"])
