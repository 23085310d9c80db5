"""Subscriber client for the perception node's streams.

    from perception.stream.client import Subscriber
    with Subscriber("tcp://127.0.0.1:5555", topics=["segnet/mask"]) as sub:
        for msg in sub:
            labels = msg.data          # (H, W) uint8 class ids
            print(msg.header["seq"], msg.header["stamp_ns"])

``latest_only=True`` returns only the newest message per topic each time (older queued ones are
dropped), which is what a display or a controller wants. ZeroMQ's CONFLATE option cannot do this for
multipart messages, so it is done here, on whole messages.

:func:`follow` owns the rules for when a stream is over (a count, a duration, silence, a refused CURVE
handshake, a signal, or every camera's final stats), for the consumers (echo, record, the Foxglove bridge,
the browser view) and for programs of your own:

    with Subscriber("tcp://127.0.0.1:5555") as sub:
        following = follow(sub, timeout=10)
        for msg in following:
            ...
        print(following.end)     # why it stopped: "final", "silence", "count", ...
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import zmq

from perception.stream.monitor import monitor_owned, own_context_term
from perception.stream.protocol import DEFAULT_LIMITS, FRAME_STREAMS, Limits, Message, ProtocolError, decode_message

__all__ = ["Subscriber", "Message", "ProtocolError", "rejections_text", "missed_text", "follow", "Follow",
           "END_REASONS"]

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
# libzmq re-making a connection says CONNECT_RETRIED when it schedules the next try, CONNECTED when
# one succeeds (CONNECT_DELAYED, on every try, would only add to the events to read).
_RECONNECTING = zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED
_RECONNECT_GRACE_S = 1.0
# ZMTP heartbeats: a node whose machine vanished (no TCP close) counts as disconnected after the timeout.
_HEARTBEAT_IVL_MS, _HEARTBEAT_TIMEOUT_MS = 2000, 6000
NODE_GONE_S = 10.0  # a node disconnected this long without its final stats is gone (a restart takes less)


def _tally_text(counts: Counter[str], noun: str, what: str, sep: str) -> str:
    total = sum(counts.values())
    if not total:
        return ""
    parts = ", ".join(f"{key}{sep}{n}" for key, n in counts.most_common())
    return f"{total} {noun}{'s' if total != 1 else ''} {what} ({parts})"


def rejections_text(counts: Counter[str]) -> str:
    """``"N messages rejected (reason: count, ...)"`` for a count by reason, or "" when there are none."""
    return _tally_text(counts, "message", "rejected", ": ")


def missed_text(missed: Counter[str]) -> str:
    """``"N frames missed (seq gaps: topic N, ...)"`` for the frames a consumer never received, or ""."""
    text = _tally_text(missed, "frame", "missed", " ")
    return text.replace("missed (", "missed (seq gaps: ", 1)


class Subscriber:
    """Receives, bounds and decodes a node's messages (:func:`~perception.stream.protocol.decode_message`).

    Malformed messages are skipped (``on_error="skip"``) and counted by reason in :attr:`rejected`, or
    raised (``"raise"``). Frames that never arrived (the node dropped them for this subscriber when it fell
    behind, or its own capture dropped them) are counted per topic in :attr:`missed`, from the gaps in each
    frame stream's ``seq`` (a smaller ``seq`` is a new node run, not a gap), and those after the last one
    received from the node's final stats (``frames_captured``); ``latest_only`` skips frames by design and
    counts none. A connection libzmq drops (a message over the size limit) is re-made; with
    ``latest_only`` only the newest message per topic is returned. The subscriber owns its ZeroMQ
    context unless given one; :meth:`close` (or ``with``) closes the socket and terminates it.
    """

    def __init__(
        self, endpoint: str, topics: Iterable[str] | str = ("",), *, latest_only: bool = False,
        rcvhwm: int = 100, limits: Limits = DEFAULT_LIMITS, decode_jpeg: bool = True,
        context: zmq.Context | None = None, on_error: str = "skip", curve: tuple[str, str] | None = None,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError("on_error must be 'skip' or 'raise'")
        # A context of its own unless given one, terminated by close() (after its socket, linger 0).
        self.ctx = context if context is not None else zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Refuse oversize messages in libzmq itself, before they reach Python.
        self.sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
        # libzmq drops the connection on a message over MAXMSGSIZE and never re-makes it: the
        # subscriber would stay deaf for good. Watch for disconnects and reconnect ourselves.
        self._monitor, self._finalizer = monitor_owned(
            self, self.sock, zmq.EVENT_DISCONNECTED | _RECONNECTING | _HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED,
            then=() if context is not None else (own_context_term(self.ctx),))
        self._lost_at: float | None = None  # a disconnect libzmq has not (yet) followed with a reconnect
        self._gone_since: float | None = None  # the node's connection closed and not yet re-made
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        try:
            if curve is not None:  # (node's public key file, this client's key pair file)
                from perception.stream.security import configure_client

                configure_client(self.sock, *curve)
            self.sock.connect(endpoint)
        except BaseException:
            self.close()  # a bad endpoint or key file leaves no socket behind
            raise
        self.handshake_failures = 0  # CURVE: wrong server key, or this client's key is not allowed
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor.pair, zmq.POLLIN)
        self.reconnects = 0  # connections dropped (a peer over the size limit, a restarted node) and re-made
        for t in [topics] if isinstance(topics, str) else topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.latest_only = latest_only
        self.limits = limits
        self.decode_jpeg = decode_jpeg
        self.on_error = on_error
        self.errors = 0  # messages rejected as malformed; by reason in `rejected`
        self.rejected: Counter[str] = Counter()
        self.dropped = 0  # messages superseded in latest_only mode
        self.missed: Counter[str] = Counter()  # frames never received, by topic (seq gaps)
        self._last_seq: dict[str, int] = {}
        self._pending: dict[bytes, list] = {}
        self.endpoint = endpoint

    def subscribe(self, topic: str) -> None:
        """Add a topic prefix (from the thread that uses this subscriber: ZeroMQ sockets are not
        thread-safe). The node starts computing a stream when its first subscription arrives."""
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())

    def unsubscribe(self, topic: str) -> None:
        """Drop a topic prefix added before; the node stops computing a stream nobody subscribes to."""
        self.sock.setsockopt(zmq.UNSUBSCRIBE, topic.encode())
        self._pending.pop(topic.encode(), None)

    def _check_connection(self) -> None:
        for event in self._monitor.events():
            if event & _HANDSHAKE_FAILED:
                self.handshake_failures += 1  # libzmq retries on its own; hammering a refusing node helps nobody
                self._lost_at = None
            elif event == zmq.EVENT_DISCONNECTED:
                self._lost_at = time.monotonic()
                self._gone_since = self._gone_since or self._lost_at
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._gone_since = None
            elif event & _RECONNECTING:
                self._lost_at = None  # libzmq is re-making the connection itself (e.g. a restarted node)
        # After a message over MAXMSGSIZE libzmq drops the connection and stays silent. Re-make it only
        # then (a grace period later): disconnecting while libzmq reconnects could cut a message in half.
        if self._lost_at is not None and time.monotonic() - self._lost_at > _RECONNECT_GRACE_S:
            self._lost_at = None
            self.sock.disconnect(self.endpoint)
            self.sock.connect(self.endpoint)
            self.reconnects += 1

    def _wait(self, timeout_ms: int | None) -> bool:
        """Wait until a message is readable (True) or the timeout passes (False), re-making a dropped
        connection on the way."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            remaining = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if self._lost_at is not None:  # wake up in time to re-make a dropped connection
                remaining = 200 if remaining is None else min(remaining, 200)
            ready = dict(self._poller.poll(remaining))
            if self._monitor.pair in ready or self._lost_at is not None:
                self._check_connection()
            if self.sock in ready:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def node_gone_for(self) -> float:
        """Seconds since the node's connection closed (it exited, was killed, or missed its heartbeats) without
        being re-made; 0 while connected, and before the first connection."""
        return 0.0 if self._gone_since is None else time.monotonic() - self._gone_since

    def _decode(self, frames) -> Message | None:
        try:
            msg = decode_message(frames, self.limits, decode_jpeg=self.decode_jpeg)
        except ProtocolError as e:
            self.errors += 1
            self.rejected[e.reason] += 1
            if self.on_error == "raise":
                raise
            return None
        if msg.stream in FRAME_STREAMS and not self.latest_only:
            self._count_gap(msg.topic, msg.header.get("seq"))
        elif msg.stream == "stats" and not self.latest_only and isinstance(msg.data, dict) and msg.data.get("final"):
            self._count_tail(msg.topic.rsplit("/", 1)[0], msg.data.get("frames_captured"))
        return msg

    def _count_gap(self, topic: str, seq: object) -> None:
        if not isinstance(seq, int):
            return
        last = self._last_seq.get(topic)
        if last is not None and seq > last + 1:
            self.missed[topic] += seq - last - 1
        self._last_seq[topic] = seq  # a smaller seq is a new run of the node: counting starts again

    def _count_tail(self, prefix: str, captured: object) -> None:
        """The frames after the last one received, which no later frame's seq reveals: the node's final
        stats say how many frames it read (seq ran from 0 to ``frames_captured`` - 1)."""
        if not isinstance(captured, int):
            return
        for topic, last in self._last_seq.items():
            if topic.rsplit("/", 1)[0] == prefix and captured - 1 > last:
                self.missed[topic] += captured - 1 - last
                self._last_seq[topic] = captured - 1  # a repeated final counts nothing more

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message; with ``latest_only``, the newest queued one of a topic (older ones of
        that topic are dropped). None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._pending:
                msg = self._decode(self._pending.pop(next(iter(self._pending))))
                if msg is not None:
                    return msg
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._wait(None if remaining is None else int(remaining * 1000)):
                return None
            frames = self.sock.recv_multipart(copy=False)
            if not self.latest_only:
                msg = self._decode(frames)
                if msg is not None:
                    return msg
                continue
            # Keep the newest raw message per topic; decode only those that are returned.
            self._pending[bytes(frames[0].buffer)] = frames
            while self.sock.poll(0):
                frames = self.sock.recv_multipart(copy=False)
                key = bytes(frames[0].buffer)
                if key in self._pending:
                    self.dropped += 1
                    del self._pending[key]  # re-insert: order by newest arrival
                self._pending[key] = frames

    def recv_latest(self, timeout: float | None = None) -> dict[str, Message]:
        """Drain the queue: the newest message per topic (waits up to ``timeout`` for the first)."""
        out: dict[str, Message] = {}
        first = True
        while self._wait(0 if not first else (None if timeout is None else int(timeout * 1000))):
            first = False
            msg = self._decode(self.sock.recv_multipart(copy=False))
            if msg is not None:
                out[msg.topic] = msg
        return out

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg

    def rejections(self) -> str:
        """``"N messages rejected (reason: count, ...)"``, or "" when none were: what consumers report."""
        return rejections_text(self.rejected)

    def losses(self) -> str:
        """What this subscriber lost, for a consumer's summary: frames missed (seq gaps) and messages
        rejected, "; "-joined, or "" when nothing was."""
        return "; ".join(t for t in (missed_text(self.missed), self.rejections()) if t)

    def close(self) -> None:
        self._finalizer()  # close_monitored, once

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


