"""Which chunks a download asks for next (``edge_agent.download.next_offsets``, pure)."""

from __future__ import annotations

from edge_agent.download import next_offsets


def _ask(
    *, verified: int, size: int | None, front: int, have: set[int], count: int = 4
) -> list[int]:
    return next_offsets(
        verified=verified,
        size=size,
        step=10,
        front=front,
        taken=lambda offset: offset in have,
        count=count,
    )


def test_alone_it_asks_in_order_after_what_it_has() -> None:
    assert _ask(verified=0, size=100, front=0, have=set()) == [0, 10, 20, 30]
    assert _ask(verified=20, size=100, front=40, have={20, 30}) == [40, 50, 60, 70]


def test_joining_a_broadcast_it_asks_ahead_of_the_stream_then_fills_gaps() -> None:
    # a late joiner took the chunk at 50 from the broadcast: ask 60.. first, 0.. after
    assert _ask(verified=0, size=100, front=60, have={50}) == [60, 70, 80, 90]
    assert _ask(verified=0, size=100, front=100, have={50, 60, 70, 80, 90}) == [0, 10, 20, 30]
    assert _ask(verified=0, size=100, front=80, have={50, 60, 70}, count=6) == [
        80,
        90,
        0,
        10,
        20,
        30,
    ]


def test_nothing_already_taken_and_nothing_past_the_end() -> None:
    assert _ask(verified=0, size=35, front=0, have={10}) == [0, 20, 30]
    assert _ask(verified=30, size=35, front=40, have=set()) == [30]
    assert _ask(verified=0, size=100, front=0, have=set(), count=0) == []


def test_unknown_size_asks_only_the_first_chunk() -> None:
    assert _ask(verified=0, size=None, front=0, have=set()) == [0]
    assert _ask(verified=0, size=None, front=0, have={0}) == []
