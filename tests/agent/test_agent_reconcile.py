"""The reconcile loop without a broker: order, once-only, persistence, failures, rejects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.reconcile import JsonPolicyApplier, Reconciler
from edge_agent.state import AppliedState, FailedApply, StateError, StateStore
from protocol.codec import RejectCounter, decode, encode
from protocol.messages import ApplyOutcome, DesiredState, ReportedState
from protocol.mqtt import InboundMessage
from protocol.topics import DeviceChannel, QoS, Topics
from tests.agent.helpers import FakeClock, RecordingPublisher, wait_for

DESIRED_TOPIC = Topics().device("dev-1", DeviceChannel.DESIRED)


def desired(generation: int, policy: dict[str, object] | None = None, **kw: object) -> bytes:
    fields: dict[str, object] = {
        "device_id": "dev-1",
        "generation": generation,
        "policy": policy or {},
    }
    fields.update(kw)
    return encode(DesiredState.model_validate(fields))


def inbound(payload: bytes) -> InboundMessage:
    return InboundMessage(topic=DESIRED_TOPIC, payload=payload, qos=1, retain=False)


class Harness:
    def __init__(self, state_dir: Path, publisher: RecordingPublisher, *, boot_epoch: int = 1):
        self.publisher = publisher
        self.rejects = RejectCounter()
        self.hooked: list[int] = []
        self.store = StateStore(state_dir)
        self.reconciler = Reconciler(
            device_id="dev-1",
            topics=Topics(),
            store=self.store,
            publisher=publisher,
            boot_epoch=boot_epoch,
            clock=FakeClock(),
            applier=JsonPolicyApplier(),
            rejects=self.rejects,
            on_applied=self.hooked.append,
        )
        self.reconciler.start()

    def send(self, payload: bytes) -> None:
        self.reconciler.on_message(inbound(payload))

    def reports(self) -> list[ReportedState]:
        return [decode(p, ReportedState) for p in self.publisher.on("/reported")]

    def settle(self, reports: int) -> list[ReportedState]:
        wait_for(lambda: len(self.reports()) >= reports, 5, what=f"{reports} reports")
        return self.reports()


@pytest.fixture
def harness(tmp_path: Path, publisher: RecordingPublisher) -> Iterator[Harness]:
    h = Harness(tmp_path / "state", publisher)
    yield h
    h.reconciler.stop()


def test_generations_apply_in_order_once_and_duplicates_re_report(harness: Harness) -> None:
    for generation in (1, 2, 3, 2, 1, 3):
        harness.send(desired(generation, {"g": generation}))
    reports = harness.settle(6)
    assert harness.reconciler.applied_generations == [1, 2, 3]
    assert harness.hooked == [1, 2, 3]
    assert [r.observed_generation for r in reports] == [1, 2, 3, 3, 3, 3]
    assert {r.outcome for r in reports} == {ApplyOutcome.APPLIED}
    assert reports[-1].policy == {"g": 3}
    counts = harness.reconciler.counters()
    assert (counts["applied"], counts["stale"], counts["already_applied"]) == (3, 2, 1)
    assert all(q == QoS.AT_LEAST_ONCE for _, _, q, _ in harness.publisher.sent)


def test_state_is_persisted_before_the_report(harness: Harness) -> None:
    seen_on_disk: list[AppliedState] = []
    real_publish = harness.publisher.publish

    def publish_checking_disk(topic: str, payload: bytes, **kw: object) -> None:
        seen_on_disk.append(harness.store.load_applied())
        real_publish(topic, payload, **kw)  # type: ignore[arg-type]

    harness.publisher.publish = publish_checking_disk  # type: ignore[method-assign]
    harness.send(desired(1, {"a": 1}))
    harness.settle(1)
    assert seen_on_disk == [AppliedState(1, {"a": 1})]


def test_a_new_reconciler_on_the_same_state_never_re_applies(
    tmp_path: Path, publisher: RecordingPublisher
) -> None:
    first = Harness(tmp_path / "s", publisher)
    first.send(desired(1))
    first.send(desired(2, {"v": 2}))
    first.settle(2)
    first.reconciler.stop()

    again = Harness(tmp_path / "s", RecordingPublisher(), boot_epoch=2)
    again.send(desired(2, {"v": 2}))
    (report,) = again.settle(1)
    again.reconciler.stop()
    assert again.reconciler.applied_generations == []
    assert (report.observed_generation, report.boot_epoch, report.policy) == (2, 2, {"v": 2})


def test_failed_apply_is_reported_and_does_not_advance(harness: Harness) -> None:
    harness.send(desired(1, {"ok": 1}))
    harness.send(desired(2, {"fail": True}))
    reports = harness.settle(2)
    failed = reports[1]
    assert (failed.observed_generation, failed.outcome) == (2, ApplyOutcome.FAILED)
    assert failed.error and "asked to fail" in failed.error
    assert failed.policy == {"ok": 1}  # still running generation 1's policy
    assert harness.reconciler.state.generation == 1
    assert harness.store.load_applied().last_failure == FailedApply(2, failed.error)

    harness.reconciler.request_report()  # what a reconnect does
    assert harness.settle(3)[2].outcome == ApplyOutcome.FAILED

    harness.send(desired(3, {"ok": 3}))
    reports = harness.settle(4)
    assert (reports[3].observed_generation, reports[3].outcome) == (3, ApplyOutcome.APPLIED)
    assert harness.reconciler.applied_generations == [1, 3]
    assert harness.store.load_applied().last_failure is None


def test_an_unpersistable_apply_is_a_failure(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(state: AppliedState) -> None:
        raise StateError("cannot write applied.json: No space left on device")

    monkeypatch.setattr(harness.store, "save_applied", disk_full)
    harness.send(desired(1))
    (report,) = harness.settle(1)
    assert report.outcome == ApplyOutcome.FAILED and "No space" in (report.error or "")
    assert harness.reconciler.applied_generations == []


def test_bad_payloads_are_counted_not_fatal(harness: Harness) -> None:
    harness.send(b"\xff not json")
    harness.send(b"[1, 2]")
    harness.send(b"x" * (256 * 1024 + 1))
    harness.send(desired(1, schema_version=99))
    harness.send(desired(1, device_id="someone-else"))
    harness.send(b'{"schema_version": 1, "device_id": "dev-1", "generation": 0}')
    harness.send(b'{"schema_version": 1, "device_id": "dev-1", "generation": 1, "policy": [1]}')
    assert harness.rejects.snapshot() == {
        ("desired", "malformed"): 4,
        ("desired", "oversized"): 1,
        ("desired", "unsupported_version"): 1,
        ("desired", "device_mismatch"): 1,
    }
    harness.send(desired(1))
    (report,) = harness.settle(1)
    assert report.observed_generation == 1


def test_nothing_to_report_on_a_fresh_device(harness: Harness) -> None:
    harness.reconciler.report_current()
    assert harness.reports() == []
