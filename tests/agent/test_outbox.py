"""The durable outbox: keys without gaps, survives restarts, bounded with a counted policy."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from edge_agent.outbox import FullPolicy, Outbox, OutboxFull, OutboxLimits


def test_seq_is_gapless_per_boot_and_ack_deletes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", boot_epoch=3, limits=OutboxLimits())
    keys = [box.append("result", f"r{i}".encode(), now=100.0).seq for i in range(5)]
    assert keys == [1, 2, 3, 4, 5]
    assert box.ack(3, [1, 2, 9]) == 2
    assert [r.seq for r in box.pending()] == [3, 4, 5]
    assert box.size() == (3, 6)


def test_records_survive_a_restart_and_the_next_boot_starts_at_one(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", boot_epoch=1, limits=OutboxLimits())
    box.append("result", b"a", now=1.0)
    box.append("result", b"b", now=1.0)
    box.close()
    same_boot = Outbox(tmp_path / "o.db", boot_epoch=1, limits=OutboxLimits())
    assert same_boot.append("result", b"c", now=2.0).seq == 3
    same_boot.close()
    next_boot = Outbox(tmp_path / "o.db", boot_epoch=2, limits=OutboxLimits())
    assert next_boot.append("result", b"d", now=3.0).seq == 1
    assert [(r.boot_epoch, r.seq) for r in next_boot.pending()] == [(1, 1), (1, 2), (1, 3), (2, 1)]


def _append_then_die(path: str) -> None:
    box = Outbox(Path(path), boot_epoch=1, limits=OutboxLimits())
    box.append("result", b"committed", now=1.0)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush: only what fsync kept


def test_a_committed_record_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    proc = multiprocessing.get_context("spawn").Process(target=_append_then_die, args=(str(path),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    box = Outbox(path, boot_epoch=2, limits=OutboxLimits())
    assert [r.payload for r in box.pending()] == [b"committed"]


def test_drop_oldest_makes_room_and_counts(tmp_path: Path) -> None:
    limits = OutboxLimits(max_bytes=10, policy=FullPolicy.DROP_OLDEST)
    box = Outbox(tmp_path / "o.db", boot_epoch=1, limits=limits)
    for i in range(3):
        box.append("t", b"xxxx", now=float(i))  # 12 bytes > 10: the first goes
    assert [r.seq for r in box.pending()] == [2, 3]
    assert box.dropped == 1


def test_reject_new_refuses_and_keeps_what_is_there(tmp_path: Path) -> None:
    limits = OutboxLimits(max_bytes=8, policy=FullPolicy.REJECT_NEW)
    box = Outbox(tmp_path / "o.db", boot_epoch=1, limits=limits)
    box.append("t", b"xxxx", now=0.0)
    box.append("t", b"xxxx", now=0.0)
    with pytest.raises(OutboxFull, match="reject_new"):
        box.append("t", b"x", now=0.0)
    assert box.size() == (2, 8)
    assert box.append("t", b"", now=0.0).seq == 3  # a refused record takes no seq


def test_old_records_expire_and_are_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", boot_epoch=1, limits=OutboxLimits(max_age_s=60))
    box.append("t", b"old", now=0.0)
    box.append("t", b"new", now=100.0)
    assert [r.payload for r in box.pending()] == [b"new"]
    assert box.dropped == 1


def test_the_byte_bound_follows_acks_expiry_and_restarts(tmp_path: Path) -> None:
    limits = OutboxLimits(max_bytes=8, max_age_s=60, policy=FullPolicy.REJECT_NEW)
    box = Outbox(tmp_path / "o.db", boot_epoch=1, limits=limits)
    box.append("t", b"xxxx", now=0.0)
    box.append("t", b"xxxx", now=50.0)
    with pytest.raises(OutboxFull):
        box.append("t", b"x", now=50.0)
    box.ack(1, [1])  # frees 4 bytes
    box.append("t", b"yyyy", now=50.0)
    box.close()
    reopened = Outbox(tmp_path / "o.db", boot_epoch=1, limits=limits)  # counts 8 bytes held
    with pytest.raises(OutboxFull):
        reopened.append("t", b"z", now=50.0)
    reopened.append("t", b"zzzz", now=115.0)  # the record from t=50 expired: room again
    assert [r.payload for r in reopened.pending()] == [b"zzzz"]
    assert reopened.size() == (1, 4)


def test_expiry_still_happens_after_acks_and_a_restart(tmp_path: Path) -> None:
    """The append skips the expiry scan while nothing can be due; acks must not fool it."""
    limits = OutboxLimits(max_age_s=60)
    box = Outbox(tmp_path / "o.db", boot_epoch=1, limits=limits)
    first = box.append("t", b"acked", now=0.0)
    box.append("t", b"old", now=10.0)
    assert box.ack(1, [first.seq]) == 1
    box.append("t", b"young", now=65.0)  # nothing is older than 5 yet
    assert [r.payload for r in box.pending()] == [b"old", b"young"] and box.dropped == 0
    box.close()
    again = Outbox(tmp_path / "o.db", boot_epoch=2, limits=limits)
    again.append("t", b"new", now=100.0)  # 10 < 100 - 60: "old" goes
    assert [r.payload for r in again.pending()] == [b"young", b"new"]
    assert again.dropped == 1


def test_a_refused_append_does_not_forget_what_is_due_to_expire(tmp_path: Path) -> None:
    limits = OutboxLimits(max_bytes=8, max_age_s=60, policy=FullPolicy.REJECT_NEW)
    box = Outbox(tmp_path / "o.db", boot_epoch=1, limits=limits)
    box.append("t", b"aaaa", now=0.0)
    box.append("t", b"bbbb", now=50.0)
    with pytest.raises(OutboxFull, match="exceeds max_bytes"):
        box.append("t", b"x" * 9, now=100.0)  # expires "aaaa", then fails: rolled back
    assert [r.payload for r in box.pending()] == [b"aaaa", b"bbbb"] and box.dropped == 0
    box.append("t", b"c", now=100.0)  # "aaaa" is still due: expired, so "c" fits
    assert [r.payload for r in box.pending()] == [b"bbbb", b"c"]
    assert box.dropped == 1
