"""Manifest signing and the single verification path: tampering, unknown and rotated keys,
expiry."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from models.errors import (
    BadSignatureError,
    ManifestExpiredError,
    ManifestFormatError,
    RollbackError,
    UnknownKeyError,
)
from models.manifest import (
    HardwareClass,
    Manifest,
    Precision,
    RuntimeName,
    SignedManifest,
    TensorSpec,
    canonical_json,
    sign,
    verify,
)
from models.quality import QualityGate, QualityMetrics
from models.signing import SigningKey, keyring

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def make_manifest(**overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "model_name": "sentence-transformers/all-MiniLM-L6-v2",
        "model_version": "1.0.0",
        "variant": "int8-onnx",
        "precision": Precision.INT8,
        "runtime": RuntimeName.ONNXRUNTIME,
        "min_runtime_version": "1.18",
        "opset": 17,
        "artifact": "model.onnx",
        "sha256": "a" * 64,
        "size_bytes": 1234,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": "b" * 64,
        "max_sequence_length": 256,
        "inputs": [TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
        "outputs": [TensorSpec(name="embedding", dtype="float32", shape=["batch", 384])],
        "quality": QualityMetrics(
            mean_cosine=0.99, min_cosine=0.98, top1_agreement=0.9, samples=1200, corpus="stdlib"
        ),
        "quality_gate": QualityGate(
            min_mean_cosine=0.9, min_min_cosine=0.9, min_top1_agreement=0.8
        ),
        "target_hardware": [HardwareClass.X86_CPU],
        "memory_bytes": 1 << 20,
        "created_at": NOW,
        "release": 3,
        "expires_at": NOW + timedelta(days=30),
    }
    fields.update(overrides)
    return Manifest(**fields)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def test_round_trip(key: SigningKey) -> None:
    manifest = make_manifest()
    signed = sign(manifest, key)
    raw = signed.model_dump_json()
    assert verify(raw, trusted_keys=keyring([key.public_key]), now=NOW) == manifest


def test_signed_bytes_are_canonical(key: SigningKey) -> None:
    signed = sign(make_manifest(), key)
    text = canonical_json(signed.manifest).decode()
    assert " " not in text.replace("all-MiniLM", "")
    assert text.index('"artifact"') < text.index('"variant"')


def _tampered_values() -> list[tuple[str, Any]]:
    body = make_manifest().model_dump(mode="json")
    changes: list[tuple[str, Any]] = []
    for name, value in body.items():
        if isinstance(value, bool):
            changes.append((name, not value))
        elif isinstance(value, int | float):
            changes.append((name, value + 1))
        elif isinstance(value, str):
            changes.append((name, value[:-1] + ("0" if value[-1] != "0" else "1")))
        elif isinstance(value, list):
            changes.append((name, value[:-1] if len(value) > 1 else [*value, value[0]]))
        elif isinstance(value, dict):
            changes.append((name, {**value, next(iter(value)): "tampered"}))
        else:
            changes.append((name, "tampered"))
    return changes


@pytest.mark.parametrize(("field", "value"), _tampered_values(), ids=lambda v: str(v)[:20])
def test_tampering_with_any_field_fails(key: SigningKey, field: str, value: Any) -> None:
    signed = sign(make_manifest(), key)
    body = {**signed.manifest, field: value}
    forged = SignedManifest(manifest=body, key_id=signed.key_id, signature=signed.signature)
    with pytest.raises(BadSignatureError):
        verify(forged, trusted_keys=keyring([key.public_key]), now=NOW)


def test_added_field_fails(key: SigningKey) -> None:
    signed = sign(make_manifest(), key)
    forged = signed.model_copy(update={"manifest": {**signed.manifest, "extra": 1}})
    with pytest.raises(BadSignatureError):
        verify(forged, trusted_keys=keyring([key.public_key]), now=NOW)


def test_garbage_signature_fails(key: SigningKey) -> None:
    signed = sign(make_manifest(), key)
    forged = signed.model_copy(update={"signature": base64.b64encode(b"x" * 64).decode()})
    with pytest.raises(BadSignatureError):
        verify(forged, trusted_keys=keyring([key.public_key]), now=NOW)


def test_unknown_key(key: SigningKey) -> None:
    other = SigningKey.generate()
    with pytest.raises(UnknownKeyError):
        verify(sign(make_manifest(), other), trusted_keys=keyring([key.public_key]), now=NOW)


def test_key_id_pointing_at_a_different_trusted_key(key: SigningKey) -> None:
    other = SigningKey.generate()
    signed = sign(make_manifest(), other).model_copy(update={"key_id": key.key_id})
    with pytest.raises(BadSignatureError):
        verify(signed, trusted_keys=keyring([key.public_key, other.public_key]), now=NOW)


def test_rotated_key(key: SigningKey) -> None:
    new = SigningKey.generate()
    old_release = sign(make_manifest(release=3), key)
    new_release = sign(make_manifest(release=4), new)
    during = keyring([key.public_key, new.public_key])
    assert verify(old_release, trusted_keys=during, now=NOW).release == 3
    assert verify(new_release, trusted_keys=during, now=NOW).release == 4
    after = keyring([new.public_key])  # old key retired
    with pytest.raises(UnknownKeyError):
        verify(old_release, trusted_keys=after, now=NOW)


def test_expiry(key: SigningKey) -> None:
    signed = sign(make_manifest(), key)
    ring = keyring([key.public_key])
    verify(signed, trusted_keys=ring, now=NOW + timedelta(days=29))
    with pytest.raises(ManifestExpiredError):
        verify(signed, trusted_keys=ring, now=NOW + timedelta(days=30))


def test_rollback(key: SigningKey) -> None:
    with pytest.raises(RollbackError):
        verify(
            sign(make_manifest(release=3), key),
            trusted_keys=keyring([key.public_key]),
            now=NOW,
            min_release=4,
        )


@pytest.mark.parametrize("raw", [b"", b"not json", b"{}", b'{"manifest": 1}'])
def test_malformed(key: SigningKey, raw: bytes) -> None:
    with pytest.raises(ManifestFormatError):
        verify(raw, trusted_keys=keyring([key.public_key]), now=NOW)
