"""Which result seqs are missing: per (device, boot epoch), the highest contiguous seq.

A device numbers the results of each boot 1, 2, 3, ...; the controller stores them as
they arrive, in any order and more than once. ``GapTracker`` remembers, per
(device_id, boot_epoch), the highest seq up to which everything is stored and the stored
seqs above it; a seq between the two is missing. A gap is normal for a moment (batches
overtake each other, a batch waits in an outbox) and alarming when it stays, which is why
the total is a gauge (``spillway_result_gaps``) rather than a counter.

The tracker is pure and in memory: the bridge seeds a key it does not know from the
database (``ingest.stored_seqs``) and tells it what each commit stored. It knows nothing
of MQTT, SQL or HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

Key = tuple[str, int]
"""(device_id, boot_epoch)"""


@dataclass
class _Seqs:
    contiguous: int
    above: set[int] = field(default_factory=set)

    @property
    def missing(self) -> int:
        return max(self.above) - self.contiguous - len(self.above) if self.above else 0

    def add(self, seqs: Iterable[int]) -> None:
        self.above.update(seq for seq in seqs if seq > self.contiguous)
        while self.contiguous + 1 in self.above:
            self.contiguous += 1
            self.above.remove(self.contiguous)


@dataclass(frozen=True)
class GapChange:
    """How one key's missing seqs changed with one observation."""

    key: Key
    missing_before: int
    missing_after: int
    contiguous: int
    """The highest seq up to which everything is stored; the first missing is the next one."""

    @property
    def opened(self) -> bool:
        return self.missing_after > self.missing_before

    @property
    def closed(self) -> bool:
        return self.missing_before > 0 and self.missing_after == 0


class GapTracker:
    """Missing seqs per (device, boot epoch). Written by one thread, read by any."""

    def __init__(self) -> None:
        self._keys: dict[Key, _Seqs] = {}
        self._lock = threading.Lock()

    def knows(self, key: Key) -> bool:
        with self._lock:
            return key in self._keys

    def observe(
        self,
        key: Key,
        seqs: Iterable[int],
        *,
        contiguous: int = 0,
        above: Iterable[int] = (),
    ) -> GapChange:
        """Record ``seqs`` as stored. A key seen for the first time starts from
        ``contiguous`` and ``above`` (what was stored before); its gaps count as new."""
        with self._lock:
            state = self._keys.get(key)
            if state is None:
                state = self._keys[key] = _Seqs(contiguous)
                state.add(above)
                before = 0
            else:
                before = state.missing
            state.add(seqs)
            return GapChange(key, before, state.missing, state.contiguous)

    @property
    def missing(self) -> int:
        """Missing seqs over all keys."""
        with self._lock:
            return sum(state.missing for state in self._keys.values())

    def missing_of(self, key: Key) -> int:
        with self._lock:
            state = self._keys.get(key)
            return state.missing if state else 0

    def forget_complete(self) -> int:
        """Drop keys without gaps (they are seeded again from the database when their
        device sends more); returns how many were dropped. Keeps memory bounded."""
        with self._lock:
            complete = [key for key, state in self._keys.items() if not state.above]
            for key in complete:
                del self._keys[key]
            return len(complete)
