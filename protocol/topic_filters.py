"""MQTT topic filters, matched the cheap way: the adapter's routing table.

Every inbound message is routed to the handlers whose filter matches its topic. paho's
``topic_matches_sub`` builds a matching trie for each call, which, per subscription and per
message, cost the controller's network thread more than decoding the payload did.
``TopicFilter`` splits a filter into levels once; ``Routes`` keeps the filters in
subscription order and remembers, per topic, which of them matched (a bounded cache that any
change of the filters empties), so a fleet's steady stream of the same topics costs one
dictionary lookup per message.

Matching follows MQTT 3.1.1/5 (section 4.7): ``+`` is exactly one level (possibly empty),
``#`` is the parent level and everything below it, a topic starting with ``$`` is not
matched by a filter starting with a wildcard, and ``$share/<group>/`` is not part of what a
shared subscription matches. Not thread-safe: the adapter holds its lock around it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")

SHARE_PREFIX = "$share/"


def strip_share(topic_filter: str) -> str:
    """``$share/group/a/b`` matches like ``a/b``."""
    if topic_filter.startswith(SHARE_PREFIX):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class TopicFilter:
    """One subscription filter, split into levels once."""

    __slots__ = ("levels", "text")

    def __init__(self, topic_filter: str) -> None:
        self.text = topic_filter
        self.levels = tuple(strip_share(topic_filter).split("/"))

    def matches(self, topic: str) -> bool:
        return self.matches_levels(topic.split("/"), dollar=topic.startswith("$"))

    def matches_levels(self, topic_levels: list[str], *, dollar: bool) -> bool:
        """``matches`` for a topic already split at ``/`` (``dollar``: it starts with ``$``)."""
        levels = self.levels
        if dollar and levels[0] in ("+", "#"):
            return False
        count = len(topic_levels)
        for index, level in enumerate(levels):
            if level == "#":
                return index == len(levels) - 1  # "#" anywhere else is invalid: no match
            if index >= count or (level != "+" and level != topic_levels[index]):
                return False
        return len(levels) == count


class Routes(Generic[V]):
    """Filters (in the order they were added) and their values; ``match(topic)`` gives the
    values of every filter that matches, remembered for up to ``cache_size`` topics."""

    def __init__(self, *, cache_size: int = 65_536) -> None:
        self._routes: dict[str, tuple[TopicFilter, V]] = {}
        self._cache: dict[str, tuple[V, ...]] = {}
        self._cache_size = cache_size

    def set(self, topic_filter: str, value: V) -> None:
        """Route ``topic_filter`` to ``value`` (replacing its old value, keeping its place)."""
        self._routes[topic_filter] = (TopicFilter(topic_filter), value)
        self._cache.clear()

    def pop(self, topic_filter: str) -> None:
        if self._routes.pop(topic_filter, None) is not None:
            self._cache.clear()

    def __contains__(self, topic_filter: str) -> bool:
        return topic_filter in self._routes

    def items(self) -> Iterator[tuple[str, V]]:
        for text, (_, value) in self._routes.items():
            yield text, value

    def match(self, topic: str) -> tuple[V, ...]:
        found = self._cache.get(topic)
        if found is None:
            levels = topic.split("/")
            dollar = topic.startswith("$")
            found = tuple(
                value
                for compiled, value in self._routes.values()
                if compiled.matches_levels(levels, dollar=dollar)
            )
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[topic] = found
        return found
