"""The policy document and the merge, as pure functions: partial documents, the deep merge
in ascending priority, conflicts, and which devices a selector or group targets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloud_controller.targeting import Fleet, Target, matches, members, merge_labels
from edge_agent.runtime_policy import local_policy
from edge_agent.settings import EdgeSettings
from protocol.policy import Overlay, Policy, deep_merge, defaults, effective, partial


def overlay(name: str, priority: int, document: dict[str, object], version: int = 1) -> Overlay:
    return Overlay(name=name, version=version, priority=priority, document=partial(document))


def test_defaults_equal_the_agents_own_defaults() -> None:
    assert local_policy(EdgeSettings(device_id="d")) == Policy()


def test_partial_keeps_only_what_is_set_and_rejects_unknown_fields() -> None:
    assert partial({"batching": {"max_batch_size": 8}}) == {"batching": {"max_batch_size": 8}}
    with pytest.raises(ValidationError) as info:
        partial({"batching": {"max_batch_sizee": 8}})
    assert info.value.errors()[0]["loc"] == ("batching", "max_batch_sizee")
    with pytest.raises(ValidationError):
        partial({"offload": {"quality_sample_share": 1.5}})
    with pytest.raises(ValidationError):  # checked over the defaults: max_batch_size is 32
        partial({"batching": {"min_batch_size": 64}})


def test_deep_merge_merges_objects_and_replaces_everything_else() -> None:
    base = {"a": {"x": 1, "y": 2}, "v": {"jetson": ["a", "b"]}, "n": 1}
    merged = deep_merge(base, {"a": {"y": 3}, "v": {"jetson": ["c"]}, "n": 2})
    assert merged == {"a": {"x": 1, "y": 3}, "v": {"jetson": ["c"]}, "n": 2}
    assert base["a"] == {"x": 1, "y": 2}  # inputs untouched


def test_effective_applies_overlays_in_ascending_priority() -> None:
    result = effective(
        [
            overlay(
                "site", 10, {"batching": {"max_batch_size": 8}, "telemetry": {"interval_s": 5}}
            ),
            overlay("fleet", 0, {"batching": {"max_batch_size": 16, "max_queue_delay_ms": 4}}),
            overlay("canary", 10, {"telemetry": {"interval_s": 1}}),  # same priority: by name
        ]
    )
    assert result.policy.batching.max_batch_size == 8  # site (10) over fleet (0)
    assert result.policy.batching.max_queue_delay_ms == 4  # only fleet sets it
    assert result.policy.telemetry.interval_s == 5  # "site" merges after "canary"
    assert result.policy.offload == Policy().offload  # untouched: the defaults
    assert [s.name for s in result.sources] == ["fleet", "canary", "site"]
    assert result.conflicts == {}


def test_an_overlay_that_breaks_a_cross_field_rule_is_skipped_and_named() -> None:
    result = effective(
        [
            overlay("small", 0, {"batching": {"max_batch_size": 4}}),
            overlay("floor", 5, {"batching": {"min_batch_size": 8}}, version=3),
        ]
    )
    assert result.policy.batching.max_batch_size == 4
    assert result.policy.batching.min_batch_size == 1
    assert [s.name for s in result.sources] == ["small"]
    assert list(result.conflicts) == ["floor@3"]
    assert "min_batch_size" in result.conflicts["floor@3"]


def test_no_overlay_is_the_defaults() -> None:
    result = effective([])
    assert result.policy.model_dump() == defaults() and result.sources == []


def test_selectors_groups_and_targets() -> None:
    labels = {
        "a": merge_labels({"site": "lab"}, "jetson-orin-nano", {}),
        "b": merge_labels({"site": "lab"}, "jetson-agx-orin", {"site": "field"}),
        "c": merge_labels({}, "jetson-orin-nx", {}),
    }
    assert labels["b"]["site"] == "field"  # the operator's label wins
    assert matches({"site": "lab"}, labels["a"]) and not matches({"site": "lab"}, labels["b"])
    assert matches({}, labels["c"]) and not matches(None, labels["c"])
    assert members(["c", "ghost"], {"hardware_class": "jetson-orin-nano"}, labels) == {"a", "c"}

    fleet = Fleet(labels=labels, groups={"canary": {"c"}})
    by_label = Target(overlay("lab", 0, {}), selector={"site": "lab"}, groups=())
    by_group = Target(overlay("canary", 0, {}), selector=None, groups=("canary", "gone"))
    both = Target(overlay("both", 0, {}), selector={"site": "field"}, groups=("canary",))
    assert [d for d in sorted(labels) if fleet.targeted(by_label, d)] == ["a"]
    assert [d for d in sorted(labels) if fleet.targeted(by_group, d)] == ["c"]
    assert [d for d in sorted(labels) if fleet.targeted(both, d)] == ["b", "c"]
    assert fleet.groups_of("c") == ["canary"]
