"""Where the controller's notion of "now" comes from.

Staleness, ``last_seen`` and every timestamp the controller writes come from a ``Clock``
passed down from ``create_app``, so tests can move time without sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""Returns the current time as a timezone-aware UTC ``datetime``."""


def system_clock() -> datetime:
    return datetime.now(UTC)
