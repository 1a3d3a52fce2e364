"""Model delivery on the device: a desired ``policy["model"]`` becomes the serving model.

``ModelPolicyApplier`` plugs into the reconcile seam (``PolicyApplier``): a desired state
whose ``model`` section (``protocol.messages.ModelAssignment``) names another artifact than
the active one is installed by ``ModelInstaller.install`` on the reconcile worker (never on
the MQTT network thread)::

    check the signed manifest (signature, expiry, release >= installed) and that it names
      the assigned digests                                      -> nothing downloaded if not
    downloading  artifact, then tokenizer, by digest (``download.ChunkPuller``, resumable)
    verifying    assemble <state_dir>/models/<sha256>/ (artifact, tokenizer, manifest.json)
    loading      ``models.load_model``: signature, expiry, rollback (persisted release),
                 runtime/opset compatibility, memory, size + sha256, probe; then one warm-up
    active       ``ModelSlots.activate`` (atomic swap, previous kept loaded), then the
                 release counter and the active/previous records are persisted (fsync)

An assignment of the *previous* model (still loaded; a rollout's rollback) is the instant
revert: signature and digests are checked, the release counter is not (it was installed
legitimately before the newer one). Every step is visible in the reported policy's
``model`` section (``ModelStatus``), with
download progress reported at most every ``model_progress_interval_s`` or 10 %. Any failure
leaves the active model untouched, is reported ``failed`` with a typed reason, logged at
error as an alert and counted (``alerts``). ``revert()`` serves the previous model again.

Errors (each carries ``reason``, a short code such as ``digest_mismatch``, ``unknown_key``,
``rollback``)::

    InstallError                 the assignment was not installed; the active model runs on
    ├── PermanentInstallError    the same assignment cannot succeed (bad signature, digest...)
    └── TemporaryInstallError    may succeed when the desired state comes again (link, memory)

Heavy imports (numpy, onnxruntime) happen only when a model is loaded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from edge_agent.clock import Clock
from edge_agent.download import ChunkPuller, DownloadError, PermanentDownloadError
from edge_agent.hotswap import LoadedVariant, ModelSlots, NothingToRevert
from edge_agent.installed import InstallLedger, InstallRecord
from edge_agent.reconcile import JsonPolicyApplier, PolicyApplier, PolicyError
from edge_agent.state import StateError
from models.errors import ModelError, TemporaryModelError
from models.manifest import MANIFEST_FILE, Manifest, parse_signed, verify
from models.signing import Keyring
from protocol.messages import MODEL_POLICY_KEY, ModelAssignment

if TYPE_CHECKING:
    from edge_agent.serving import ServingModel

logger = logging.getLogger(__name__)

PROGRESS_STEP = 0.1
"""A progress report is due at least every 10 % of a download."""
WARM_UP_TEXTS = ["spillway warm-up"]

LoadFn = Callable[[Path, Keyring, int | None], "ServingModel"]
"""``load(variant_dir, trusted_keys, min_release)`` -> a verified, probed model."""
KeyringFn = Callable[[], Keyring]


class InstallError(Exception):
    """The assignment was not installed; the active model is untouched."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class PermanentInstallError(InstallError):
    """Installing the same assignment again cannot succeed."""


class TemporaryInstallError(InstallError):
    """May succeed later (the desired state is delivered again after every reconnect)."""


class ModelState(StrEnum):
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    LOADING = "loading"
    ACTIVE = "active"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelStatus:
    """The ``model`` section of the reported policy."""

    state: ModelState
    progress: float = 0.0
    name: str | None = None
    version: str | None = None
    variant: str | None = None
    artifact_sha256: str | None = None
    release: int | None = None
    reason: str | None = None
    active: dict[str, Any] | None = None
    """What serves now (variant, version, artifact_sha256), when it is not the subject."""

    def as_policy(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "state": self.state.value,
            "progress": round(self.progress, 4),
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "artifact_sha256": self.artifact_sha256,
            "release": self.release,
            "reason": self.reason,
        }
        if self.active is not None:
            doc["active"] = self.active
        return doc


def reason_code(exc: BaseException) -> str:
    """``UnknownKeyError`` -> ``unknown_key``; download errors carry their own."""
    if isinstance(exc, DownloadError):
        return exc.reason
    name = type(exc).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def default_load(intra_op_threads: int) -> LoadFn:
    def load(variant_dir: Path, trusted_keys: Keyring, min_release: int | None) -> ServingModel:
        from edge_agent.serving import serving_model
        from models.loader import load_model

        loaded = load_model(
            variant_dir,
            trusted_keys=trusted_keys,
            min_release=min_release,
            intra_op_threads=intra_op_threads,
        )
        return serving_model(loaded)

    return load


