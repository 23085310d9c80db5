"""follow(): the one set of rules for when a node's stream is over, driven by a scripted subscriber (no
sockets, no clock waits: every rule is decided by the messages and counters it is given)."""

from __future__ import annotations

import threading

from perception.stream.client import END_REASONS, follow
from perception.stream.protocol import Message


class ScriptedSubscriber:
    """recv() returns the scripted items in order (None: a quiet poll), then None for ever; a
    ``"handshake"`` item counts a refused CURVE handshake, as the real subscriber's monitor does."""

    def __init__(self, items, gone_for: float = 0.0):
        self.items = list(items)
        self.handshake_failures = 0
        self.polls = 0
        self.gone_for = gone_for  # what node_gone_for() says once the script has run out

    def node_gone_for(self) -> float:
        return self.gone_for if not self.items else 0.0

    def recv(self, timeout=None):
        self.polls += 1
        if not self.items:
            return None
        item = self.items.pop(0)
        if item == "handshake":
            self.handshake_failures += 1
            return None
        return item


def msg(stream: str, camera: str = "", final: bool | None = None) -> Message:
    topic = "/".join(p for p in ("segnet", camera, stream) if p)
    data = {"final": final} if stream == "stats" else None
    return Message(topic=topic, stream=stream, header={"seq": 0}, data=data)


def test_ends_on_the_final_stats_of_every_camera():
    items = [msg("stats", "front", False), msg("mask", "front"), msg("stats", "rear", False),
             msg("stats", "front", True), msg("mask", "rear"), msg("stats", "rear", True), msg("mask", "rear")]
    following = follow(ScriptedSubscriber(items))
    got = list(following)
    assert following.end == "final" and len(got) == 6  # the rear camera was still running after front's end


def test_finals_needed_waits_for_cameras_not_yet_heard():
    items = [msg("stats", "front", True), msg("mask", "rear"), msg("stats", "rear", True), msg("mask", "rear")]
    following = follow(ScriptedSubscriber(items), finals_needed=2)
    assert len(list(following)) == 3 and following.end == "final"
    following = follow(ScriptedSubscriber(items))  # one camera is enough by default
    assert len(list(following)) == 1 and following.end == "final"


def test_stay_ignores_the_final_stats_and_silence_ends_it():
    items = [msg("stats", final=True), msg("mask")]
    following = follow(ScriptedSubscriber(items), until_final=False, timeout=0.0)
    assert len(list(following)) == 2 and following.end == "silence"


def test_count_counts_only_what_counted_says():
    items = [msg("info"), msg("mask"), msg("stats", final=False), msg("mask"), msg("mask")]
    following = follow(ScriptedSubscriber(items), count=2, counted=lambda m: m.stream == "mask")
    assert [m.stream for m in following] == ["info", "mask", "stats", "mask"] and following.end == "count"


def test_a_refused_handshake_ends_it_even_with_no_timeout():
    sub = ScriptedSubscriber([None, "handshake"])
    following = follow(sub, idle=True)
    assert list(following) == [None] and following.end == "handshake"


def test_stopped_and_duration():
    stopped = threading.Event()
    stopped.set()
    following = follow(ScriptedSubscriber([msg("mask")]), stopped=stopped)
    assert list(following) == [] and following.end == "stopped"
    following = follow(ScriptedSubscriber([msg("mask")] * 3), duration=0.0)
    assert list(following) == [] and following.end == "duration"
    assert following.end in END_REASONS



def test_a_repeated_final_is_yielded_once():
    final = msg("stats", final=True)
    following = follow(ScriptedSubscriber([final, msg("mask"), final, final]), until_final=False, timeout=0.0)
    assert [m.stream for m in following] == ["stats", "mask"] and following.end == "silence"


def test_a_node_gone_without_its_final_stats_ends_it_even_with_no_timeout():
    """Issue 45, item 2: a consumer waited for ever (no --timeout) when the node was killed before its final
    stats. A node disconnected longer than gone_after is gone; until then (a restart) it is followed on."""
    items = [msg("stats", final=False), msg("mask")]
    following = follow(ScriptedSubscriber(items, gone_for=11.0), gone_after=10.0)
    assert len(list(following)) == 2 and following.end == "gone"
    following = follow(ScriptedSubscriber(items, gone_for=9.0), gone_after=10.0, timeout=0.0)
    assert len(list(following)) == 2 and following.end == "silence"  # not yet gone: only --timeout ends it
    following = follow(ScriptedSubscriber(items, gone_for=11.0), gone_after=10.0, until_final=False, timeout=0.0)
    assert len(list(following)) == 2 and following.end == "silence"  # --stay outlives node runs
