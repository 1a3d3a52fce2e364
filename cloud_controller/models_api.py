"""REST v1 for the model registry: list, show, upload, deprecate; and operator alerts.

Model names may hold one ``/`` (``sentence-transformers/all-MiniLM-L6-v2``), so the name
is a ``path`` parameter and the routes with a suffix are declared before the bare one.
Routes are short: they parse, call ``registry``/``uploads`` and return ``*Public`` models;
registry errors are mapped to 400/404/409/413/422 in ``app.py``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from cloud_controller import registry, uploads
from cloud_controller.deps import RuntimeDep, SessionDep, SettingsDep
from cloud_controller.entities import AlertPage, ModelPage, ModelPublic, VersionPublic
from cloud_controller.errors import RegistryError, UploadMalformed
from cloud_controller.paging import check_page_size

router = APIRouter(prefix="/api/v1/models", tags=["models"])
alerts_router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])

_MANIFEST_MAX_BYTES = 64 * 1024


@router.get("", response_model=ModelPage)
def list_models(
    session: SessionDep,
    settings: SettingsDep,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1)] = 50,
) -> ModelPage:
    check_page_size(page_size, settings)
    items, total = registry.list_models(session, page=page, page_size=page_size)
    return ModelPage(items=items, total=total, page=page, page_size=page_size)


@router.get("/{name:path}/versions/{version}", response_model=VersionPublic)
def get_version(name: str, version: str, session: SessionDep) -> VersionPublic:
    return registry.get_version(session, name, version)


@router.post("/{name:path}/versions/{version}/deprecate", response_model=VersionPublic)
def deprecate(name: str, version: str, session: SessionDep, runtime: RuntimeDep) -> VersionPublic:
    """No longer served by the chunk server nor assignable; 409 when not ready."""
    return registry.deprecate(session, name, version, now=runtime.clock())


@router.post("/{name:path}/versions", response_model=VersionPublic, status_code=201)
def upload(
    name: str,
    runtime: RuntimeDep,
    manifest: Annotated[UploadFile, File(description="the signed manifest.json")],
    artifact: Annotated[UploadFile, File(description="the artifact the manifest describes")],
    tokenizer: Annotated[
        UploadFile | None, File(description="tokenizer.json, unless already stored")
    ] = None,
) -> VersionPublic:
    """Register one variant: verified against the trusted keys, checked, stored, ready."""
    raw = manifest.file.read(_MANIFEST_MAX_BYTES + 1)
    try:
        if len(raw) > _MANIFEST_MAX_BYTES:
            raise UploadMalformed(
                f"manifest larger than {_MANIFEST_MAX_BYTES} bytes", reason="bad_manifest"
            )
        version = uploads.register(
            uploads.Upload(
                manifest=raw,
                artifact=artifact.file,
                tokenizer=tokenizer.file if tokenizer is not None else None,
            ),
            name=name,
            engine=runtime.engine,
            store=runtime.store,
            trusted_keys=runtime.trust.keyring(),
            max_bytes=runtime.settings.max_upload_bytes,
            now=runtime.clock(),
        )
    except RegistryError as exc:
        runtime.metrics.model_uploads.labels(exc.reason).inc()
        raise
    runtime.metrics.model_uploads.labels("ready").inc()
    return version


@router.get("/{name:path}", response_model=ModelPublic)
def get_model(name: str, session: SessionDep) -> ModelPublic:
    return registry.get_model(session, name)


@alerts_router.get("", response_model=AlertPage)
def list_alerts(
    session: SessionDep,
    settings: SettingsDep,
    kind: str | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1)] = 50,
) -> AlertPage:
    """Alerts, newest first."""
    check_page_size(page_size, settings)
    items, total = registry.list_alerts(session, kind=kind, page=page, page_size=page_size)
    return AlertPage(items=items, total=total, page=page, page_size=page_size)
