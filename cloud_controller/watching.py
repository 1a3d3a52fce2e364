"""The model auto-loader: folders dropped into ``CloudSettings.model_watch_dir`` become
registered model versions.

A polling scanner, not inotify: it works the same on every file system (NFS, bind
mounts, object-store fuse) and a test can drive it with ``scan()``. Every
``model_watch_interval_s`` it lists the watched folder; a subfolder (``<name>-<version>/``
holding ``model.json`` and a ``.onnx`` or ``.pt`` file, see ``variants``) is taken once two
scans in a row saw the same files with the same sizes and modification times, so a copy
still in progress is never read half-written. Hidden folders (``.name``) are skipped, so
``cp -r x .x && mv .x x`` is the atomic way to drop.

A taken folder is recorded ``detected``, then ``validating`` while ``variants.build``
checks, builds and gates it in this thread (never in a request or on paho's thread);
its blobs then go into the artifact store and its variants into the registry in one
transaction (``ready``). Any failure marks it ``rejected`` with the reason, appends an
alert (``GET /api/v1/alerts``, logged at error) and stores nothing, so the previous
version stays the current one. A version the registry already holds is skipped, so a
restarted controller does not register its watched folder twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cloud_controller import registry, variants
from cloud_controller.artifacts import ArtifactStore, Staged
from cloud_controller.clock import Clock
from cloud_controller.database import one_line
from cloud_controller.entities import VersionSource, VersionState
from cloud_controller.errors import ModelConflict, RegistryError
from cloud_controller.metrics import ControllerMetrics
from cloud_controller.settings import CloudSettings
from cloud_controller.trust import Trust
from models.errors import ModelError

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]
"""(file name, size, mtime_ns) of every file in a folder, sorted."""


def fingerprint(folder: Path) -> Fingerprint:
    entries = []
    for path in folder.iterdir():
        try:
            stat = path.stat()
        except OSError:
            continue  # vanished between listing and stat: the next scan will differ
        entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


@dataclass
class _Seen:
    last: Fingerprint
    done: Fingerprint | None = None
    """The fingerprint it was processed with; processed again only if the files change."""


@dataclass(frozen=True)
class Outcome:
    """What one processed folder became."""

    folder: Path
    name: str | None
    version: str | None
    state: VersionState | None
    """None: skipped (already registered)."""
    reason: str | None = None


@dataclass
class ModelWatcher:
    """Scans the watched folder in its own thread; ``scan()`` is one pass (for tests)."""

    settings: CloudSettings
    engine: Engine
    store: ArtifactStore
    trust: Trust
    metrics: ControllerMetrics
    clock: Clock
    on_outcome: Callable[[Outcome], None] = lambda outcome: None
    _seen: dict[Path, _Seen] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def folder(self) -> Path:
        assert self.settings.model_watch_dir is not None
        return self.settings.model_watch_dir

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()
        logger.info("watching for models", extra={"folder": str(self.folder)})

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the folder in progress (a build is not interrupted)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.scan()
            except Exception:  # the watcher must keep watching
                logger.exception("model watch scan failed")
            self._stopping.wait(self.settings.model_watch_interval_s)

    def scan(self) -> list[Outcome]:
        """Look at the watched folder once; process every folder that is stable."""
        outcomes = []
        try:
            candidates = sorted(p for p in self.folder.iterdir() if p.is_dir())
        except OSError as exc:
            logger.error("cannot list the watched folder %s: %s", self.folder, exc.strerror)
            return []
        for folder in candidates:
            if folder.name.startswith(".") or self._stopping.is_set():
                continue
            current = fingerprint(folder)
            seen = self._seen.get(folder)
            if seen is None or seen.last != current:
                self._seen[folder] = _Seen(last=current, done=seen.done if seen else None)
                continue  # new or still changing: wait for a second look
            if seen.done == current or not current:
                continue
            if not any(name == variants.METADATA_FILE for name, _, _ in current):
                continue  # no metadata yet: maybe still being copied
            seen.done = current
            outcome = self.process(folder)
            outcomes.append(outcome)
            self.on_outcome(outcome)
        for gone in set(self._seen) - set(candidates):
            del self._seen[gone]
        return outcomes

    # -- one folder -------------------------------------------------------------------

    def process(self, folder: Path) -> Outcome:
        """Register one dropped folder; never raises (failures become ``rejected``)."""
        self.metrics.models_detected.inc()
        try:
            drop = variants.read_drop(folder)
        except ModelError as exc:
            identity = variants.folder_identity(folder)
            name, version = identity if identity else (None, None)
            return self._reject_unregistered(folder, name, version, str(exc))
        try:
            with Session(self.engine) as session:
                version_id = registry.begin_version(
                    session,
                    drop.name,
                    drop.version,
                    source=VersionSource.WATCH,
                    state=VersionState.DETECTED,
                    now=self.clock(),
                ).id
        except ModelConflict as exc:
            logger.info("skipping dropped folder: %s", exc, extra={"folder": str(folder)})
            return Outcome(folder, drop.name, drop.version, None, str(exc))
        assert version_id is not None
        subject = f"{drop.name}@{drop.version}"
        staging = self.store.staging_dir()
        try:
            self._set_state(version_id, VersionState.VALIDATING, None)
            built = variants.build(
                drop,
                variants=self.settings.model_watch_variants,
                staging=staging,
                eval_sentences=self.settings.model_eval_sentences,
                release=lambda variant: self._next_release(drop.name, variant),
                key=self.trust.signing_key(),
                now=self.clock(),
                progress=lambda step: logger.info(
                    step, extra={"model": drop.name, "version": drop.version}
                ),
            )
            self._publish(version_id, drop, built)
        except (ModelError, RegistryError, OSError, SQLAlchemyError) as exc:
            reason = one_line(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
            return self._reject(version_id, folder, subject, drop.name, drop.version, reason)
        except Exception as exc:
            logger.exception("unexpected error validating %s", subject)
            reason = f"internal error: {exc!r}"
            return self._reject(version_id, folder, subject, drop.name, drop.version, reason)
        finally:
            variants.remove_staging(staging)
        self.metrics.models_registered.inc()
        logger.info(
            "model version ready",
            extra={
                "model": drop.name,
                "version": drop.version,
                "variants": [b.variant for b in built],
            },
        )
        return Outcome(folder, drop.name, drop.version, VersionState.READY)

    def _next_release(self, name: str, variant: str) -> int:
        with Session(self.engine) as session:
            return registry.next_release(session, name, variant)

    def _set_state(self, version_id: int, state: VersionState, reason: str | None) -> None:
        with Session(self.engine) as session:
            registry.set_state(session, version_id, state, now=self.clock(), reason=reason)

    def _publish(
        self, version_id: int, drop: variants.Drop, built: list[variants.BuiltVariant]
    ) -> None:
        """Blobs into the store, then every variant and the ready state in one commit."""
        staged: list[Staged] = []
        try:
            staged.append(self.store.stage_file(drop.tokenizer))
            for item in built:
                staged.append(self.store.stage_file(item.artifact))
            changed = [
                blob.sha256
                for blob, item in zip(staged[1:], built, strict=True)
                if blob.sha256 != item.signed.manifest["sha256"]
            ]
            if built and staged[0].sha256 != built[0].signed.manifest["tokenizer_sha256"]:
                changed.append(drop.tokenizer.name)
            if changed:
                raise OSError(f"files changed while the model was being registered: {changed}")
        except BaseException:
            for blob in staged:
                self.store.discard(blob)
            raise
        created = [blob.sha256 for blob in staged[1:] if self.store.commit(blob)]
        self.store.commit(staged[0])  # the tokenizer may be shared with other versions: kept
        try:
            with Session(self.engine) as session:
                now = self.clock()
                for item in built:
                    body = item.signed.manifest
                    holder = registry.known_sha256(session, body["sha256"])
                    if holder is not None:
                        raise ModelConflict(
                            f"{item.variant} is identical to the registered {holder}",
                            reason="artifact_exists",
                        )
                    registry.add_variant(
                        session,
                        version_id,
                        signed=item.signed.model_dump(mode="json"),
                        artifact_path=self.store.relative_path(body["sha256"]),
                        now=now,
                    )
                registry.set_state(session, version_id, VersionState.READY, now=now, reason=None)
        except BaseException:
            for sha256 in created:
                self.store.remove(sha256)
            raise

    def _reject(
        self,
        version_id: int,
        folder: Path,
        subject: str,
        name: str,
        version: str,
        reason: str,
    ) -> Outcome:
        try:
            self._set_state(version_id, VersionState.REJECTED, reason)
        except SQLAlchemyError as exc:
            logger.error("could not record the rejection: %s", one_line(exc))
        self._alert(subject, f"{folder.name} rejected: {reason}")
        return Outcome(folder, name, version, VersionState.REJECTED, reason)

    def _reject_unregistered(
        self, folder: Path, name: str | None, version: str | None, reason: str
    ) -> Outcome:
        """A folder whose metadata is unusable: a rejected version when its folder name
        says which one, only an alert when not even that."""
        state = None
        if name is not None and version is not None:
            try:
                with Session(self.engine) as session:
                    registry.begin_version(
                        session,
                        name,
                        version,
                        source=VersionSource.WATCH,
                        state=VersionState.REJECTED,
                        reason=reason,
                        now=self.clock(),
                    )
                state = VersionState.REJECTED
            except ModelConflict as exc:
                logger.info("skipping dropped folder: %s", exc, extra={"folder": str(folder)})
                return Outcome(folder, name, version, None, str(exc))
            except SQLAlchemyError as exc:
                logger.error("could not record the rejection: %s", one_line(exc))
        subject = f"{name}@{version}" if name and version else str(folder)
        self._alert(subject, f"{folder.name} rejected: {reason}")
        return Outcome(folder, name, version, state, reason)

    def _alert(self, subject: str, message: str) -> None:
        self.metrics.models_rejected.inc()
        try:
            with Session(self.engine) as session:
                registry.raise_alert(
                    session,
                    kind=registry.ALERT_MODEL_REJECTED,
                    subject=subject,
                    message=message,
                    now=self.clock(),
                )
        except SQLAlchemyError as exc:
            logger.error("alert not stored: %s", one_line(exc), extra={"subject": subject})
