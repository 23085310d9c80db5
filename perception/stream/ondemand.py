"""Subscribe upstream only while someone watches: what the view and the Foxglove bridge share.

The node computes a stream only while some subscriber subscribes to it (its XPUB sees subscriptions),
so a consumer that serves many viewers (pages, Foxglove clients) keeps one upstream subscription per
topic, held while at least one viewer watches a channel fed by that topic.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

__all__ = ["OnDemandTopics"]


class OnDemandTopics:
    """Viewers per channel key, and the upstream topic each key needs (``upstream_of``, identity by
    default). :meth:`watch` and :meth:`unwatch` return the upstream topics to subscribe / unsubscribe
    now: a topic is wanted while any viewer watches any key it feeds. Not thread-safe: one owner
    applies the changes (ZeroMQ sockets belong to one thread)."""

    def __init__(self, upstream_of: Callable[[str], str] = lambda key: key) -> None:
        self.upstream_of = upstream_of
        self._viewers: dict[str, set[Hashable]] = {}

    def wanted(self) -> set[str]:
        """The upstream topics some viewer needs now."""
        return {self.upstream_of(key) for key, viewers in self._viewers.items() if viewers}

    def _change(self, key: str, viewer: Hashable, on: bool) -> tuple[set[str], set[str]]:
        before = self.wanted()
        viewers = self._viewers.setdefault(key, set())
        (viewers.add if on else viewers.discard)(viewer)
        after = self.wanted()
        return after - before, before - after

    def watch(self, key: str, viewer: Hashable) -> tuple[set[str], set[str]]:
        """``viewer`` starts watching ``key``: (topics to subscribe, topics to unsubscribe)."""
        return self._change(key, viewer, True)

    def unwatch(self, key: str, viewer: Hashable) -> tuple[set[str], set[str]]:
        """``viewer`` stops watching ``key`` (a no-op if it was not)."""
        return self._change(key, viewer, False)
