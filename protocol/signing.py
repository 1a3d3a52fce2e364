"""Ed25519 signatures on desired state: what is signed, how, and how it is checked.

The controller signs every ``DesiredState`` it publishes; the agent verifies it before it
decides anything. The signed bytes are ``DOMAIN`` followed by canonical JSON (sorted keys,
no insignificant whitespace, UTF-8) of ``{"device_id", "generation", "policy"}``: binding
the device id stops a message signed for one device from being replayed to another, and
binding the generation stops an old document from being relabelled as new. The envelope's
``message_id`` and ``sent_at`` are not signed (republishing may change them).

Key ids are the first 16 hex digits of the sha256 of the raw public key, the same ids
``models.signing`` gives manifest keys, so one keyring format serves both::

    SignatureError            permanent: the message is dropped; ``reason`` is a metric label
    ├── Unsigned              no signature or key id (``unsigned``)
    ├── UnknownKey            signed by a key the verifier does not trust (``unknown_key``)
    └── BadSignature          the signature does not match the content (``bad_signature``)

This module knows neither side; keys come in as ``cryptography`` objects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.messages import DesiredState

DOMAIN = b"spillway-desired-state-v1\n"
"""Prefix of the signed bytes, so a desired-state signature is never valid for anything else."""


class Signer(Protocol):
    """What signs (``models.signing.SigningKey`` is one)."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


class SignatureError(ValueError):
    reason = "invalid_signature"


class Unsigned(SignatureError):
    reason = "unsigned"


class UnknownKey(SignatureError):
    reason = "unknown_key"


class BadSignature(SignatureError):
    reason = "bad_signature"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_bytes(device_id: str, generation: int, policy: Mapping[str, Any]) -> bytes:
    """Exactly what a desired-state signature covers."""
    body = {"device_id": device_id, "generation": generation, "policy": policy}
    return DOMAIN + canonical_json(body)


def sign_desired(message: DesiredState, signer: Signer) -> DesiredState:
    """``message`` with ``key_id`` and ``signature`` filled in."""
    signature = signer.sign(signed_bytes(message.device_id, message.generation, message.policy))
    return message.model_copy(
        update={"key_id": signer.key_id, "signature": base64.b64encode(signature).decode()}
    )


def verify_desired(message: DesiredState, keyring: Mapping[str, Ed25519PublicKey]) -> None:
    """Return when ``message`` is signed by a key in ``keyring``; raise ``SignatureError``."""
    if not message.signature or not message.key_id:
        raise Unsigned(f"generation {message.generation} carries no signature")
    public_key = keyring.get(message.key_id)
    if public_key is None:
        raise UnknownKey(
            f"generation {message.generation} signed by untrusted key {message.key_id}"
        )
    try:
        signature = base64.b64decode(message.signature, validate=True)
        public_key.verify(
            signature, signed_bytes(message.device_id, message.generation, message.policy)
        )
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise BadSignature(
            f"generation {message.generation}: signature by key {message.key_id} does not match"
        ) from exc
