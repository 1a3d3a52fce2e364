"""REST v1 for the model registry: list, show, upload, deprecate; and operator alerts.

Model names may hold one ``/`` (``sentence-transformers/all-MiniLM-L6-v2``), so the name
is a ``path`` parameter and the routes with a suffix are declared before the bare one.
Routes are short: they parse, call ``registry``/``uploads`` and return ``*Public`` models;
registry errors are mapped to 400/404/409/413/422 in ``app.py``. Reads need a viewer
token; uploads and deprecations an operator token, and they are audited. An upload's body
limit is its own (``body_limits.limit_for``), larger than other requests'.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Path, Query, UploadFile

from cloud_controller import audit, registry, uploads
from cloud_controller.auth import OperatorDep, ViewerDep
from cloud_controller.deps import RuntimeDep, SessionDep, SettingsDep
from cloud_controller.entities import AlertPage, ModelPage, ModelPublic, VersionPublic
from cloud_controller.errors import RegistryError, UploadMalformed
from cloud_controller.paging import Page, PageSize, check_page_size

router = APIRouter(prefix="/api/v1/models", tags=["models"])
alerts_router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])

_MANIFEST_MAX_BYTES = 64 * 1024

ModelName = Annotated[str, Path(min_length=1, max_length=128)]
Version = Annotated[str, Path(min_length=1, max_length=64)]


@router.get("", response_model=ModelPage)
def list_models(
    principal: ViewerDep,
    session: SessionDep,
    settings: SettingsDep,
    page: Page = 1,
    page_size: PageSize = 50,
) -> ModelPage:
    check_page_size(page_size, settings)
    items, total = registry.list_models(session, page=page, page_size=page_size)
    return ModelPage(items=items, total=total, page=page, page_size=page_size)


@router.get("/{name:path}/versions/{version}", response_model=VersionPublic)
def get_version(
    name: ModelName, version: Version, principal: ViewerDep, session: SessionDep
) -> VersionPublic:
    return registry.get_version(session, name, version)


@router.post(
    "/{name:path}/versions/{version}/deprecate",
    response_model=VersionPublic,
    name="model.deprecate",
)
def deprecate(
    name: ModelName,
    version: Version,
    principal: OperatorDep,
    session: SessionDep,
    runtime: RuntimeDep,
) -> VersionPublic:
    """No longer served by the chunk server nor assignable; 409 when not ready."""
    now = runtime.clock()
    with audit.audited(
        session, principal, "model.deprecate", "model", f"{name}@{version}", now=now
    ):
        answer = registry.deprecate(session, name, version, now=now)
    return answer


@router.post(
    "/{name:path}/versions", response_model=VersionPublic, status_code=201, name="model.upload"
)
def upload(
    name: ModelName,
    principal: OperatorDep,
    session: SessionDep,
    runtime: RuntimeDep,
    manifest: Annotated[UploadFile, File(description="the signed manifest.json")],
    artifact: Annotated[UploadFile, File(description="the artifact the manifest describes")],
    tokenizer: Annotated[
        UploadFile | None, File(description="tokenizer.json, unless already stored")
    ] = None,
) -> VersionPublic:
    """Register one variant: verified against the trusted keys, checked, stored, ready."""
    with audit.audited(
        session, principal, "model.upload", "model", name, now=runtime.clock()
    ) as detail:
        version = _register(name, runtime, manifest, artifact, tokenizer)
        detail.update(version=version.version, variants=[v.variant for v in version.variants])
    return version


def _register(
    name: str,
    runtime: RuntimeDep,
    manifest: UploadFile,
    artifact: UploadFile,
    tokenizer: UploadFile | None,
) -> VersionPublic:
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
def get_model(name: ModelName, principal: ViewerDep, session: SessionDep) -> ModelPublic:
    return registry.get_model(session, name)


@alerts_router.get("", response_model=AlertPage)
def list_alerts(
    principal: ViewerDep,
    session: SessionDep,
    settings: SettingsDep,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    page: Page = 1,
    page_size: PageSize = 50,
) -> AlertPage:
    """Alerts, newest first."""
    check_page_size(page_size, settings)
    items, total = registry.list_alerts(session, kind=kind, page=page, page_size=page_size)
    return AlertPage(items=items, total=total, page=page, page_size=page_size)
