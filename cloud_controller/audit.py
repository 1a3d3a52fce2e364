"""The audit log: who changed what, when, with which outcome; rows are only ever appended.

Every mutation of the REST API appends one row, in the same transaction as the change
where the change is the route's own (``record`` adds, the caller commits) and right after
it otherwise; refused attempts (401/403 on a mutation) append a ``denied`` row and
attempts the controller turned down (404, 409, 422, ...) a ``failed`` one. There is no
update or delete path in this code, and on PostgreSQL and SQLite a trigger (migration
0004) makes the database itself refuse ``UPDATE``/``DELETE`` of audit rows.

Routers of other features call ``record(session, principal, action, object_type,
object_id, outcome, detail)`` and commit, or wrap the change in ``audited(...)``, which
records success or failure and commits. Actions are dotted words: ``token.create``,
``device.set_desired``. Knows nothing of HTTP beyond the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, func, select
from starlette.exceptions import HTTPException

from cloud_controller import request_ids
from cloud_controller.entities import BigId, UtcDateTime
from cloud_controller.errors import ControllerError

if TYPE_CHECKING:
    from cloud_controller.auth.roles import Principal

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
"""Actor of a denied request that carried no known token."""
OBJECT_ID_MAX_CHARS = 256


class Outcome(StrEnum):
    SUCCESS = "success"
    DENIED = "denied"
    """Refused before the route ran: 401 or 403."""
    FAILED = "failed"
    """The route ran and turned the request down (not found, conflict, rejected upload)."""


class AuditBase(SQLModel):
    at: datetime = Field(sa_type=UtcDateTime, index=True)
    actor: str = Field(max_length=64, index=True)
    """The token's name, or ``anonymous``."""
    actor_token_id: int | None = Field(default=None, sa_type=sa.BigInteger)
    action: str = Field(max_length=64, index=True)
    object_type: str = Field(max_length=32)
    object_id: str = Field(max_length=OBJECT_ID_MAX_CHARS)
    outcome: Outcome = Field(sa_type=sa.String(16))
    request_id: str | None = Field(default=None, max_length=request_ids.MAX_CHARS)
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class AuditEntry(AuditBase, table=True):
    """One audited attempt. Append-only: see the module docstring."""

    __tablename__ = "audit_log"
    __table_args__ = (sa.Index("ix_audit_log_object", "object_type", "object_id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)


class AuditPublic(AuditBase):
    id: int


class AuditPage(SQLModel):
    items: list[AuditPublic]
    total: int
    page: int
    page_size: int


def record(
    session: Session,
    principal: Principal | str | None,
    action: str,
    object_type: str,
    object_id: str | int,
    outcome: Outcome,
    detail: dict[str, Any] | None = None,
    *,
    now: datetime | None = None,
) -> AuditEntry:
    """Append one row to ``session`` (flushed, not committed: commit it with the change).

    ``principal`` None means an anonymous caller, a string a part of the controller acting
    on its own (``"rollout-engine"``); ``now`` defaults to the system clock. The request
    id is the current request's, if any.
    """
    if principal is None or isinstance(principal, str):
        actor, token_id = principal or ANONYMOUS, None
    else:
        actor, token_id = principal.name, principal.token_id
    entry = AuditEntry(
        at=now or datetime.now(UTC),
        actor=actor,
        actor_token_id=token_id,
        action=action,
        object_type=object_type,
        object_id=str(object_id)[:OBJECT_ID_MAX_CHARS],
        outcome=outcome,
        request_id=request_ids.current(),
        detail=detail or {},
    )
    session.add(entry)
    session.flush()
    logger.info(
        "audit",
        extra={
            "actor": entry.actor,
            "action": action,
            "object": f"{object_type}:{entry.object_id}",
            "outcome": outcome.value,
            # request_id: added to every record made during a request (request_ids);
            # passing it here too would make logging raise KeyError.
        },
    )
    return entry


@contextmanager
def audited(
    session: Session,
    principal: Principal,
    action: str,
    object_type: str,
    object_id: str | int,
    *,
    now: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Run a change and record its outcome (committed). The block may add to the yielded
    ``detail`` dict; a controller error or HTTP exception is recorded as ``failed``, with
    its message, and re-raised."""
    detail: dict[str, Any] = {}
    try:
        yield detail
    except (ControllerError, HTTPException) as exc:
        session.rollback()
        message = exc.detail if isinstance(exc, HTTPException) else str(exc)
        detail["error"] = message
        record(session, principal, action, object_type, object_id, Outcome.FAILED, detail, now=now)
        session.commit()
        raise
    record(session, principal, action, object_type, object_id, Outcome.SUCCESS, detail, now=now)
    session.commit()


def list_entries(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    outcome: Outcome | None = None,
    page: int,
    page_size: int,
) -> tuple[list[AuditPublic], int]:
    """Entries matching every given filter, newest first."""
    query = select(AuditEntry)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if object_type is not None:
        query = query.where(AuditEntry.object_type == object_type)
    if object_id is not None:
        query = query.where(AuditEntry.object_id == object_id)
    if outcome is not None:
        query = query.where(AuditEntry.outcome == outcome)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(
        query.order_by(col(AuditEntry.id).desc()).offset((page - 1) * page_size).limit(page_size)
    ).all()
    return [AuditPublic.model_validate(row, from_attributes=True) for row in rows], total


@contextmanager
def change(
    engine: Engine,
    now: datetime,
    principal: Principal,
    action: str,
    object_type: str,
    object_id: str | int,
) -> Iterator[tuple[Session, dict[str, Any]]]:
    """A session of its own for a change, audited like ``audited``: yields the session and
    the ``detail`` dict of the audit row."""
    with (
        Session(engine) as session,
        audited(session, principal, action, object_type, object_id, now=now) as detail,
    ):
        yield session, detail
