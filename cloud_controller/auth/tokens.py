"""API tokens: stored as the sha256 of the secret, shown once, revoked rather than deleted.

A token is ``spw_`` followed by 32 random bytes (``secrets.token_urlsafe``), 256 bits of
entropy. Only its sha256 is stored, under a unique index, so authenticating a request is
one indexed lookup. No slow hash (bcrypt, argon2) is needed: slow hashes make guessing a
*low-entropy* password from a stolen hash expensive, but nobody can enumerate 2**256
secrets however fast the hash is; a slow hash would only add ~100 ms to every request.

A revocation sets ``revoked_at``; rows are never deleted, so the audit log's actors stay
resolvable. Knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from datetime import datetime, timedelta

import sqlalchemy as sa
from pydantic import ConfigDict, field_validator
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, func, select

from cloud_controller.auth.roles import Role
from cloud_controller.entities import BigId, UtcDateTime
from cloud_controller.errors import TokenConflict, TokenNotFound

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "spw_"
NAME_MAX_CHARS = 64
SECRET_MAX_CHARS = 256
"""Longer bearer values are refused before hashing (no token this code makes is)."""
LAST_USED_RESOLUTION = timedelta(seconds=60)
"""``last_used_at`` is written at most this often per token: reads stay reads."""
BOOTSTRAP_NAME = "bootstrap-admin"
_NAME = re.compile(r"^[A-Za-z0-9._@:-]+$")


class ApiToken(SQLModel, table=True):
    """One API token; ``sha256`` of its secret is the lookup key."""

    __tablename__ = "api_tokens"
    __table_args__ = (sa.UniqueConstraint("sha256", name="uq_api_tokens_sha256"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=BigId)
    name: str = Field(max_length=NAME_MAX_CHARS)
    role: Role = Field(sa_type=sa.String(16))
    sha256: str = Field(max_length=64)
    created_at: datetime = Field(sa_type=UtcDateTime)
    created_by: str | None = Field(default=None, max_length=NAME_MAX_CHARS)
    """Name of the principal that created it; None: the CLI or the bootstrap setting."""
    last_used_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class TokenCreate(SQLModel):
    """Body of ``POST /api/v1/tokens``."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    name: str = Field(min_length=1, max_length=NAME_MAX_CHARS)
    """Letters, digits and ``._@:-``: it shows up in logs and the audit log."""
    role: Role

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("name may hold only letters, digits and . _ @ : -")
        return value


class TokenPublic(SQLModel):
    """A token as listed: never its secret nor its hash."""

    id: int
    name: str
    role: Role
    created_at: datetime
    created_by: str | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(SQLModel):
    """Answer to a creation: the only time the secret is shown."""

    id: int
    name: str
    role: Role
    token: str


class TokenPage(SQLModel):
    items: list[TokenPublic]
    total: int
    page: int
    page_size: int


class Me(SQLModel):
    """Answer of ``GET /api/v1/auth/me``."""

    name: str
    role: Role


def new_secret() -> str:
    """A fresh token secret: ``spw_`` and 43 URL-safe characters (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(
    session: Session,
    *,
    name: str,
    role: Role,
    now: datetime,
    created_by: str | None = None,
    secret: str | None = None,
) -> tuple[ApiToken, str]:
    """Add a new token to ``session`` (flushed, not committed) and return it with its
    secret; the caller commits, with the audit row when there is one."""
    secret = secret or new_secret()
    row = ApiToken(
        name=name, role=role, sha256=digest(secret), created_at=now, created_by=created_by
    )
    session.add(row)
    session.flush()
    return row, secret


def ensure(engine: Engine, *, secret: str, role: Role, name: str, now: datetime) -> ApiToken:
    """The token with ``secret``, created when absent; a revoked one stays revoked.

    Idempotent, also when two controllers start at once (the unique hash decides).
    """
    with Session(engine) as session:
        row = session.exec(select(ApiToken).where(ApiToken.sha256 == digest(secret))).first()
        if row is None:
            try:
                row, _ = create(session, name=name, role=role, now=now, secret=secret)
                session.commit()
                logger.info(
                    "bootstrap token created", extra={"token_id": row.id, "token_name": name}
                )
            except IntegrityError:
                session.rollback()
                row = session.exec(select(ApiToken).where(ApiToken.sha256 == digest(secret))).one()
        if row.revoked_at is not None:
            logger.warning(
                "the bootstrap admin token was revoked and stays revoked",
                extra={"token_id": row.id},
            )
        return row


def lookup(session: Session, secret: str) -> ApiToken | None:
    """The token whose secret this is (revoked or not), None when unknown."""
    if len(secret) > SECRET_MAX_CHARS:
        return None
    return session.exec(select(ApiToken).where(ApiToken.sha256 == digest(secret))).first()


def touch(session: Session, row: ApiToken, now: datetime) -> None:
    """Record a use, at most once per ``LAST_USED_RESOLUTION``."""
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.add(row)
        session.commit()


def get(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise TokenNotFound(token_id)
    return row


def revoke(session: Session, token_id: int, *, now: datetime) -> ApiToken:
    """Mark a token revoked (committed); 409 when it already is, or is the last admin."""
    row = get(session, token_id)
    if row.revoked_at is not None:
        raise TokenConflict(f"token {token_id} was already revoked at {row.revoked_at.isoformat()}")
    if row.role == Role.ADMIN:
        admins = session.exec(
            select(func.count())
            .select_from(ApiToken)
            .where(ApiToken.role == Role.ADMIN, col(ApiToken.revoked_at).is_(None))
        ).one()
        if admins <= 1:
            raise TokenConflict(
                f"token {token_id} is the last active admin token; create another admin "
                "token before revoking it"
            )
    row.revoked_at = now
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def list_tokens(
    session: Session, *, include_revoked: bool, page: int, page_size: int
) -> tuple[list[TokenPublic], int]:
    query = select(ApiToken)
    if not include_revoked:
        query = query.where(col(ApiToken.revoked_at).is_(None))
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(
        query.order_by(col(ApiToken.id)).offset((page - 1) * page_size).limit(page_size)
    ).all()
    return [TokenPublic.model_validate(row, from_attributes=True) for row in rows], total
