"""Loading published variants, and every reason the loader refuses one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.build import VARIANTS
from models.errors import (
    ArtifactMissingError,
    BadSignatureError,
    CorruptArtifactError,
    DigestMismatchError,
    InsufficientMemoryError,
    ManifestExpiredError,
    ManifestFormatError,
    OpsetUnsupportedError,
    PermanentModelError,
    RuntimeUnavailableError,
    TemporaryModelError,
    TruncatedArtifactError,
    UnknownKeyError,
)
from models.loader import load_model, sha256_file
from models.manifest import MANIFEST_FILE, Manifest, sign
from models.signing import SigningKey, keyring


@pytest.fixture
def variant_copy(build_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the INT8 ONNX variant that a test may damage."""
    return Path(shutil.copytree(build_dir / "int8-onnx", tmp_path / "int8-onnx"))


def _resign(folder: Path, key: SigningKey, **changes: Any) -> None:
    body = json.loads((folder / MANIFEST_FILE).read_text())["manifest"]
    manifest = Manifest.model_validate({**body, **changes})
    (folder / MANIFEST_FILE).write_text(sign(manifest, key).model_dump_json())


@pytest.mark.parametrize("variant", VARIANTS)
def test_loads_every_variant(build_dir: Path, dev_key: SigningKey, variant: str) -> None:
    model = load_model(build_dir / variant, trusted_keys=keyring([dev_key.public_key]))
    vectors = model.embed_texts(["Return the sum of two numbers.", "Open a file."])
    assert vectors.shape == (2, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_batch_api_for_the_agent(build_dir: Path, dev_key: SigningKey) -> None:
    model = load_model(build_dir / "fp32-onnx", trusted_keys=keyring([dev_key.public_key]))
    ids, mask = model.tokenizer.encode_batch(["a b c", "a"], max_length=8)
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape == (2, 5)
    assert model.backend.embed(ids, mask).shape == (2, 384)
    assert model.device == "CPUExecutionProvider"


def test_truncated(variant_copy: Path, dev_key: SigningKey) -> None:
    artifact = variant_copy / "model.onnx"
    artifact.write_bytes(artifact.read_bytes()[:1000])
    with pytest.raises(TruncatedArtifactError):
        load_model(variant_copy, trusted_keys=keyring([dev_key.public_key]))


def test_digest_mismatch(variant_copy: Path, dev_key: SigningKey) -> None:
    artifact = variant_copy / "model.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        load_model(variant_copy, trusted_keys=keyring([dev_key.public_key]))


def test_missing_artifact(variant_copy: Path, dev_key: SigningKey) -> None:
    (variant_copy / "model.onnx").unlink()
    with pytest.raises(ArtifactMissingError):
        load_model(variant_copy, trusted_keys=keyring([dev_key.public_key]))


def test_corrupt_but_correctly_signed(variant_copy: Path, dev_key: SigningKey) -> None:
    artifact = variant_copy / "model.onnx"
    artifact.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
    _resign(variant_copy, dev_key, sha256=sha256_file(artifact), size_bytes=artifact.stat().st_size)
    with pytest.raises(CorruptArtifactError):
        load_model(variant_copy, trusted_keys=keyring([dev_key.public_key]))


def test_bad_signature(variant_copy: Path, dev_key: SigningKey) -> None:
    raw = json.loads((variant_copy / MANIFEST_FILE).read_text())
    raw["manifest"]["memory_bytes"] = 1
    (variant_copy / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BadSignatureError):
        load_model(variant_copy, trusted_keys=keyring([dev_key.public_key]))


def test_unknown_key(variant_copy: Path) -> None:
    with pytest.raises(UnknownKeyError):
        load_model(variant_copy, trusted_keys=keyring([SigningKey.generate().public_key]))


def test_expired(variant_copy: Path, dev_key: SigningKey) -> None:
    with pytest.raises(ManifestExpiredError):
        load_model(
            variant_copy,
            trusted_keys=keyring([dev_key.public_key]),
            now=datetime.now(UTC) + timedelta(days=365),
        )


def test_opset_too_new(variant_copy: Path, dev_key: SigningKey) -> None:
    _resign(variant_copy, dev_key, opset=99)
    with pytest.raises(OpsetUnsupportedError):
        load_model(variant_copy, trusted_keys=keyring([dev_key.public_key]))


def test_runtime_too_old(variant_copy: Path, dev_key: SigningKey) -> None:
    _resign(variant_copy, dev_key, min_runtime_version="99.0")
    with pytest.raises(RuntimeUnavailableError):
        load_model(variant_copy, trusted_keys=keyring([dev_key.public_key]))


def test_not_enough_memory_is_temporary(variant_copy: Path, dev_key: SigningKey) -> None:
    with pytest.raises(InsufficientMemoryError) as info:
        load_model(
            variant_copy, trusted_keys=keyring([dev_key.public_key]), available_memory_bytes=1
        )
    assert isinstance(info.value, TemporaryModelError)


def test_missing_manifest(tmp_path: Path, dev_key: SigningKey) -> None:
    with pytest.raises(ManifestFormatError) as info:
        load_model(tmp_path, trusted_keys=keyring([dev_key.public_key]))
    assert isinstance(info.value, PermanentModelError)


def test_loader_and_manifest_do_not_import_torch() -> None:
    code = "import models.loader, models.manifest, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
