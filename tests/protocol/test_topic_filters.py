"""The adapter's topic routing matches exactly as paho's matcher does, cheaply."""

from __future__ import annotations

import paho.mqtt.client as paho
from hypothesis import given
from hypothesis import strategies as st

from protocol.topic_filters import Routes, TopicFilter, strip_share

_LEVELS = st.sampled_from(["a", "b", "", "$x", "dev-1", "a+", "#x"])
_FILTER_LEVELS = st.one_of(_LEVELS, st.sampled_from(["+", "#"]))


def _join(levels: list[str]) -> str:
    return "/".join(levels)


@given(
    st.lists(_FILTER_LEVELS, min_size=1, max_size=5).map(_join),
    st.lists(_LEVELS, min_size=1, max_size=5).map(_join),
)
def test_matches_as_paho_does(topic_filter: str, topic: str) -> None:
    assert TopicFilter(topic_filter).matches(topic) == paho.topic_matches_sub(topic_filter, topic)


def test_wildcards_follow_the_mqtt_rules() -> None:
    devices = TopicFilter("spillway/v1/devices/+/heartbeat")
    assert devices.matches("spillway/v1/devices/d1/heartbeat")
    assert not devices.matches("spillway/v1/devices/d1/telemetry")
    assert not devices.matches("spillway/v1/devices/d1/x/heartbeat")
    assert TopicFilter("a/#").matches("a") and TopicFilter("a/#").matches("a/b/c")
    assert not TopicFilter("#").matches("$SYS/broker")  # wildcards never match $ topics
    assert TopicFilter("$SYS/#").matches("$SYS/broker")
    assert not TopicFilter("a/#/b").matches("a/x/b")  # "#" not last: an invalid filter


def test_a_shared_subscription_matches_its_topic() -> None:
    assert strip_share("$share/controllers/spillway/v1/models/chunks") == (
        "spillway/v1/models/chunks"
    )
    assert TopicFilter("$share/pool/jobs/+").matches("jobs/7")
    assert not TopicFilter("$share/pool/jobs/+").matches("$share/pool/jobs/7")


def test_routes_keep_subscription_order_and_forget_on_change() -> None:
    routes: Routes[str] = Routes(cache_size=2)
    routes.set("a/+", "plus")
    routes.set("a/#", "hash")
    routes.set("a/b", "exact")
    assert routes.match("a/b") == ("plus", "hash", "exact")
    assert routes.match("a/b") == ("plus", "hash", "exact")  # from the cache
    routes.set("a/+", "plus2")  # replaced in place: same order, new value
    assert routes.match("a/b") == ("plus2", "hash", "exact")
    routes.pop("a/#")
    assert routes.match("a/b") == ("plus2", "exact")
    assert "a/#" not in routes and "a/b" in routes
    for topic in ("a/c", "a/d", "a/e"):  # more topics than the cache holds
        assert routes.match(topic) == ("plus2",)
    assert routes.match("b") == ()
    assert list(routes.items()) == [("a/+", "plus2"), ("a/b", "exact")]
