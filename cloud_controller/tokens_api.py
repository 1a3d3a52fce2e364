"""REST v1 for API tokens (admin only) and ``GET /api/v1/auth/me`` (any valid token).

A token's secret is in the answer to its creation and nowhere else, ever; a revocation
is a state change (``revoked_at``), never a delete. Every change is audited.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_controller import audit
from cloud_controller.auth import AdminDep, Role, ViewerDep, tokens
from cloud_controller.auth.tokens import Me, TokenCreate, TokenCreated, TokenPage, TokenPublic
from cloud_controller.deps import RuntimeDep, SessionDep
from cloud_controller.paging import RowId, check_page_size

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])
me_router = APIRouter(prefix="/api/v1/auth", tags=["tokens"])

TokenId = RowId


@router.post("", response_model=TokenCreated, status_code=201, name="token.create")
def create_token(
    body: TokenCreate, principal: AdminDep, session: SessionDep, runtime: RuntimeDep
) -> TokenCreated:
    """Create a token; the answer holds its secret, shown this once."""
    now = runtime.clock()
    row, secret = tokens.create(
        session, name=body.name, role=body.role, now=now, created_by=principal.name
    )
    assert row.id is not None
    audit.record(
        session,
        principal,
        "token.create",
        "token",
        row.id,
        audit.Outcome.SUCCESS,
        {"name": row.name, "role": Role(row.role).value},
        now=now,
    )
    session.commit()
    return TokenCreated(id=row.id, name=row.name, role=row.role, token=secret)


@router.get("", response_model=TokenPage)
def list_tokens(
    principal: AdminDep,
    session: SessionDep,
    runtime: RuntimeDep,
    include_revoked: bool = True,
    page: Annotated[int, Query(ge=1, le=2**31)] = 1,
    page_size: Annotated[int, Query(ge=1)] = 50,
) -> TokenPage:
    """Tokens by id, without their secrets."""
    check_page_size(page_size, runtime.settings)
    items, total = tokens.list_tokens(
        session, include_revoked=include_revoked, page=page, page_size=page_size
    )
    return TokenPage(items=items, total=total, page=page, page_size=page_size)


@router.delete("/{token_id}", response_model=TokenPublic, name="token.revoke")
def revoke_token(
    token_id: TokenId, principal: AdminDep, session: SessionDep, runtime: RuntimeDep
) -> TokenPublic:
    """Revoke a token: it is refused from now on; 409 when already revoked or the last
    active admin token."""
    now = runtime.clock()
    with audit.audited(session, principal, "token.revoke", "token", token_id, now=now) as detail:
        row = tokens.revoke(session, token_id, now=now)
        detail.update(name=row.name, role=Role(row.role).value)
    return TokenPublic.model_validate(row, from_attributes=True)


@me_router.get("/me", response_model=Me)
def me(principal: ViewerDep) -> Me:
    """Who the token is: its name and role."""
    return Me(name=principal.name, role=principal.role)
