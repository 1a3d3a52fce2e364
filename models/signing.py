"""Ed25519 keys for manifest signatures: generation, storage, key ids and the trusted keyring.

A key id is derived from the public key (first 16 hex digits of its sha256), so a verifier can hold
several trusted keys at once and keys can rotate: sign new releases with the new key, keep the old
public
key in the keyring until its manifests expire. Private keys never leave the build host.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger(__name__)

#: Trusted public keys by key id; what :func:`models.manifest.verify` accepts.
Keyring = Mapping[str, Ed25519PublicKey]


def key_id_for(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_for(self.public_key)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def keyring(public_keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """Keyring from public keys, each filed under its key id."""
    return {key_id_for(key): key for key in public_keys}


def save_signing_key(key: SigningKey, path: Path) -> None:
    """Write the private key (PEM, unencrypted, mode 0600) and ``<path>.pub`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    public_path(path).write_bytes(
        key.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def load_signing_key(path: Path) -> SigningKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return SigningKey(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def load_or_create_signing_key(path: Path) -> SigningKey:
    """The dev signing key at ``path``; generated (once) when absent."""
    if path.exists():
        return load_signing_key(path)
    key = SigningKey.generate()
    save_signing_key(key, path)
    logger.warning("generated a new dev signing key %s at %s", key.key_id, path)
    return key
