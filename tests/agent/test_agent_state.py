"""State that survives restarts: boot epoch and applied state, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_agent.state import (
    APPLIED_FILE,
    BOOT_FILE,
    AppliedState,
    CorruptState,
    FailedApply,
    StateError,
    StateStore,
    write_atomic,
)


def test_boot_epoch_counts_starts_across_store_instances(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "b"
    assert StateStore(state_dir).next_boot_epoch() == 1
    assert StateStore(state_dir).next_boot_epoch() == 2
    assert StateStore(state_dir).next_boot_epoch() == 3
    assert json.loads((state_dir / BOOT_FILE).read_text()) == {"boot_epoch": 3}


def test_applied_state_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load_applied() == AppliedState()
    saved = AppliedState(3, {"offload_slo_ms": 90}, FailedApply(2, "boom"))
    store.save_applied(saved)
    assert StateStore(tmp_path).load_applied() == saved
    store.save_applied(AppliedState(4, {}))
    assert StateStore(tmp_path).load_applied() == AppliedState(4, {})


def test_observed_generation_includes_a_newer_failure() -> None:
    assert AppliedState(2, {}, FailedApply(3, "x")).observed_generation == 3
    assert AppliedState(2, {}, FailedApply(1, "x")).observed_generation == 2
    assert AppliedState(2, {}).observed_generation == 2


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_failed_atomic_write_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, b"old")

    def no_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(StateError, match="No space left"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_write_fsyncs_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(tmp_path / "f.json", b"x")
    assert len(synced) == 2  # the file, then its directory


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (BOOT_FILE, "{not json"),
        (BOOT_FILE, '{"boot_epoch": "seven"}'),
        (APPLIED_FILE, "[]"),
        (APPLIED_FILE, '{"generation": -1, "policy": {}}'),
        (APPLIED_FILE, '{"generation": 1, "policy": {}, "last_failure": 5}'),
    ],
)
def test_corrupt_state_is_a_named_error(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    store = StateStore(tmp_path)
    with pytest.raises(CorruptState, match=name):
        store.next_boot_epoch() if name == BOOT_FILE else store.load_applied()


def test_unwritable_state_dir_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError):
        StateStore(blocker / "sub").next_boot_epoch()
