"""The model registry in the database: models, versions, variants and operator alerts.

Every write goes through here; each function takes an open ``Session`` and commits. A
version moves ``detected -> validating -> ready | rejected`` (the watched directory) or is
created ``ready`` (a signed upload); only a ready version may be deprecated. The *current*
version of a model is its highest ready one in PEP 440 order, so a rejected or deprecated
newer version leaves the previous one current. What the chunk server may serve is decided
here too (``servable``): artifacts and tokenizers of ready versions only.

Knows nothing of files, MQTT or HTTP; ``ModelNotFound``/``ModelConflict`` are mapped to
404/409 at the HTTP boundary.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from packaging.version import InvalidVersion, Version
from sqlmodel import Session, col, select

from cloud_controller.entities import (
    Alert,
    AlertPublic,
    Model,
    ModelPublic,
    ModelSummary,
    ModelVariant,
    ModelVersion,
    VariantPublic,
    VersionPublic,
    VersionSource,
    VersionState,
)
from cloud_controller.errors import ModelConflict, ModelNotFound

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$")
"""A model name: one slug or ``org/slug`` (as Hugging Face names them)."""

ALERT_MODEL_REJECTED = "model_rejected"


def check_name(name: str) -> str:
    """Return ``name`` if it is a usable model name, else raise ``ValueError``."""
    if not _NAME.match(name) or len(name) > 128:
        raise ValueError(
            f"model name {name!r} must be a slug of letters, digits, '_', '.', '-' "
            "or org/slug, at most 128 characters"
        )
    return name


def check_version(version: str) -> str:
    """Return ``version`` if it parses as a PEP 440 / semantic version, else raise."""
    if len(version) > 64:
        raise ValueError(f"version {version[:70]!r}... is longer than 64 characters")
    try:
        Version(version)
    except InvalidVersion as exc:
        raise ValueError(f"version {version!r} is not a version number (e.g. 1.2.0)") from exc
    return version


def _sort_key(version: str) -> tuple[int, Version | str]:
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, version)


# -- reads --------------------------------------------------------------------------------


def _model(session: Session, name: str) -> Model:
    model = session.exec(select(Model).where(col(Model.name) == name)).first()
    if model is None:
        raise ModelNotFound(f"model {name!r} not found")
    return model


def _version(session: Session, name: str, version: str) -> tuple[Model, ModelVersion]:
    model = _model(session, name)
    row = session.exec(
        select(ModelVersion).where(
            col(ModelVersion.model_id) == model.id, col(ModelVersion.version) == version
        )
    ).first()
    if row is None:
        raise ModelNotFound(f"model {name!r} has no version {version!r}")
    return model, row


def _versions(session: Session, model_id: int) -> list[ModelVersion]:
    rows = session.exec(select(ModelVersion).where(col(ModelVersion.model_id) == model_id)).all()
    return sorted(rows, key=lambda row: _sort_key(row.version), reverse=True)


def _current(versions: list[ModelVersion]) -> str | None:
    """The highest ready version of ``versions`` (sorted newest first)."""
    return next((v.version for v in versions if v.state == VersionState.READY), None)


def _variants(session: Session, version_ids: list[int]) -> dict[int, list[ModelVariant]]:
    by_version: dict[int, list[ModelVariant]] = {vid: [] for vid in version_ids}
    if version_ids:
        rows = session.exec(
            select(ModelVariant)
            .where(col(ModelVariant.version_id).in_(version_ids))
            .order_by(col(ModelVariant.variant))
        ).all()
        for row in rows:
            by_version[row.version_id].append(row)
    return by_version


def _version_public(model: Model, row: ModelVersion, variants: list[ModelVariant]) -> VersionPublic:
    return VersionPublic(
        model=model.name,
        version=row.version,
        state=row.state,
        reason=row.reason,
        source=row.source,
        created_at=row.created_at,
        updated_at=row.updated_at,
        variants=[VariantPublic.model_validate(v, from_attributes=True) for v in variants],
    )


def list_models(session: Session, *, page: int, page_size: int) -> tuple[list[ModelSummary], int]:
    total = session.exec(select(sa.func.count()).select_from(Model)).one()
    models = session.exec(
        select(Model).order_by(col(Model.name)).offset((page - 1) * page_size).limit(page_size)
    ).all()
    items = []
    for model in models:
        assert model.id is not None
        versions = _versions(session, model.id)
        items.append(
            ModelSummary(
                name=model.name,
                created_at=model.created_at,
                current_version=_current(versions),
                versions=len(versions),
            )
        )
    return items, int(total)


def get_model(session: Session, name: str) -> ModelPublic:
    model = _model(session, name)
    assert model.id is not None
    versions = _versions(session, model.id)
    variants = _variants(session, [v.id for v in versions if v.id is not None])
    return ModelPublic(
        name=model.name,
        created_at=model.created_at,
        current_version=_current(versions),
        versions=[_version_public(model, v, variants[v.id or 0]) for v in versions],
    )


def get_version(session: Session, name: str, version: str) -> VersionPublic:
    model, row = _version(session, name, version)
    assert row.id is not None
    return _version_public(model, row, _variants(session, [row.id])[row.id])


def current_version(session: Session, name: str) -> str | None:
    model = _model(session, name)
    assert model.id is not None
    return _current(_versions(session, model.id))


def version_exists(session: Session, name: str, version: str) -> bool:
    try:
        _version(session, name, version)
    except ModelNotFound:
        return False
    return True


def next_release(session: Session, name: str, variant: str) -> int:
    """One more than the highest release of ``variant`` of model ``name`` registered so far."""
    highest = session.exec(
        select(sa.func.max(ModelVariant.release))
        .join(ModelVersion, col(ModelVersion.id) == col(ModelVariant.version_id))
        .join(Model, col(Model.id) == col(ModelVersion.model_id))
        .where(col(Model.name) == name, col(ModelVariant.variant) == variant)
    ).one()
    return int(highest or 0) + 1


def resolve_variant(session: Session, name: str, version: str, variant: str) -> ModelVariant:
    """The variant to assign to a device: it must exist in a ready version."""
    _, row = _version(session, name, version)
    if row.state != VersionState.READY:
        why = f" ({row.reason})" if row.reason else ""
        raise ModelConflict(
            f"{name}@{version} is {row.state}{why}, not ready",
            reason=f"version_{row.state}",
        )
    found = session.exec(
        select(ModelVariant).where(
            col(ModelVariant.version_id) == row.id, col(ModelVariant.variant) == variant
        )
    ).first()
    if found is None:
        raise ModelNotFound(f"{name}@{version} has no variant {variant!r}")
    return found


@dataclass(frozen=True)
class Servable:
    """A blob the chunk server may hand out."""

    relative_path: str | None
    """Recorded path of an artifact; None for a tokenizer (the store derives it)."""
    size_bytes: int | None


def servable(session: Session, sha256: str) -> Servable | None:
    """The artifact or tokenizer with this digest, if a ready version holds it."""
    ready = col(ModelVersion.state) == VersionState.READY.value
    joined = select(ModelVariant).join(
        ModelVersion, col(ModelVersion.id) == col(ModelVariant.version_id)
    )
    artifact = session.exec(
        joined.where(col(ModelVariant.artifact_sha256) == sha256, ready)
    ).first()
    if artifact is not None:
        return Servable(relative_path=artifact.artifact_path, size_bytes=artifact.size_bytes)
    tokenizer = session.exec(
        joined.where(col(ModelVariant.tokenizer_sha256) == sha256, ready).limit(1)
    ).first()
    if tokenizer is not None:
        return Servable(relative_path=None, size_bytes=None)
    return None


def why_not_servable(session: Session, sha256: str) -> str:
    """Why the chunk server refuses this digest, in words for the device."""
    row = session.exec(
        select(Model.name, ModelVersion.version, ModelVersion.state)
        .select_from(ModelVariant)
        .join(ModelVersion, col(ModelVersion.id) == col(ModelVariant.version_id))
        .join(Model, col(Model.id) == col(ModelVersion.model_id))
        .where(col(ModelVariant.artifact_sha256) == sha256)
    ).first()
    if row is None:
        return f"no artifact with sha256 {sha256[:12]}… is registered"
    return f"artifact {sha256[:12]}… belongs to {row[0]}@{row[1]}, which is {row[2]}"


def known_sha256(session: Session, sha256: str) -> str | None:
    """``name@version/variant`` already holding this artifact digest, if any."""
    row = session.exec(
        select(Model.name, ModelVersion.version, ModelVariant.variant)
        .join(ModelVersion, col(ModelVersion.id) == col(ModelVariant.version_id))
        .join(Model, col(Model.id) == col(ModelVersion.model_id))
        .where(col(ModelVariant.artifact_sha256) == sha256)
    ).first()
    return None if row is None else f"{row[0]}@{row[1]}/{row[2]}"


# -- writes -------------------------------------------------------------------------------


def _get_or_create_model(session: Session, name: str, *, now: datetime) -> Model:
    model = session.exec(select(Model).where(col(Model.name) == name)).first()
    if model is None:
        model = Model(name=name, created_at=now)
        session.add(model)
        session.flush()
    return model


def begin_version(
    session: Session,
    name: str,
    version: str,
    *,
    source: VersionSource,
    state: VersionState,
    now: datetime,
    reason: str | None = None,
) -> ModelVersion:
    """Create a version (and its model when new) and commit; ``ModelConflict`` if it exists."""
    model = _get_or_create_model(session, name, now=now)
    existing = session.exec(
        select(ModelVersion).where(
            col(ModelVersion.model_id) == model.id, col(ModelVersion.version) == version
        )
    ).first()
    if existing is not None:
        session.rollback()
        raise ModelConflict(
            f"{name}@{version} is already registered ({existing.state})",
            reason="version_exists",
        )
    assert model.id is not None
    row = ModelVersion(
        model_id=model.id,
        version=version,
        state=state,
        reason=reason,
        source=source,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    logger.info("model version %s", state.value, extra={"model": name, "version": version})
    return row


def set_state(
    session: Session, version_id: int, state: VersionState, *, now: datetime, reason: str | None
) -> None:
    row = session.get(ModelVersion, version_id)
    if row is None:
        raise ModelNotFound(f"model version id {version_id} vanished")
    row.state = state
    row.reason = reason
    row.updated_at = now
    session.add(row)
    session.commit()


def add_variant(
    session: Session,
    version_id: int,
    *,
    signed: dict[str, Any],
    artifact_path: str,
    now: datetime,
) -> ModelVariant:
    """Add a variant described by its signed manifest (already verified); no commit."""
    body = signed["manifest"]
    row = ModelVariant(
        version_id=version_id,
        variant=body["variant"],
        precision=body["precision"],
        runtime=body["runtime"],
        artifact_sha256=body["sha256"],
        size_bytes=body["size_bytes"],
        tokenizer_sha256=body["tokenizer_sha256"],
        release=body["release"],
        manifest=signed,
        artifact_path=artifact_path,
        created_at=now,
    )
    session.add(row)
    return row


def register_upload(
    session: Session,
    name: str,
    version: str,
    *,
    signed: dict[str, Any],
    artifact_path: str,
    now: datetime,
) -> VersionPublic:
    """Add an uploaded variant to ``name@version`` (created ready when new) and commit.

    ``ModelConflict`` when the version is not ready, already has that variant, or the
    artifact is registered elsewhere; a lost race shows as ``IntegrityError``.
    """
    variant = signed["manifest"]["variant"]
    sha256 = signed["manifest"]["sha256"]
    model = _get_or_create_model(session, name, now=now)
    row = session.exec(
        select(ModelVersion).where(
            col(ModelVersion.model_id) == model.id, col(ModelVersion.version) == version
        )
    ).first()
    if row is None:
        assert model.id is not None
        row = ModelVersion(
            model_id=model.id,
            version=version,
            state=VersionState.READY,
            source=VersionSource.UPLOAD,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
    elif row.state != VersionState.READY:
        session.rollback()
        raise ModelConflict(
            f"{name}@{version} is {row.state}; upload a new version",
            reason=f"version_{row.state}",
        )
    assert row.id is not None
    taken = session.exec(
        select(ModelVariant).where(
            col(ModelVariant.version_id) == row.id, col(ModelVariant.variant) == variant
        )
    ).first()
    if taken is not None:
        session.rollback()
        raise ModelConflict(
            f"{name}@{version} already has variant {variant!r}", reason="variant_exists"
        )
    holder = known_sha256(session, sha256)
    if holder is not None:
        session.rollback()
        raise ModelConflict(
            f"artifact {sha256[:12]}… is already registered as {holder}", reason="artifact_exists"
        )
    add_variant(session, row.id, signed=signed, artifact_path=artifact_path, now=now)
    row.updated_at = now
    session.add(row)
    session.commit()
    logger.info(
        "model variant uploaded", extra={"model": name, "version": version, "variant": variant}
    )
    return get_version(session, name, version)


def deprecate(session: Session, name: str, version: str, *, now: datetime) -> VersionPublic:
    """Mark a ready version deprecated: no longer served nor assignable. Commits."""
    _, row = _version(session, name, version)
    if row.state == VersionState.DEPRECATED:
        raise ModelConflict(f"{name}@{version} is already deprecated", reason="already_deprecated")
    if row.state != VersionState.READY:
        raise ModelConflict(
            f"{name}@{version} is {row.state}; only a ready version can be deprecated",
            reason=f"version_{row.state}",
        )
    row.state = VersionState.DEPRECATED
    row.reason = "deprecated by an operator"
    row.updated_at = now
    session.add(row)
    session.commit()
    logger.info("model version deprecated", extra={"model": name, "version": version})
    return get_version(session, name, version)


# -- alerts -------------------------------------------------------------------------------


def raise_alert(session: Session, *, kind: str, subject: str, message: str, now: datetime) -> None:
    """Append an alert and commit; also logged at error level."""
    session.add(Alert(kind=kind, subject=subject, message=message, created_at=now))
    session.commit()
    logger.error("alert: %s", kind, extra={"subject": subject, "detail": message})


def list_alerts(
    session: Session, *, kind: str | None, page: int, page_size: int
) -> tuple[list[AlertPublic], int]:
    """Alerts, newest first."""
    where = [] if kind is None else [col(Alert.kind) == kind]
    total = session.exec(select(sa.func.count()).select_from(Alert).where(*where)).one()
    rows = session.exec(
        select(Alert)
        .where(*where)
        .order_by(col(Alert.id).desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    ).all()
    return [AlertPublic.model_validate(row, from_attributes=True) for row in rows], int(total)
