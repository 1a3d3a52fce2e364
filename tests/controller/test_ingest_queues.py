"""The ingest queues wake the worker when, and only when, it can go on.

``put`` notifies the waiting worker only once as many items are queued as it waits for (a
first one, or a full batch while it lingers); these tests would hang until their long
linger or timeout ran out if a wake-up were missed."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from cloud_controller.bridge import _Accepted, _Cleanup, _IngestQueues, _Item
from protocol.messages import Heartbeat, Hello, RuntimeCapabilities
from protocol.topics import DeviceChannel

LONG_S = 60.0
"""Linger and timeout of the takes: far longer than any test waits."""


def _beat(seq: int) -> _Accepted:
    message = Heartbeat(device_id="d1", seq=seq, uptime_s=1.0, boot_epoch=1)
    return _Accepted(DeviceChannel.HEARTBEAT, message, "t", datetime.now(UTC))


def _hello() -> _Accepted:
    message = Hello(
        device_id="d1",
        hardware_class="x",
        agent_version="1",
        capabilities=RuntimeCapabilities(memory_mb=1, cpu_count=1),
        boot_epoch=1,
        keepalive_s=5,
    )
    return _Accepted(DeviceChannel.HELLO, message, "t", datetime.now(UTC))


class _Taker:
    """One ``take`` in a thread of its own."""

    def __init__(self, queues: _IngestQueues, *, most: int, linger_s: float) -> None:
        self.batch: list[_Item] | None = None
        self._thread = threading.Thread(
            target=lambda: setattr(
                self, "batch", queues.take(most=most, linger_s=linger_s, timeout_s=LONG_S)
            ),
            daemon=True,
        )
        self._thread.start()

    def result(self) -> list[_Item]:
        self._thread.join(timeout=10)
        assert self.batch is not None, "the taker was not woken"
        return self.batch


def _waiting(queues: _IngestQueues, wanted: int) -> None:
    """Until the taker waits for ``wanted`` items."""
    for _ in range(1000):
        with queues._ready:
            if queues._wanted == wanted:
                return
        threading.Event().wait(0.005)
    raise AssertionError(f"the taker never waited for {wanted} items")


def test_a_waiting_worker_wakes_for_the_first_message() -> None:
    queues = _IngestQueues(control_max=10, data_max=10)
    taker = _Taker(queues, most=100, linger_s=0)
    _waiting(queues, 1)
    first = _beat(1)
    queues.put(first, control=False)
    assert taker.result() == [first]


def test_a_lingering_worker_wakes_when_the_batch_is_full() -> None:
    queues = _IngestQueues(control_max=10, data_max=10)
    taker = _Taker(queues, most=3, linger_s=LONG_S)
    _waiting(queues, 1)
    beats = [_beat(i) for i in range(3)]
    queues.put(beats[0], control=False)
    _waiting(queues, 3)  # lingering for a full batch
    hello = _hello()
    queues.put(hello, control=True)  # control counts towards the batch, and goes first
    queues.put(beats[1], control=False)
    assert taker.result() == [hello, beats[0], beats[1]]


def test_a_marker_ends_the_linger() -> None:
    queues = _IngestQueues(control_max=10, data_max=10)
    taker = _Taker(queues, most=100, linger_s=LONG_S)
    _waiting(queues, 1)
    beat = _beat(1)
    queues.put(beat, control=False)
    _waiting(queues, 100)
    queues.put_marker(_Cleanup())
    assert taker.result() == [beat]  # the marker is taken alone, next time
    assert isinstance(queues.take(most=100, linger_s=0, timeout_s=1)[0], _Cleanup)
