"""Which manifest signatures the controller accepts, and the key it signs with.

The keyring is every ``*.pub`` Ed25519 key (PEM) in ``CloudSettings.trusted_keys_dir``
plus the public half of the controller's own signing key (``signing_key_path``), so the
manifests it signs for models built from the watched directory verify like any other.
The keyring is read again on each use: adding a key file takes effect without a restart.
Knows nothing of the database, MQTT or HTTP.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud_controller.settings import CloudSettings
from models.signing import (
    Keyring,
    SigningKey,
    keyring,
    load_or_create_signing_key,
    load_public_key,
    public_path,
)

logger = logging.getLogger(__name__)


class Trust:
    """The controller's keys, as its settings name them."""

    def __init__(self, settings: CloudSettings) -> None:
        self._key_path = settings.signing_key_path
        self._trusted_dir = settings.trusted_keys_dir
        self._lock = threading.Lock()
        self._signing_key: SigningKey | None = None

    def signing_key(self) -> SigningKey:
        """The controller's signing key, generated on first use when absent."""
        with self._lock:
            if self._signing_key is None:
                self._signing_key = load_or_create_signing_key(self._key_path)
            return self._signing_key

    def keyring(self) -> Keyring:
        """Trusted public keys by key id; unreadable key files are skipped with a warning."""
        keys: list[Ed25519PublicKey] = []
        paths: list[Path] = []
        if self._trusted_dir is not None and self._trusted_dir.is_dir():
            paths.extend(sorted(self._trusted_dir.glob("*.pub")))
        own = public_path(self._key_path)
        if own.is_file():
            paths.append(own)
        for path in paths:
            try:
                keys.append(load_public_key(path))
            except (OSError, ValueError) as exc:
                logger.warning(
                    "skipping trusted key file", extra={"path": str(path), "error": str(exc)}
                )
        return keyring(keys)
