"""Automatic loading of a published variant: verify, check, then open the right runtime.

``load_model(variant_dir, ...)`` reads ``manifest.json``, verifies its signature and expiry
(:func:`models.manifest.verify`), checks that this host can run it (runtime installed and new
enough,
opset supported, enough free memory), checks the artifact's size and sha256 and only then opens it:
``.onnx`` -> an ONNX Runtime session on the best execution provider (TensorRT -> CUDA -> CPU),
``.pt`` ->
``torch.jit.load``, ``.int8.safetensors`` -> eager encoder with bitsandbytes INT8 layers. A one-row
probe inference must succeed before anything is returned, so a caller gets
either a working model or a typed error - never something half-loaded.

Errors (all from :mod:`models.errors`; permanent = do not retry this artifact, temporary = retry
later)::

    ModelError
    ├── PermanentModelError
    │   ├── ManifestError: ManifestFormatError, SignatureError (UnknownKeyError,
    │   │                  BadSignatureError), ManifestExpiredError, RollbackError
    │   ├── ArtifactIntegrityError: ArtifactMissingError, TruncatedArtifactError,
    │   │                           DigestMismatchError, CorruptArtifactError
    │   └── IncompatibleArtifactError: RuntimeUnavailableError, OpsetUnsupportedError
    └── TemporaryModelError
        └── InsufficientMemoryError

torch is imported lazily, only on the ``.pt`` path: devices run this module without it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from packaging.version import InvalidVersion, Version

from models.backends import EmbeddingBackend, OnnxBackend, TorchBackend, onnx_session
from models.errors import (
    ArtifactMissingError,
    CorruptArtifactError,
    DigestMismatchError,
    InsufficientMemoryError,
    ManifestFormatError,
    ModelError,
    OpsetUnsupportedError,
    RuntimeUnavailableError,
    TruncatedArtifactError,
)
from models.manifest import MANIFEST_FILE, Manifest, RuntimeName, verify
from models.signing import Keyring
from models.tokenization import EmbeddingTokenizer

logger = logging.getLogger(__name__)

#: Highest ONNX opset each ONNX Runtime release line runs (from ORT's compatibility table).
_ORT_MAX_OPSET = ((Version("1.23"), 23), (Version("1.21"), 22), (Version("1.18"), 21))
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoadedModel:
    """A verified, opened variant: its manifest, an inference backend and the matching tokenizer."""

    manifest: Manifest
    backend: EmbeddingBackend
    tokenizer: EmbeddingTokenizer
    #: Execution provider (ONNX) or ``"torchscript"``.
    device: str

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.tokenizer.encode_batch(texts, self.manifest.max_sequence_length)
        return self.backend.embed(ids, mask)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def installed_version(distribution: str) -> Version | None:
    for name in (distribution, f"{distribution}-gpu"):
        try:
            return Version(importlib.metadata.version(name).split("+")[0])
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_compatible(manifest: Manifest) -> None:
    """Raise :class:`IncompatibleArtifactError` unless this host has a runtime that can run it."""
    distribution = "onnxruntime" if manifest.runtime is RuntimeName.ONNXRUNTIME else "torch"
    have = installed_version(distribution)
    if have is None:
        raise RuntimeUnavailableError(f"{manifest.variant} needs {distribution}, not installed")
    try:
        need = Version(manifest.min_runtime_version)
    except InvalidVersion as exc:
        raise ManifestFormatError(
            f"bad min_runtime_version {manifest.min_runtime_version}"
        ) from exc
    if have < need:
        raise RuntimeUnavailableError(
            f"{manifest.variant} needs {distribution}>={need}, have {have}"
        )
    if manifest.runtime is RuntimeName.ONNXRUNTIME:
        if manifest.opset is None:
            raise ManifestFormatError(f"{manifest.variant}: an ONNX artifact must name its opset")
        max_opset = next((op for v, op in _ORT_MAX_OPSET if have >= v), 17)
        if manifest.opset > max_opset:
            raise OpsetUnsupportedError(
                f"{manifest.variant} uses opset {manifest.opset}; "
                f"onnxruntime {have} runs <= {max_opset}"
            )


def check_memory(manifest: Manifest, available_bytes: int | None) -> None:
    if available_bytes is None:
        import psutil

        available_bytes = int(psutil.virtual_memory().available)
    if manifest.memory_bytes > available_bytes:
        raise InsufficientMemoryError(
            f"{manifest.variant} needs {manifest.memory_bytes / 2**20:.0f} MiB, "
            f"{available_bytes / 2**20:.0f} MiB free"
        )


def check_file(path: Path, *, size_bytes: int, sha256: str) -> None:
    """Raise unless ``path`` exists with exactly this size and digest."""
    if not path.is_file():
        raise ArtifactMissingError(f"{path} is missing")
    size = path.stat().st_size
    if size != size_bytes:
        raise TruncatedArtifactError(f"{path.name} is {size} bytes, manifest says {size_bytes}")
    digest = sha256_file(path)
    if digest != sha256:
        raise DigestMismatchError(f"{path.name} sha256 {digest[:12]}… != manifest {sha256[:12]}…")


@contextmanager
def _runtime_errors(what: str) -> Iterator[None]:
    """Translate whatever the runtime raises while opening ``what`` into CorruptArtifactError."""
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:
        raise CorruptArtifactError(f"{what} could not be opened by the runtime: {exc}") from exc


def _open_backend(
    path: Path, manifest: Manifest, *, intra_op_threads: int
) -> tuple[EmbeddingBackend, str]:
    if path.suffix == ".onnx":
        session = onnx_session(str(path), intra_op_threads=intra_op_threads)
        backend = OnnxBackend(session)
        return backend, backend.provider
    if path.suffix == ".pt":
        import torch

        module = torch.jit.load(str(path), map_location="cpu").eval()
        return TorchBackend(module), "torchscript"
    if path.name.endswith(".int8.safetensors"):
        return _open_bnb(path), "torch-bnb-int8"
    raise CorruptArtifactError(f"unknown artifact format {path.suffix!r} for {manifest.variant}")


def _open_bnb(path: Path) -> EmbeddingBackend:
    """bitsandbytes INT8 weights -> eager encoder (bnb modules cannot be TorchScript-serialised)."""
    from safetensors.torch import load_file

    from models.checkpoint import EncoderConfig
    from models.encoder import SentenceEncoder
    from models.quantization import bnb_int8_encoder

    module = bnb_int8_encoder(SentenceEncoder(EncoderConfig()))
    module.load_state_dict(load_file(str(path)), strict=True)
    return TorchBackend(module.eval())


def load_model(
    variant_dir: Path,
    *,
    trusted_keys: Keyring,
    now: datetime | None = None,
    min_release: int | None = None,
    available_memory_bytes: int | None = None,
    intra_op_threads: int = 0,
) -> LoadedModel:
    """Verify and open the variant in ``variant_dir`` (holding ``manifest.json``).

    ``intra_op_threads`` sizes ONNX Runtime's intra-op pool (0: ORT's default, one per physical
    core). Torch variants use torch's process-wide setting (``torch.set_num_threads``), which a
    loader has no business changing.
    """
    manifest_path = variant_dir / MANIFEST_FILE
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise ManifestFormatError(f"cannot read {manifest_path}: {exc.strerror}") from exc
    manifest = verify(
        raw,
        trusted_keys=trusted_keys,
        now=datetime.now(UTC) if now is None else now,
        min_release=min_release,
    )
    check_compatible(manifest)
    check_memory(manifest, available_memory_bytes)
    artifact = variant_dir / manifest.artifact
    tokenizer_path = variant_dir / manifest.tokenizer
    check_file(artifact, size_bytes=manifest.size_bytes, sha256=manifest.sha256)
    if not tokenizer_path.is_file():
        raise ArtifactMissingError(f"{tokenizer_path} is missing")
    if sha256_file(tokenizer_path) != manifest.tokenizer_sha256:
        raise DigestMismatchError(f"{tokenizer_path.name} sha256 differs from the manifest")
    with _runtime_errors(artifact.name):
        backend, device = _open_backend(artifact, manifest, intra_op_threads=intra_op_threads)
        tokenizer = EmbeddingTokenizer.from_file(
            tokenizer_path, max_length=manifest.max_sequence_length
        )
        probe = backend.embed(*tokenizer.encode_batch(["probe"]))
        width = manifest.outputs[0].shape[-1]
        if probe.shape != (1, width) or not np.all(np.isfinite(probe)):
            raise CorruptArtifactError(f"{artifact.name} probe gave shape {probe.shape}")
    logger.info("loaded %s release %s on %s", manifest.variant, manifest.release, device)
    return LoadedModel(manifest=manifest, backend=backend, tokenizer=tokenizer, device=device)
