"""The artifact store: model files on disk, content-addressed by sha256.

A blob lives at ``<root>/<sha[:2]>/<sha>``. Writing goes through a temporary file in
``<root>/tmp`` (same file system): data is copied in 1 MiB pieces while hashed, fsynced,
then renamed into place and the directory fsynced, so a crash leaves either the whole
blob or none, never a torn one. A blob is immutable; storing one that is already there
only drops the temporary file. ``stage`` and ``commit`` are split so that a caller can
check digest and size *before* anything becomes visible: an upload that fails its checks
leaves nothing behind.

Knows nothing of the database, MQTT or HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_PIECE = 1 << 20


class BlobTooLarge(ValueError):
    """The data exceeded the byte limit it was staged under."""


@dataclass(frozen=True)
class Staged:
    """A written, fsynced temporary file and what it holds; not yet in the store."""

    path: Path
    sha256: str
    size_bytes: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Blobs under ``root``; safe to use from several threads (renames are atomic)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def relative_path(self, sha256: str) -> str:
        """Where a blob lies relative to the root (what the registry records)."""
        return f"{sha256[:2]}/{sha256}"

    def path_for(self, sha256: str) -> Path:
        return self.root / self.relative_path(sha256)

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def staging_dir(self) -> Path:
        """A fresh private folder on the store's file system (the caller removes it)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="build-", dir=self.tmp))

    def stage(self, source: BinaryIO, *, max_bytes: int | None = None) -> Staged:
        """Copy ``source`` into a temporary file while hashing it; raises ``BlobTooLarge``
        (and removes the file) past ``max_bytes``."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="blob-", dir=self.tmp)
        path = Path(name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while piece := source.read(_PIECE):
                    size += len(piece)
                    if max_bytes is not None and size > max_bytes:
                        raise BlobTooLarge(f"more than {max_bytes} bytes")
                    digest.update(piece)
                    out.write(piece)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Staged(path=path, sha256=digest.hexdigest(), size_bytes=size)

    def stage_file(self, source: Path, *, max_bytes: int | None = None) -> Staged:
        with source.open("rb") as f:
            return self.stage(f, max_bytes=max_bytes)

    def commit(self, staged: Staged) -> bool:
        """Move a staged file into place; True when it created the blob, False when the
        store already held it (the staged copy is dropped)."""
        target = self.path_for(staged.sha256)
        if target.is_file():
            staged.path.unlink(missing_ok=True)
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.path, 0o644)
        os.replace(staged.path, target)
        _fsync_dir(target.parent)
        logger.info(
            "artifact stored", extra={"sha256": staged.sha256, "size_bytes": staged.size_bytes}
        )
        return True

    def discard(self, staged: Staged) -> None:
        staged.path.unlink(missing_ok=True)

    def remove(self, sha256: str) -> None:
        """Delete a blob (only for one this process just created and nothing refers to)."""
        self.path_for(sha256).unlink(missing_ok=True)


def read_range(path: Path, offset: int, length: int) -> bytes:
    """Exactly the bytes ``[offset, offset + length)`` of ``path`` (fewer at its end):
    one seek and bounded reads, never the whole file."""
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        parts: list[bytes] = []
        left = length
        while left > 0:
            piece = f.read(min(left, _PIECE))
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
    return b"".join(parts)
