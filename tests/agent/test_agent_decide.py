"""The pure decision and the placeholder applier."""

from __future__ import annotations

import pytest

from edge_agent.reconcile import (
    AlreadyApplied,
    Apply,
    Decision,
    JsonPolicyApplier,
    PolicyError,
    Stale,
    decide,
)


@pytest.mark.parametrize(
    ("desired", "applied", "failed", "expected"),
    [
        (1, 0, None, Apply(1)),  # fresh device
        (5, 0, None, Apply(5)),  # generations may be skipped (only the latest is retained)
        (3, 2, None, Apply(3)),
        (2, 2, None, AlreadyApplied(2)),
        (1, 2, None, Stale(1, 2)),
        (3, 1, 3, Apply(3)),  # a failed generation is retried when delivered again
        (2, 1, 3, Stale(2, 3)),  # ... but anything older than it is a late duplicate
        (1, 1, 3, AlreadyApplied(1)),
        (4, 1, 3, Apply(4)),
        (2, 3, 2, Stale(2, 3)),
    ],
)
def test_decide(desired: int, applied: int, failed: int | None, expected: Decision) -> None:
    assert decide(desired, applied, failed_generation=failed) == expected


def test_decide_without_failure_is_the_two_argument_form() -> None:
    assert decide(2, 1) == Apply(2)
    assert decide(1, 1) == AlreadyApplied(1)
    assert decide(0, 1) == Stale(0, 1)


def test_json_applier_accepts_objects_and_copies_them() -> None:
    policy = {"offload_slo_ms": 150}
    active = JsonPolicyApplier().apply(1, policy)
    assert active == policy and active is not policy


@pytest.mark.parametrize("policy", [{"fail": True}, [1, 2], "x", None])
def test_json_applier_fails_on_request_or_non_objects(policy: object) -> None:
    with pytest.raises(PolicyError):
        JsonPolicyApplier().apply(7, policy)


def test_fail_must_be_literally_true() -> None:
    assert JsonPolicyApplier().apply(1, {"fail": "yes"}) == {"fail": "yes"}