def file_keyring(path: Path | None) -> KeyringFn:
    """The agent's keyring: the PEM Ed25519 public key at ``path``, read at each install."""

    def load() -> Keyring:
        from models.signing import keyring, load_public_key

        if path is None:
            raise PermanentInstallError("no_trusted_key", "the agent has no trusted key file")
        try:
            return keyring([load_public_key(path)])
        except OSError as exc:
            raise TemporaryInstallError(
                "no_trusted_key", f"cannot read {path}: {exc.strerror or exc}"
            ) from exc
        except ValueError as exc:
            raise PermanentInstallError("no_trusted_key", f"{path}: {exc}") from exc

    return load


class ModelInstaller:
    """Installs assignments, keeps the status, reverts. One install at a time."""

    def __init__(
        self,
        *,
        puller: ChunkPuller,
        ledger: InstallLedger,
        slots: ModelSlots,
        clock: Clock,
        trusted_keys: KeyringFn,
        load: LoadFn,
        progress_interval_s: float = 1.0,
    ) -> None:
        self._puller = puller
        self._ledger = ledger
        self._slots = slots
        self._clock = clock
        self._trusted_keys = trusted_keys
        self._load = load
        self._progress_interval_s = progress_interval_s
        self._lock = threading.Lock()
        self._install_lock = threading.Lock()
        self.cancel = threading.Event()
        """Set when the agent stops: a download in progress ends (resumable)."""
        self.on_status: Callable[[], None] = lambda: None
        """Called after every status change worth reporting (the reconciler's progress report)."""
        self._status = self._initial_status()
        self._last_progress = (0.0, 0.0)
        self._counts = {"alerts": 0, "installs": 0, "install_failures": 0, "reverts": 0}

    # -- inspection ------------------------------------------------------------------------

    @property
    def status(self) -> ModelStatus | None:
        with self._lock:
            return self._status

    @property
    def slots(self) -> ModelSlots:
        return self._slots

    @property
    def ledger(self) -> InstallLedger:
        return self._ledger

    def counters(self) -> dict[str, int]:
        with self._lock:
            counts = {f"model_{k}": v for k, v in self._counts.items()}
        counts.update({f"model_{k}": v for k, v in self._puller.counters().items()})
        return counts

    def reported_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        """``policy`` as reported: its ``model`` section replaced by the install status."""
        status = self.status
        if status is None:
            return policy
        return {**policy, MODEL_POLICY_KEY: status.as_policy()}

    # -- installing --------------------------------------------------------------------------

    def is_active(self, assignment: ModelAssignment) -> bool:
        active = self._slots.active
        if active is not None:
            return active.sha256 == assignment.artifact_sha256
        record = self._ledger.current.active
        return record is not None and record.artifact_sha256 == assignment.artifact_sha256

    def ensure(self, assignment: ModelAssignment) -> None:
        """Install ``assignment`` unless it is already the active model (its signed manifest
        is checked either way: an older release of the same bytes is still a replay)."""
        self.install(assignment)

    def install(self, assignment: ModelAssignment) -> LoadedVariant | None:
        """Download, verify, load, warm up and activate; ``InstallError`` says why not.
        Returns the active model (None: already installed, not loaded by this process)."""
        with self._install_lock:
            subject = ModelStatus(
                ModelState.DOWNLOADING,
                name=assignment.name,
                version=assignment.version,
                variant=assignment.variant,
                artifact_sha256=assignment.artifact_sha256,
                active=self._active_summary(),
            )
            try:
                return self._install(assignment, subject)
            except InstallError as exc:
                self._failed(subject, exc)
                raise
            except (DownloadError, ModelError, StateError, OSError) as exc:
                error: InstallError
                if isinstance(exc, PermanentDownloadError):
                    self._puller.discard(assignment.artifact_sha256)
                if isinstance(exc, (DownloadError, TemporaryModelError)) and not isinstance(
                    exc, PermanentDownloadError
                ):
                    error = TemporaryInstallError(reason_code(exc), str(exc))
                elif isinstance(exc, ModelError | PermanentDownloadError):
                    error = PermanentInstallError(reason_code(exc), str(exc))
                else:
                    error = TemporaryInstallError("storage", str(exc))
                self._failed(subject, error)
                raise error from exc

    def _install(self, assignment: ModelAssignment, subject: ModelStatus) -> LoadedVariant | None:
        keys = self._trusted_keys()
        previous = self._slots.previous
        if (
            previous is not None
            and previous.sha256 == assignment.artifact_sha256
            and not self.is_active(assignment)
        ):
            # Assigned the previous model again (a rollout's rollback): it was verified when
            # it was installed and is still loaded, so this is the instant revert; its older
            # release is not a replay. The signature and digests are still checked.
            self._precheck(assignment, keys, replay_check=False)
            return self._revert_locked()
        manifest = self._precheck(assignment, keys)
        active = self._slots.active
        if self.is_active(assignment):
            self._set(self._active_status(), report=False)
            return active  # None: installed earlier, not loaded (the agent does not serve)
        subject = replace(subject, release=manifest.release)
        self._set(subject)
        self._last_progress = (self._clock.monotonic(), 0.0)

        def progress(done: int, total: int) -> None:
            fraction = done / total if total else 1.0
            self._progress(subject, fraction)

        # The small tokenizer first: the devices of a rollout start together, so one
        # publish of it serves them all (fetched last, it is asked for as each one finishes).
        tokenizer = self._puller.fetch(assignment.tokenizer_sha256, None, cancel=self.cancel)
        artifact = self._puller.fetch(
            assignment.artifact_sha256,
            assignment.size_bytes,
            progress=progress,
            cancel=self.cancel,
        )
        self._set(replace(subject, state=ModelState.VERIFYING, progress=1.0))
        record = InstallRecord(
            name=assignment.name,
            version=assignment.version,
            variant=assignment.variant,
            artifact_sha256=assignment.artifact_sha256,
            release=manifest.release,
            release_key=release_key(manifest),
            folder=assignment.artifact_sha256,
        )
        folder = self._assemble(record, manifest, assignment, artifact, tokenizer)
        self._set(replace(subject, state=ModelState.LOADING, progress=1.0))
        try:
            model = self._load(folder, keys, self._ledger.min_release(record.release_key))
            model.embed(WARM_UP_TEXTS)
        except BaseException:
            if not self._in_use(record.folder):
                shutil.rmtree(folder, ignore_errors=True)
            raise
        new = LoadedVariant(model=model, record=record)
        replaced = self._slots.activate(new)
        self._ledger.activate(record, None if replaced is None else replaced.record)
        self._prune()
        with self._lock:
            self._counts["installs"] += 1
        # Reported by the reconciler with the applied generation, once that is persisted.
        self._set(self._active_status(), report=False)
        logger.info(
            "model active",
            extra={
                "variant": record.variant,
                "version": record.version,
                "release": record.release,
                "sha256": record.artifact_sha256,
            },
        )
        return new

    def _precheck(
        self, assignment: ModelAssignment, keys: Keyring, *, replay_check: bool = True
    ) -> Manifest:
        """Refuse before downloading anything: signature, expiry, rollback, digests named."""
        signed = parse_signed(json.dumps(assignment.manifest))
        manifest = verify(signed, trusted_keys=keys, now=self._clock.now())
        if replay_check:
            minimum = self._ledger.min_release(release_key(manifest))
            verify(signed, trusted_keys=keys, now=self._clock.now(), min_release=minimum)
        if (
            manifest.sha256 != assignment.artifact_sha256
            or manifest.size_bytes != assignment.size_bytes
            or manifest.tokenizer_sha256 != assignment.tokenizer_sha256
        ):
            raise PermanentInstallError(
                "assignment_mismatch", "the assignment's digests differ from its signed manifest"
            )
        return manifest

    def _assemble(
        self,
        record: InstallRecord,
        manifest: Manifest,
        assignment: ModelAssignment,
        artifact: Path,
        tokenizer: Path,
    ) -> Path:
        folder = self._ledger.folder(record)
        if self._in_use(record.folder):
            return folder  # e.g. the previous model again: already assembled and loaded
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copyfile(tokenizer, folder / manifest.tokenizer)
        (folder / MANIFEST_FILE).write_text(json.dumps(assignment.manifest))
        artifact.replace(folder / manifest.artifact)  # same filesystem: a rename, no copy
        self._puller.discard(assignment.artifact_sha256)
        return folder

    def _in_use(self, folder: str) -> bool:
        ledger = self._ledger.current
        return any(r is not None and r.folder == folder for r in (ledger.active, ledger.previous))

    def _prune(self) -> None:
        """Only the active and the previous install stay on disk."""
        keep = {r.folder for r in (self._ledger.current.active, self._ledger.current.previous) if r}
        root = self._ledger.models_dir
        if root.is_dir():
            for child in root.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)

    # -- revert --------------------------------------------------------------------------

    def revert(self) -> LoadedVariant:
        """Serve the previous model again (it is loaded: no download, no load)."""
        with self._install_lock:
            back = self._revert_locked()
            self._set(self._active_status())
            return back

    def _revert_locked(self) -> LoadedVariant:
        try:
            back = self._slots.revert()
        except NothingToRevert as exc:
            raise PermanentInstallError("nothing_to_revert", str(exc)) from exc
        if back.record is not None:
            self._ledger.swap_back()
        with self._lock:
            self._counts["reverts"] += 1
        self._set(self._active_status(), report=False)
        logger.info("model reverted", extra={"variant": back.model.variant})
        return back

    # -- start-up --------------------------------------------------------------------------

    def load_installed(self) -> LoadedVariant | None:
        """The recorded active install, loaded and verified (None: nothing usable)."""
        record = self._ledger.current.active
        if record is None:
            return None
        try:
            # Its own release, not the counter: a reverted-to model is older than the counter.
            model = self._load(self._ledger.folder(record), self._trusted_keys(), record.release)
        except (ModelError, InstallError) as exc:
            self._alert("installed model does not load", exc, record.variant)
            return None
        return LoadedVariant(model=model, record=record)

    def set_initial(self, variant: LoadedVariant) -> None:
        """The model the agent starts with (installed, or its configured variant)."""
        self._slots.activate(variant)
        self._set(self._active_status(), report=False)

    # -- status ------------------------------------------------------------------------------

    def _initial_status(self) -> ModelStatus | None:
        record = self._ledger.current.active
        if record is None:
            return None
        return ModelStatus(
            ModelState.ACTIVE,
            progress=1.0,
            name=record.name,
            version=record.version,
            variant=record.variant,
            artifact_sha256=record.artifact_sha256,
            release=record.release,
        )

    def _active_status(self) -> ModelStatus | None:
        active = self._slots.active
        if active is None:
            return self._initial_status()
        record = active.record
        return ModelStatus(
            ModelState.ACTIVE,
            progress=1.0,
            name=record.name if record else None,
            version=record.version if record else None,
            variant=record.variant if record else active.model.variant,
            artifact_sha256=active.sha256,
            release=record.release if record else None,
        )

    def _active_summary(self) -> dict[str, Any] | None:
        status = self._active_status()
        if status is None:
            return None
        return {
            "variant": status.variant,
            "version": status.version,
            "artifact_sha256": status.artifact_sha256,
        }

    def _progress(self, subject: ModelStatus, fraction: float) -> None:
        now = self._clock.monotonic()
        last_at, last_fraction = self._last_progress
        if (
            fraction < 1.0
            and fraction - last_fraction < PROGRESS_STEP
            and now - last_at < self._progress_interval_s
        ):
            with self._lock:
                self._status = replace(subject, progress=fraction)
            return
        self._last_progress = (now, fraction)
        self._set(replace(subject, progress=fraction))

    def _set(self, status: ModelStatus | None, *, report: bool = True) -> None:
        with self._lock:
            self._status = status
        if report:
            try:
                self.on_status()
            except Exception:
                logger.exception("model status report failed")

    def _failed(self, subject: ModelStatus, error: InstallError) -> None:
        with self._lock:
            self._counts["install_failures"] += 1
        self._alert("model install failed", error, subject.variant)
        # Reported with the failed generation by the reconciler: no separate report here.
        self._set(
            replace(
                subject,
                state=ModelState.FAILED,
                reason=str(error)[:500],
                active=self._active_summary(),
            ),
            report=False,
        )

    def reject(self, section: object, error: InstallError) -> None:
        """A ``model`` section that is not even an assignment: report and alert."""
        variant = section.get("variant") if isinstance(section, dict) else None
        subject = ModelStatus(
            ModelState.FAILED,
            variant=variant if isinstance(variant, str) else None,
            active=self._active_summary(),
        )
        self._failed(subject, error)

    def _alert(self, what: str, error: BaseException, variant: str | None) -> None:
        with self._lock:
            self._counts["alerts"] += 1
        logger.error(
            "alert: %s",
            what,
            extra={
                "alert": "model_install_failed",
                "variant": variant,
                "reason": getattr(error, "reason", reason_code(error)),
                "detail": str(error)[:500],
            },
        )


def release_key(manifest: Manifest) -> str:
    """What a release counter is kept per: the signed model name and variant."""
    return f"{manifest.model_name}/{manifest.variant}"


class ModelPolicyApplier:
    """The ``PolicyApplier``: installs ``policy["model"]``, hands the rest to ``inner``."""

    def __init__(self, installer: ModelInstaller, *, inner: PolicyApplier | None = None) -> None:
        self._installer = installer
        self._inner = inner or JsonPolicyApplier()

    def apply(self, generation: int, policy: object) -> dict[str, Any]:
        active = self._inner.apply(generation, policy)
        section = active.get(MODEL_POLICY_KEY)
        if section is None:
            return active
        try:
            assignment = ModelAssignment.model_validate(section)
        except ValidationError as exc:
            error = PermanentInstallError("invalid_assignment", str(exc).splitlines()[0])
            self._installer.reject(section, error)
            raise PolicyError(str(error)) from exc
        try:
            self._installer.ensure(assignment)
        except InstallError as exc:
            raise PolicyError(str(exc)) from exc
        return active
