"""Time as the agent sees it, behind one seam.

Heartbeat and telemetry intervals, uptime and message timestamps all come from a
``Clock`` handed to the agent, so tests can run the periodic loops on virtual time.
This module knows nothing about MQTT or the agent.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Where the agent gets time from."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for intervals and uptime)."""
        ...

    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC (for message timestamps)."""
        ...

    def wait(self, stop: threading.Event, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` seconds; return True early once ``stop`` is set."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait(self, stop: threading.Event, timeout_s: float) -> bool:
        return stop.wait(max(0.0, timeout_s))
