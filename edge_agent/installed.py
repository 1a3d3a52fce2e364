"""What model installs the agent must remember across restarts: ``models.json``.

* ``releases`` - per signed ``model_name/variant``, the highest manifest release ever
  activated. A manifest with a lower release is refused (``min_release``), so replaying an
  older signed manifest fails after a restart too.
* ``active`` and ``previous`` - the installed folders (``<state_dir>/models/<sha256>/``:
  artifact, tokenizer, manifest.json) of the running model and of the one kept for revert.

Written like ``state.py`` writes (temporary file, fsync, rename, fsync of the directory):
after a crash the file holds the old or the new content, never a mix. Knows no MQTT and
no model runtime::

    StateError             (from ``state``) the file cannot be read or written
    └── CorruptState       models.json exists but is not what this agent wrote
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.state import CorruptState, StateError, write_atomic

LEDGER_FILE = "models.json"
MODELS_DIR = "models"
STAGING_DIR = "staging"


@dataclass(frozen=True)
class InstallRecord:
    """One installed variant: where it lies and what it is."""

    name: str
    version: str
    variant: str
    artifact_sha256: str
    release: int
    release_key: str
    """``model_name/variant`` from the signed manifest: what ``releases`` is keyed by."""
    folder: str
    """Folder name under ``<state_dir>/models``."""

    @classmethod
    def from_json(cls, raw: object, path: Path) -> InstallRecord:
        if not isinstance(raw, dict):
            raise CorruptState(f"{path}: an install record is not an object")
        try:
            record = cls(**raw)
        except TypeError as exc:
            raise CorruptState(f"{path}: install record malformed ({exc})") from exc
        if not isinstance(record.release, int) or not isinstance(record.folder, str):
            raise CorruptState(f"{path}: install record malformed")
        return record


@dataclass(frozen=True)
class Ledger:
    releases: dict[str, int] = field(default_factory=dict)
    active: InstallRecord | None = None
    previous: InstallRecord | None = None


class InstallLedger:
    """Reads and writes ``models.json`` in the state dir; all methods are thread-safe."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LEDGER_FILE
        self.models_dir = state_dir / MODELS_DIR
        self.staging_dir = state_dir / STAGING_DIR
        self._lock = threading.Lock()
        self._ledger = self._load()

    @property
    def current(self) -> Ledger:
        with self._lock:
            return self._ledger

    def min_release(self, release_key: str) -> int | None:
        """The lowest release a manifest for ``release_key`` may carry (None: any)."""
        with self._lock:
            return self._ledger.releases.get(release_key)

    def folder(self, record: InstallRecord) -> Path:
        return self.models_dir / record.folder

    def activate(self, record: InstallRecord, previous: InstallRecord | None) -> None:
        """Record ``record`` as active (raising its release counter) and ``previous``."""
        with self._lock:
            releases = dict(self._ledger.releases)
            releases[record.release_key] = max(releases.get(record.release_key, 0), record.release)
            ledger = Ledger(releases, record, previous)
            self._save(ledger)
            self._ledger = ledger

    def swap_back(self) -> None:
        """After a revert: previous becomes active and the other way round (counters stay)."""
        with self._lock:
            old = self._ledger
            ledger = Ledger(dict(old.releases), old.previous, old.active)
            self._save(ledger)
            self._ledger = ledger

    def _save(self, ledger: Ledger) -> None:
        doc = {
            "releases": ledger.releases,
            "active": None if ledger.active is None else asdict(ledger.active),
            "previous": None if ledger.previous is None else asdict(ledger.previous),
        }
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create {self.state_dir}: {exc.strerror or exc}") from exc
        write_atomic(self.path, json.dumps(doc, sort_keys=True).encode())

    def _load(self) -> Ledger:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return Ledger()
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            raw: Any = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptState(f"{self.path} is not valid JSON ({exc})") from exc
        releases = raw.get("releases") if isinstance(raw, dict) else None
        if not isinstance(releases, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in releases.items()
        ):
            raise CorruptState(f"{self.path}: releases must map model/variant to an integer")
        active = raw.get("active")
        previous = raw.get("previous")
        return Ledger(
            dict(releases),
            None if active is None else InstallRecord.from_json(active, self.path),
            None if previous is None else InstallRecord.from_json(previous, self.path),
        )
