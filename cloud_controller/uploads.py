"""Registering an uploaded variant: a signed manifest plus the artifact (and tokenizer).

The order makes a failed upload leave nothing behind: the manifest is verified first
(``models.manifest.verify`` against the trusted keyring: signature, schema, expiry), its
model name is checked against the URL's, then the artifact and tokenizer are streamed
into the store's temporary area while hashed; only when size and sha256 match the
manifest are they moved into place and the variant recorded, in one transaction. The
manifest was signed by a trusted builder that quality-gated the artifact, so an upload
becomes ``ready`` at once. Errors of ``models`` are translated here, into the registry's
(400/409/413/422 at the HTTP boundary); upper layers never see them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from cloud_controller import registry
from cloud_controller.artifacts import ArtifactStore, BlobTooLarge, Staged
from cloud_controller.entities import VersionPublic
from cloud_controller.errors import (
    ModelConflict,
    UploadMalformed,
    UploadRejected,
    UploadTooLarge,
)
from models.errors import (
    BadSignatureError,
    ManifestExpiredError,
    ManifestFormatError,
    ModelError,
    UnknownKeyError,
)
from models.manifest import Manifest, parse_signed, verify
from models.signing import Keyring

logger = logging.getLogger(__name__)

_MODEL_REASONS: tuple[tuple[type[ModelError], str], ...] = (
    (UnknownKeyError, "unknown_key"),
    (BadSignatureError, "bad_signature"),
    (ManifestExpiredError, "manifest_expired"),
)


@dataclass(frozen=True)
class Upload:
    """What a client sent: the manifest's bytes and the open files."""

    manifest: bytes
    artifact: BinaryIO
    tokenizer: BinaryIO | None = None


def verify_manifest(raw: bytes, *, name: str, trusted_keys: Keyring, now: datetime) -> Manifest:
    """The trusted manifest of an upload, or a registry error saying why not."""
    try:
        signed = parse_signed(raw)
    except ManifestFormatError as exc:
        raise UploadMalformed(str(exc), reason="bad_manifest") from exc
    try:
        manifest = verify(signed, trusted_keys=trusted_keys, now=now)
    except ModelError as exc:
        reason = next((r for cls, r in _MODEL_REASONS if isinstance(exc, cls)), "bad_manifest")
        raise UploadRejected(str(exc), reason=reason) from exc
    if manifest.model_name != name:
        raise UploadRejected(
            f"manifest is for model {manifest.model_name!r}, not {name!r}", reason="name_mismatch"
        )
    try:
        registry.check_version(manifest.model_version)
    except ValueError as exc:
        raise UploadRejected(str(exc), reason="bad_version") from exc
    return manifest


def _stage(
    store: ArtifactStore, source: BinaryIO, *, what: str, sha256: str, size_bytes: int, limit: int
) -> Staged:
    """Stage ``source`` and check it against the manifest; nothing stays on failure."""
    try:
        staged = store.stage(source, max_bytes=min(limit, size_bytes))
    except BlobTooLarge as exc:
        raise UploadRejected(
            f"{what} is larger than the {size_bytes} bytes its manifest says",
            reason="size_mismatch",
        ) from exc
    if staged.size_bytes != size_bytes:
        store.discard(staged)
        raise UploadRejected(
            f"{what} is {staged.size_bytes} bytes, manifest says {size_bytes}",
            reason="size_mismatch",
        )
    if staged.sha256 != sha256:
        store.discard(staged)
        raise UploadRejected(
            f"{what} sha256 {staged.sha256[:12]}… differs from the manifest's {sha256[:12]}…",
            reason="digest_mismatch",
        )
    return staged


def register(
    upload: Upload,
    *,
    name: str,
    engine: Engine,
    store: ArtifactStore,
    trusted_keys: Keyring,
    max_bytes: int,
    now: datetime,
) -> VersionPublic:
    """Verify, store and record one uploaded variant; see the module docstring."""
    manifest = verify_manifest(upload.manifest, name=name, trusted_keys=trusted_keys, now=now)
    if manifest.size_bytes > max_bytes:
        raise UploadTooLarge(
            f"artifact of {manifest.size_bytes} bytes exceeds the limit of {max_bytes}"
        )
    with Session(engine) as session:
        holder = registry.known_sha256(session, manifest.sha256)
    if holder is not None:
        raise ModelConflict(
            f"artifact {manifest.sha256[:12]}… is already registered as {holder}",
            reason="artifact_exists",
        )
    staged: list[Staged] = []
    try:
        staged.append(
            _stage(
                store,
                upload.artifact,
                what="artifact",
                sha256=manifest.sha256,
                size_bytes=manifest.size_bytes,
                limit=max_bytes,
            )
        )
        if upload.tokenizer is not None:
            staged.append(
                _stage(
                    store,
                    upload.tokenizer,
                    what="tokenizer",
                    sha256=manifest.tokenizer_sha256,
                    size_bytes=_tokenizer_size(upload.tokenizer, max_bytes),
                    limit=max_bytes,
                )
            )
        elif not store.has(manifest.tokenizer_sha256):
            raise UploadRejected(
                f"tokenizer {manifest.tokenizer_sha256[:12]}… is not in the store; "
                "send it in the 'tokenizer' part",
                reason="tokenizer_missing",
            )
    except BaseException:
        for item in staged:
            store.discard(item)
        raise
    created = [item.sha256 for item in staged if store.commit(item)]
    signed = parse_signed(upload.manifest).model_dump(mode="json")
    try:
        with Session(engine) as session:
            return registry.register_upload(
                session,
                name,
                manifest.model_version,
                signed=signed,
                artifact_path=store.relative_path(manifest.sha256),
                now=now,
            )
    except (ModelConflict, IntegrityError) as exc:
        for sha256 in created:
            if sha256 == manifest.sha256:  # a tokenizer may be shared: keep it
                store.remove(sha256)
        if isinstance(exc, IntegrityError):
            raise ModelConflict(
                f"{name}@{manifest.model_version}/{manifest.variant} was registered concurrently",
                reason="conflict",
            ) from exc
        raise


def _tokenizer_size(source: BinaryIO, limit: int) -> int:
    """The tokenizer's manifest gives no size: measure the upload (a spooled file)."""
    position = source.tell()
    size = source.seek(0, 2) - position
    source.seek(position)
    if size > limit:
        raise UploadTooLarge(f"tokenizer of {size} bytes exceeds the limit of {limit}")
    return size
