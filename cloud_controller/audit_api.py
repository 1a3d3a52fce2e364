"""REST v1 for the audit log: ``GET /api/v1/audit``, admin only, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_controller import audit
from cloud_controller.audit import AuditPage, Outcome
from cloud_controller.auth import AdminDep
from cloud_controller.deps import SessionDep, SettingsDep
from cloud_controller.paging import check_page_size

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage)
def list_audit(
    principal: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    object_type: Annotated[str | None, Query(max_length=32)] = None,
    object_id: Annotated[str | None, Query(max_length=audit.OBJECT_ID_MAX_CHARS)] = None,
    outcome: Outcome | None = None,
    page: Annotated[int, Query(ge=1, le=2**31)] = 1,
    page_size: Annotated[int, Query(ge=1)] = 50,
) -> AuditPage:
    """Audit entries matching every given filter, newest first."""
    check_page_size(page_size, settings)
    items, total = audit.list_entries(
        session,
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        outcome=outcome,
        page=page,
        page_size=page_size,
    )
    return AuditPage(items=items, total=total, page=page, page_size=page_size)
