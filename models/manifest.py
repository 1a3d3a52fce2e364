"""The variant manifest that sits beside every artifact, and its Ed25519 signature.

A manifest says what an artifact is (model, variant, precision, runtime, schema), how to check it
(sha256, byte size), whether it is good enough (quality metrics and gate), where it may run
(hardware
classes, memory) and for how long (release counter, expiry). The signed bytes are canonical JSON of
the
manifest (sorted keys, no spaces, UTF-8). :func:`verify` is the one verification path the agent and
the
controller share; it must not import torch or onnxruntime.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from models.errors import (
    BadSignatureError,
    ManifestExpiredError,
    ManifestFormatError,
    RollbackError,
    UnknownKeyError,
)
from models.quality import QualityGate, QualityMetrics
from models.signing import Keyring, SigningKey

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class RuntimeName(StrEnum):
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class HardwareClass(StrEnum):
    X86_CPU = "x86-cpu"
    ARM_CPU = "arm-cpu"
    JETSON = "jetson"
    NVIDIA_GPU = "nvidia-gpu"


class TensorSpec(BaseModel):
    """One input or output: name, element type and shape (strings are dynamic axes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: list[int | str]


class Manifest(BaseModel):
    """Everything a loader needs to decide whether it may, and can, use an artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    model_name: str
    model_version: str
    variant: str
    precision: Precision
    runtime: RuntimeName
    min_runtime_version: str
    opset: int | None = Field(description="ONNX opset; None for non-ONNX artifacts")
    artifact: str = Field(description="file name of the artifact, relative to the manifest")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    tokenizer: str = Field(description="file name of tokenizer.json, relative to the manifest")
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_sequence_length: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quality: QualityMetrics
    quality_gate: QualityGate
    target_hardware: list[HardwareClass]
    memory_bytes: int = Field(ge=0, description="resident memory needed to load and run, bytes")
    created_at: AwareDatetime
    release: int = Field(ge=1, description="monotonic release counter of this model+variant")
    expires_at: AwareDatetime


class SignedManifest(BaseModel):
    """What ``manifest.json`` holds: the manifest as signed, the key id and the signature."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: dict[str, Any]
    key_id: str
    signature: str = Field(description="base64 Ed25519 signature of canonical_json(manifest)")


def canonical_json(value: Any) -> bytes:
    """The signed byte form: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(manifest: Manifest, key: SigningKey) -> SignedManifest:
    body = manifest.model_dump(mode="json")
    signature = key.sign(canonical_json(body))
    return SignedManifest(
        manifest=body, key_id=key.key_id, signature=base64.b64encode(signature).decode()
    )


def parse_signed(raw: bytes | str) -> SignedManifest:
    """Parse the JSON text of a ``manifest.json``; raises :class:`ManifestFormatError`."""
    try:
        return SignedManifest.model_validate_json(raw)
    except ValidationError as exc:
        raise ManifestFormatError(f"not a signed manifest: {exc.errors()[0]['msg']}") from exc


def verify(
    signed: SignedManifest | bytes | str,
    *,
    trusted_keys: Keyring,
    now: datetime,
    min_release: int | None = None,
) -> Manifest:
    """Check signature, schema, expiry (and optionally rollback); return the trusted manifest.

    The signature is checked over the manifest exactly as received, before it is interpreted, so any
    change to any field - or an added one - fails as :class:`BadSignatureError`.
    """
    if not isinstance(signed, SignedManifest):
        signed = parse_signed(signed)
    public_key = trusted_keys.get(signed.key_id)
    if public_key is None:
        raise UnknownKeyError(f"manifest signed by untrusted key id {signed.key_id!r}")
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        public_key.verify(signature, canonical_json(signed.manifest))
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise BadSignatureError(f"signature by key {signed.key_id} does not match") from exc
    try:
        manifest = Manifest.model_validate(signed.manifest)
    except ValidationError as exc:
        raise ManifestFormatError(f"signed manifest has a bad schema: {exc}") from exc
    if now >= manifest.expires_at:
        raise ManifestExpiredError(
            f"{manifest.variant} release {manifest.release} expired at "
            f"{manifest.expires_at.isoformat()}"
        )
    if min_release is not None and manifest.release < min_release:
        raise RollbackError(
            f"{manifest.variant} release {manifest.release} is older than {min_release}"
        )
    return manifest
