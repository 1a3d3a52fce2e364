"""When a link is cut: manual ``cut()``/``heal()`` plus a schedule, in one switch.

Both impairment backends own a ``PartitionSwitch`` and give it one callback, ``apply(cut)``,
that really cuts or heals their link (hold every byte in the proxy; take the veth down in
the namespace). The switch decides *when*: a link is partitioned while a manual cut is in
force **or** a scheduled window is open; ``heal()`` ends both (a scheduled window then
ends without effect). ``apply`` is called only on a change, under the switch's lock, so
the backend sees strictly alternating cut/heal calls. The switch also keeps the counters
every report carries: how many cuts, how long the link was down.

The schedule runs on a daemon thread started by ``start_schedule()``; times come from an
injected monotonic clock and a ``wait`` that returns early when the switch is closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class PartitionSwitch:
    def __init__(
        self,
        apply: Callable[[bool], None],
        *,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._apply = apply
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._manual = False
        self._scheduled = False
        self._since: float | None = None
        self._down_s = 0.0
        self._cuts = 0
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def partitioned(self) -> bool:
        with self._lock:
            return self._manual or self._scheduled

    def cut(self) -> None:
        """Cut the link until ``heal()``."""
        self._set(manual=True)

    def heal(self) -> None:
        """Heal the link now, ending a manual cut and any scheduled window in progress."""
        self._set(manual=False, scheduled=False)

    def _set(self, *, manual: bool | None = None, scheduled: bool | None = None) -> None:
        with self._lock:
            before = self._manual or self._scheduled
            if manual is not None:
                self._manual = manual
            if scheduled is not None:
                self._scheduled = scheduled
            after = self._manual or self._scheduled
            if before == after:
                return
            now = self._clock()
            if after:
                self._cuts += 1
                self._since = now
            elif self._since is not None:
                self._down_s += now - self._since
                self._since = None
            self._apply(after)
        logger.info("link cut" if after else "link healed", extra={"link": self._name})

    def counters(self) -> tuple[int, float]:
        """(cuts so far, seconds partitioned so far, the current cut included)."""
        with self._lock:
            ongoing = self._clock() - self._since if self._since is not None else 0.0
            return self._cuts, self._down_s + ongoing

    def start_schedule(self, windows: list[tuple[float, float]]) -> None:
        """Cut at each ``(start_s, end_s)`` window's start and heal at its end, counted from
        now. Windows must be sorted and disjoint (``Impairment.merged_partitions()``)."""
        if not windows or self._thread is not None:
            return
        origin = self._clock()
        self._thread = threading.Thread(
            target=self._run_schedule,
            args=(origin, windows),
            name=f"{self._name}-partitions",
            daemon=True,
        )
        self._thread.start()

    def _run_schedule(self, origin: float, windows: list[tuple[float, float]]) -> None:
        for start, end in windows:
            if self._sleep_until(origin + start):
                return
            cut_at = self._clock()
            self._set(scheduled=True)
            # A late start does not shorten the window: it lasts at least its duration.
            if self._sleep_until(max(origin + end, cut_at + end - start)):
                return
            self._set(scheduled=False)

    def _sleep_until(self, at: float) -> bool:
        """Wait until the clock reads ``at``; True when the switch was closed meanwhile."""
        while (left := at - self._clock()) > 0:
            if self._closed.wait(min(left, 0.5)):
                return True
        return self._closed.is_set()

    def close(self) -> None:
        """Stop the schedule; the link is left as it is (the backend tears it down)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
