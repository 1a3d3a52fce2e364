"""What the agent must remember across restarts, written atomically to ``state_dir``.

Two small JSON files:

* ``boot.json`` - the boot counter; every start bumps it (``boot_epoch``) so the
  controller can tell a restart from a reconnect.
* ``applied.json`` - the last applied desired generation, the active policy and the
  last failed apply. It is written *before* the agent reports, so a report never
  claims more than the disk holds, and a restart never re-applies a generation.

Every write goes to a temporary file in the same directory, is fsync'ed, renamed over
the old file and the directory is fsync'ed: after a crash or power cut the file holds
either the old or the new content, never a torn mix. This module knows no MQTT::

    StateError               permanent: the state directory cannot be used as it is
    └── CorruptState         a state file exists but is not what this agent wrote
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOOT_FILE = "boot.json"
APPLIED_FILE = "applied.json"


class StateError(RuntimeError):
    """The state directory cannot be read or written; the message names the file."""


class CorruptState(StateError):
    """A state file is unreadable; removing it resets that part of the state."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StateError(f"cannot write {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class FailedApply:
    """The most recent desired generation that could not be applied."""

    generation: int
    error: str


@dataclass(frozen=True)
class AppliedState:
    """What is running: ``generation`` 0 means no desired state was ever applied."""

    generation: int = 0
    policy: dict[str, Any] = field(default_factory=dict)
    last_failure: FailedApply | None = None

    @property
    def observed_generation(self) -> int:
        """The newest generation the agent has acted on, applied or failed."""
        if self.last_failure is not None and self.last_failure.generation > self.generation:
            return self.last_failure.generation
        return self.generation


class StateStore:
    """Reads and writes the agent's state files under one directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def ensure_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create state dir {self.state_dir}: {exc.strerror or exc}"
            ) from exc

    # -- boot epoch ------------------------------------------------------------------

    def next_boot_epoch(self) -> int:
        """Persist and return the previous boot epoch + 1 (1 on a fresh device)."""
        self.ensure_dir()
        raw = self._read(BOOT_FILE)
        previous = 0
        if raw is not None:
            value = raw.get("boot_epoch")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CorruptState(f"{self.state_dir / BOOT_FILE}: boot_epoch is {value!r}")
            previous = value
        epoch = previous + 1
        write_atomic(self.state_dir / BOOT_FILE, json.dumps({"boot_epoch": epoch}).encode())
        return epoch

    # -- applied desired state -------------------------------------------------------

    def load_applied(self) -> AppliedState:
        raw = self._read(APPLIED_FILE)
        if raw is None:
            return AppliedState()
        path = self.state_dir / APPLIED_FILE
        generation = raw.get("generation")
        policy = raw.get("policy")
        failure = raw.get("last_failure")
        if not isinstance(generation, int) or generation < 0 or not isinstance(policy, dict):
            raise CorruptState(f"{path}: expected generation >= 0 and a policy object")
        last_failure = None
        if failure is not None:
            if not (
                isinstance(failure, dict)
                and isinstance(failure.get("generation"), int)
                and isinstance(failure.get("error"), str)
            ):
                raise CorruptState(f"{path}: last_failure is malformed")
            last_failure = FailedApply(failure["generation"], failure["error"])
        return AppliedState(generation, policy, last_failure)

    def save_applied(self, state: AppliedState) -> None:
        self.ensure_dir()
        doc = {
            "generation": state.generation,
            "policy": state.policy,
            "last_failure": (
                None
                if state.last_failure is None
                else {
                    "generation": state.last_failure.generation,
                    "error": state.last_failure.error,
                }
            ),
        }
        write_atomic(self.state_dir / APPLIED_FILE, json.dumps(doc, sort_keys=True).encode())

    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.state_dir / name
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptState(f"{path} is not valid JSON; remove it to reset ({exc})") from exc
        if not isinstance(raw, dict):
            raise CorruptState(f"{path} does not hold a JSON object; remove it to reset")
        return raw
