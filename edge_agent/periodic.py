"""Run one job at a fixed interval on its own thread, timed by the injected clock.

Slots are fixed (``start + k * interval``): a slow run does not shift later runs, and
missed slots are skipped rather than run back to back. A job that raises is logged and
the schedule goes on; the loop must never die because one sample failed.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from edge_agent.clock import Clock

logger = logging.getLogger(__name__)


class PeriodicTask:
    """Calls ``job()`` every ``interval_s`` seconds until ``stop()``."""

    def __init__(
        self, name: str, job: Callable[[], None], *, interval_s: float, clock: Clock
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"{name}: interval_s must be > 0, got {interval_s}")
        self.name = name
        self._job = job
        self._interval_s = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        """Completed calls of ``job`` (including ones that raised)."""
        self.errors = 0

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        started = self._clock.monotonic()
        slot = 0
        while not self._stop.is_set():
            try:
                self._job()
            except Exception:
                self.errors += 1
                logger.exception("periodic job %s failed", self.name)
            self.runs += 1
            elapsed = self._clock.monotonic() - started
            # The next slot strictly after now; skipped slots are not made up.
            slot = max(slot + 1, math.floor(elapsed / self._interval_s) + 1)
            if self._clock.wait(
                self._stop, started + slot * self._interval_s - self._clock.monotonic()
            ):
                return
