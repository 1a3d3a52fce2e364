"""The operating policy on the device: trusting desired state, checking and running a policy.

Two jobs, both between the reconcile loop and the running components:

* ``DesiredVerifier`` checks the controller's Ed25519 signature on every desired-state
  message before the reconcile loop looks at its generation (``protocol.signing``). The
  keys are the files ``EdgeSettings.desired_keys()`` names, read at each message, so a key
  added during a rotation takes effect without a restart. No key configured: every
  message is rejected (``no_trusted_key``), unless ``allow_unsigned_desired`` (dev only).
* ``OperatingPolicyApplier`` validates ``policy[POLICY_KEY]`` (a ``PolicySection``) while a
  generation is applied: a bad section fails the generation, the running values stay.
  ``OperatingPolicy.activate`` puts the values into the running components once the
  generation is committed (and at start, from the persisted state): the batcher's and
  offload controller's values and the telemetry interval. Without a section the agent
  runs its local ``EdgeSettings`` values (``runtime_policy.local_policy``).

Variant preferences travel in the document for whoever assigns variants; the agent only
reports them. This module knows no MQTT.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge_agent.reconcile import JsonPolicyApplier, PolicyApplier, PolicyError
from edge_agent.runtime_policy import local_policy
from edge_agent.settings import EdgeSettings
from models.signing import keyring, load_public_key
from protocol.messages import DesiredState
from protocol.policy import (
    POLICY_KEY,
    Policy,
    PolicySection,
)
from protocol.signing import SignatureError, verify_desired

logger = logging.getLogger(__name__)


class NoTrustedKey(SignatureError):
    reason = "no_trusted_key"


class DesiredVerifier:
    """Raises ``SignatureError`` for desired state this agent must not act on."""

    def __init__(self, key_files: Sequence[Path], *, allow_unsigned: bool = False) -> None:
        self._key_files = tuple(key_files)
        self._allow_unsigned = allow_unsigned
        if allow_unsigned:
            logger.warning("desired-state signatures are NOT checked (allow_unsigned_desired)")
        elif not key_files:
            logger.warning("no desired-state key configured: every desired state is rejected")

    def __call__(self, message: DesiredState) -> None:
        if self._allow_unsigned:
            return
        keys = []
        for path in self._key_files:
            try:
                keys.append(load_public_key(path))
            except (OSError, ValueError) as exc:
                logger.warning("unusable desired-state key %s: %s", path, exc)
        if not keys:
            raise NoTrustedKey(
                f"generation {message.generation}: no usable desired-state key "
                f"({', '.join(map(str, self._key_files)) or 'none configured'})"
            )
        verify_desired(message, keyring(keys))


def section_of(document: Mapping[str, Any]) -> PolicySection | None:
    """The policy section of an applied document (None: none); ``PolicyError`` if invalid."""
    raw = document.get(POLICY_KEY)
    if raw is None:
        return None
    try:
        return PolicySection.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise PolicyError(f"invalid {POLICY_KEY}: {where}: {error['msg']}") from exc


class OperatingPolicyApplier:
    """The ``PolicyApplier`` step that checks the policy section, then hands on to ``inner``."""

    def __init__(self, inner: PolicyApplier | None = None) -> None:
        self._inner = inner or JsonPolicyApplier()

    def apply(self, generation: int, policy: object) -> dict[str, Any]:
        active = self._inner.apply(generation, policy)
        section_of(active)
        return active


Consumer = Callable[[Policy], None]


class OperatingPolicy:
    """The policy in force, and the components it drives (``add_consumer``)."""

    def __init__(self, settings: EdgeSettings) -> None:
        self._local = local_policy(settings)
        self._lock = threading.Lock()
        self._current = self._local
        self._sources: list[str] = []
        self._consumers: list[Consumer] = []
        self.activations = 0

    @property
    def current(self) -> Policy:
        with self._lock:
            return self._current

    @property
    def sources(self) -> list[str]:
        """``name@version`` of the policies merged into the current one ([]: none)."""
        with self._lock:
            return list(self._sources)

    def add_consumer(self, consumer: Consumer) -> None:
        self._consumers.append(consumer)

    def activate(self, document: Mapping[str, Any]) -> None:
        """Run the policy section of an applied document (its absence: local settings).
        An invalid section (only possible in a state file from elsewhere) is logged and the
        current values are kept."""
        try:
            section = section_of(document)
        except PolicyError as exc:
            logger.error("operating policy not activated: %s", exc)
            return
        policy = self._local if section is None else section.document
        sources = [] if section is None else [f"{s.name}@{s.version}" for s in section.sources]
        with self._lock:
            changed = policy != self._current
            self._current = policy
            self._sources = sources
        if not changed:
            return
        for consumer in self._consumers:
            try:
                consumer(policy)
            except Exception:
                logger.exception("a component did not take the operating policy")
        self.activations += 1
        logger.info(
            "operating policy active",
            extra={
                "sources": sources,
                "max_batch_size": policy.batching.max_batch_size,
                "telemetry_interval_s": policy.telemetry.interval_s,
                "slo_ms": policy.offload.slo_ms,
            },
        )
