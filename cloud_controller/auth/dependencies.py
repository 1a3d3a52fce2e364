"""The FastAPI side of authentication: ``ViewerDep``, ``OperatorDep``, ``AdminDep``.

Each reads ``Authorization: Bearer <token>``, looks the token up (one indexed query),
and yields the ``Principal`` or raises ``NotAuthenticated`` (401, with
``WWW-Authenticate: Bearer``) or ``PermissionDenied`` (403, naming the role needed); both
are mapped in ``app.py``. A refused *mutation* (any method but GET/HEAD/OPTIONS) appends a
``denied`` row to the audit log, whose action is the route's name. Using one of these on a
route also puts the bearer security scheme on it in the OpenAPI document.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from cloud_controller import audit
from cloud_controller.auth import tokens
from cloud_controller.auth.roles import Principal, Role
from cloud_controller.deps import RuntimeDep
from cloud_controller.errors import ControllerError, NotAuthenticated, PermissionDenied

logger = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API token (`spillway controller token create`, or POST /api/v1/tokens).",
)
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def authenticate(
    request: Request,
    runtime: RuntimeDep,
    credentials: HTTPAuthorizationCredentials | None,
    *,
    needed: Role,
) -> Principal:
    """The caller's principal if its token is valid and its role at least ``needed``."""
    with Session(runtime.engine) as session:
        principal: Principal | None = None
        try:
            if credentials is None:
                raise NotAuthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
            row = tokens.lookup(session, credentials.credentials)
            if row is None or row.id is None:
                raise NotAuthenticated("unknown API token")
            principal = Principal(name=row.name, role=Role(row.role), token_id=row.id)
            if row.revoked_at is not None:
                raise NotAuthenticated(
                    f"API token {row.name!r} was revoked at {row.revoked_at.isoformat()}"
                )
            if not principal.role.allows(needed):
                raise PermissionDenied(
                    f"this needs the {needed.value} role; token {row.name!r} has "
                    f"{principal.role.value}"
                )
        except ControllerError as exc:
            _denied(session, request, runtime, principal, exc, needed=needed)
            raise
        assert row is not None and principal is not None  # every other path raised
        tokens.touch(session, row, runtime.clock())
        return principal


def _denied(
    session: Session,
    request: Request,
    runtime: RuntimeDep,
    principal: Principal | None,
    exc: ControllerError,
    *,
    needed: Role,
) -> None:
    logger.info(
        "request denied",
        extra={"path": request.url.path, "method": request.method, "reason": str(exc)},
    )
    if request.method in READ_METHODS:
        return
    route = request.scope.get("route")
    action = getattr(route, "name", None) or f"{request.method} {request.url.path}"
    audit.record(
        session,
        principal,
        action[:64],
        "route",
        request.url.path,
        audit.Outcome.DENIED,
        {
            "method": request.method,
            "status": 401 if isinstance(exc, NotAuthenticated) else 403,
            "reason": str(exc),
            "needed": needed.value,
        },
        now=runtime.clock(),
    )
    session.commit()


def require_viewer(request: Request, runtime: RuntimeDep, credentials: CredentialsDep) -> Principal:
    return authenticate(request, runtime, credentials, needed=Role.VIEWER)


def require_operator(
    request: Request, runtime: RuntimeDep, credentials: CredentialsDep
) -> Principal:
    return authenticate(request, runtime, credentials, needed=Role.OPERATOR)


def require_admin(request: Request, runtime: RuntimeDep, credentials: CredentialsDep) -> Principal:
    return authenticate(request, runtime, credentials, needed=Role.ADMIN)


ViewerDep = Annotated[Principal, Depends(require_viewer)]
"""Any valid token: reads."""
OperatorDep = Annotated[Principal, Depends(require_operator)]
"""Operator or admin: changes to the fleet and the registry."""
AdminDep = Annotated[Principal, Depends(require_admin)]
"""Admin only: tokens and the audit log."""
