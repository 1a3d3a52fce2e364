"""Who a request acts as: a ``Role`` (viewer < operator < admin) and the ``Principal``.

Roles are ordered: a route that needs ``operator`` admits ``admin`` too. Knows nothing of
HTTP or the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """What a token may do; each role may do everything the ones before it may."""

    VIEWER = "viewer"
    """Reads: devices, results, models, alerts; embeds through the pool gateway."""
    OPERATOR = "operator"
    """Changes the fleet: desired state, model assignment, uploads, deprecations."""
    ADMIN = "admin"
    """Manages API tokens and reads the audit log."""

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        """Whether this role may do what ``needed`` may."""
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: the name and role of its API token, and the token's id."""

    name: str
    role: Role
    token_id: int