END_REASONS = ("final", "count", "duration", "silence", "handshake", "gone", "stopped")


class Follow:
    """Messages of a subscriber until the stream is over; :attr:`end` then says why (one of
    :data:`END_REASONS`), or stays None while it runs. Made by :func:`follow`."""

    def __init__(self, sub: Subscriber, *, count: int | None = None, duration: float | None = None,
                 timeout: float | None = None, until_final: bool = True, stopped: threading.Event | None = None,
                 counted: Callable[[Message], bool] | None = None, idle: bool = False, finals_needed: int = 1,
                 poll_s: float = 0.2, warn: Callable[[str], None] | None = None,
                 gone_after: float | None = NODE_GONE_S) -> None:
        self.sub, self.count, self.duration, self.timeout = sub, count, duration, timeout
        self.gone_after = gone_after  # waiting for the final stats: end when the node is gone this long
        self.finals_needed = finals_needed
        self.warn = warn  # told once, at the first frame that never arrived
        self.until_final, self.stopped, self.counted = until_final, stopped, counted
        self.idle, self.poll_s = idle, poll_s
        self.end: str | None = None
        self.received = 0  # messages that count towards ``count``
        self._running: set[str] = set()  # stats topics (one per camera) seen and not yet final
        self._finished: set[str] = set()
        self._finals_seen: set[tuple[str, object]] = set()  # (topic, seq): the node repeats its final stats

    def _stop_before_recv(self, started: float) -> str | None:
        if self.stopped is not None and self.stopped.is_set():
            return "stopped"
        if self.count is not None and self.received >= self.count:
            return "count"
        if self.duration is not None and time.monotonic() - started > self.duration:
            return "duration"
        return None

    def _repeated_final(self, msg: Message) -> bool:
        """Whether ``msg`` repeats a final stats message already seen (a node re-sends it for slow consumers)."""
        if msg.stream != "stats" or not isinstance(msg.data, dict) or msg.data.get("final") is not True:
            return False
        key = (msg.topic, msg.header.get("seq"))
        seen = key in self._finals_seen
        self._finals_seen.add(key)
        return seen

    def _is_final(self, msg: Message) -> bool:
        """Whether ``msg`` completes the node's run: every camera's stats said ``final``."""
        if msg.stream != "stats" or not isinstance(msg.data, dict):
            return False
        if msg.data.get("final") is True:
            self._finished.add(msg.topic)
            self._running.discard(msg.topic)
        else:
            self._running.add(msg.topic)
        return self.until_final and len(self._finished) >= self.finals_needed and not self._running

    def __iter__(self) -> Iterator[Message | None]:
        started = last = time.monotonic()
        while (end := self._stop_before_recv(started)) is None:
            msg = self.sub.recv(timeout=self.poll_s)
            if msg is None:
                if self.sub.handshake_failures:
                    end = "handshake"
                    break
                if self.timeout is not None and time.monotonic() - last > self.timeout:
                    end = "silence"
                    break
                if self.until_final and self.gone_after is not None and self.sub.node_gone_for() > self.gone_after:
                    end = "gone"  # killed, or its machine lost: the final stats will never come
                    break
                if self.idle:
                    yield None  # lets the caller do periodic work (rates, status) while nothing arrives
                continue
            last = time.monotonic()
            if self.warn is not None and sum(self.sub.missed.values()):
                self.warn(f"frames are being missed (seq jumped on {next(iter(self.sub.missed))}): this consumer "
                          "is falling behind the node, or the node is dropping frames")
                self.warn = None
            if self._repeated_final(msg):
                continue
            if self.counted is None or self.counted(msg):
                self.received += 1
            yield msg
            if self._is_final(msg):
                end = "final"
                break
        self.end = end


def follow(sub: Subscriber, *, count: int | None = None, duration: float | None = None, timeout: float | None = None,
           until_final: bool = True, stopped: threading.Event | None = None,
           counted: Callable[[Message], bool] | None = None, idle: bool = False, finals_needed: int = 1,
           warn: Callable[[str], None] | None = None, gone_after: float | None = NODE_GONE_S) -> Follow:
    """Follow a node through ``sub`` until ``count`` messages (those ``counted`` says count), ``duration``
    seconds, ``timeout`` seconds of silence, a refused CURVE handshake, ``stopped`` being set, or (with
    ``until_final``) the final stats of every camera that sent stats (at least ``finals_needed`` cameras), or
    the node gone ``gone_after`` seconds without them (its connection closed and not re-made: killed, or its
    machine lost). With ``idle`` the iteration also yields None at each quiet poll; ``warn`` hears once of
    the first frame that never arrived (the subscriber's ``missed`` counts them all)."""
    return Follow(sub, count=count, duration=duration, timeout=timeout, until_final=until_final, stopped=stopped,
                  counted=counted, idle=idle, finals_needed=finals_needed, warn=warn, gone_after=gone_after)
