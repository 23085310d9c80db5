"""ZeroMQ XPUB publisher that knows who is listening.

XPUB (rather than PUB) hands us the subscribers' subscription messages, which gives the node
ROS-publisher behaviour: a stream is computed only while someone subscribes to it, the latched
``info`` topic is re-sent whenever a subscriber joins, and ``--wait-for-subscribers`` can hold the
first frame until consumers are connected (PUB/SUB's "slow joiner" would otherwise lose it).

One socket, guarded by a lock, so that several cameras' pipelines (one thread each) can share it
through :class:`PublisherView`, each under its own namespace (``segnet/front``, ``segnet/rear``).
"""

from __future__ import annotations

import atexit
import errno
import threading
import time
import weakref
from typing import Any

import numpy as np
import zmq
import zmq.utils.garbage  # noqa: F401  (its exit handler must be registered before ours, see below)

from perception.stream.monitor import close_monitored, monitor_owned, own_context_term
from perception.stream.protocol import DEFAULT_LIMITS, Limits, encode_header, encode_map, payload_crc32, topic_for

__all__ = ["Publisher", "PublisherError", "PublisherView"]

# Publishers still open when the interpreter exits are closed first (their queued messages go, and
# libzmq stops reading their zero-copy payloads) and only then does pyzmq's own exit handler drop the
# payload references. atexit runs handlers last-registered first, so this one is registered with the
# first publisher: after pyzmq's garbage collector registered its handler (at import), and after
# weakref.finalize registered the one that disables every finalizer (at the first finalizer made).
_open_publishers: "weakref.WeakSet[Publisher]" = weakref.WeakSet()
_exit_handler_registered = False


def _close_open_publishers() -> None:
    for publisher in list(_open_publishers):
        publisher._close_at_exit()


def _register_exit_handler() -> None:
    global _exit_handler_registered
    if not _exit_handler_registered:
        atexit.register(_close_open_publishers)
        _exit_handler_registered = True


class PublisherError(RuntimeError):
    """The publisher cannot bind or send (the message is one line, for users)."""


class Publisher:
    """The node's side of the wire: an XPUB socket bound to ``endpoint`` that sends ``[topic, header,
    payload]`` messages under ``namespace`` (payload arrays zero-copy), knows which streams subscribers
    want (:meth:`wants`) and how many are connected, withholds messages over the consumers' size
    limit, and optionally encrypts and authenticates with CURVE. It owns its ZeroMQ context unless
    given one: :meth:`close` waits (up to the linger) for queued messages to go, then terminates it.
    Thread-safe for several cameras' pipelines through :meth:`view`.
    """

    def __init__(
        self, endpoint: str, namespace: str, *, sndhwm: int = 8, linger_ms: int = 2000,
        context: zmq.Context | None = None, limits: Limits = DEFAULT_LIMITS,
        on_oversize=None, curve=None, checksum: bool = False,
    ) -> None:
        self.namespace = namespace
        # Consumers refuse (and ZMQ_MAXMSGSIZE disconnects on) messages over limits.max_message_bytes:
        # such a message is never sent, only counted; on_oversize(stream, nbytes) hears of it.
        self.limits = limits
        self.on_oversize = on_oversize
        self.oversize: dict[str, int] = {}
        # A context of its own unless given one: close() terminates it, which waits (up to the linger)
        # for queued zero-copy payloads to go before the process may free them (monitor.own_context_term).
        self.ctx = context if context is not None else zmq.Context()
        teardown = [] if curve is None else [curve.stop]  # the authenticator's socket lives on this context
        if context is None:
            teardown.append(own_context_term(self.ctx))
        self._teardown = tuple(teardown)
        self.sock = self.ctx.socket(zmq.XPUB)
        # Every subscribe message, duplicates included: each joining subscriber is seen.
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        # A slow subscriber's queue is bounded; past it, messages to *that* subscriber are dropped and
        # the node and other subscribers carry on.
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        # Each message's header carries its payload's CRC-32 (``crc32``), which subscribers verify: proof
        # that the bytes received are the bytes meant, at the cost of one pass over each payload.
        self.checksum = checksum
        self.curve = curve  # a security.CurveServer: encrypt, and admit only the clients it allows
        self._monitor, self._finalizer = monitor_owned(self, self.sock, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED,
                                                       linger_ms, self._teardown)
        self._linger_ms = linger_ms
        _open_publishers.add(self)
        _register_exit_handler()
        if curve is not None:
            try:
                curve.apply(self.sock)
            except BaseException:
                self.close(linger_ms=0)
                raise
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            self.close(linger_ms=0)
            if e.errno == errno.EADDRINUSE or e.errno == zmq.EADDRINUSE:
                raise PublisherError(f"endpoint {endpoint} is already in use") from None
            raise PublisherError(f"cannot bind {endpoint}: {e}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # One poller for the life of the socket: poll() runs on every loop iteration of the node.
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor.pair, zmq.POLLIN)
        self.prefixes: set[bytes] = set()  # active subscription prefixes
        self.peers = 0  # connected subscriber sockets
        self.subscribe_events = 0
        self._joined_info = False
        self._info_joined: set[str] = set()  # view namespaces whose info topic got a new subscriber
        self.views: list[PublisherView] = []
        self.sent: dict[str, int] = {}
        self.lagged = 0  # times a subscriber's queue was full: it missed that message and the next until it caught up
        self._lock = threading.RLock()

    # -- subscriptions --------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 0) -> None:
        """Process pending subscription and connection events (waiting up to ``timeout_ms`` for one)."""
        if timeout_ms:
            self._wait_for_events(timeout_ms)
        with self._lock:
            self._poll_locked()

    def _wait_for_events(self, timeout_ms: int) -> None:
        # Wait without holding the lock (other cameras keep sending); then process under it.
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            with self._lock:
                if self._poller.poll(0):
                    return
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    def _poll_locked(self) -> None:
        poller = self._poller
        events = dict(poller.poll(0))
        while events:
            if self.sock in events:
                while self.sock.poll(0, zmq.POLLIN):
                    self._on_subscription(self.sock.recv())
            if self._monitor.pair in events:
                for event in self._monitor.events():
                    if event == zmq.EVENT_ACCEPTED:
                        self.peers += 1
                    elif event == zmq.EVENT_DISCONNECTED:
                        self.peers = max(0, self.peers - 1)
            events = dict(poller.poll(0))

    def _on_subscription(self, msg: bytes) -> None:
        if not msg:
            return
        kind, prefix = msg[0], msg[1:]
        if kind == 1:
            self.subscribe_events += 1
            self.prefixes.add(prefix)
            if self._topic(b"info").startswith(prefix):
                self._joined_info = True
            for view in self.views:
                if topic_for(view.namespace, "info").encode().startswith(prefix):
                    self._info_joined.add(view.namespace)
        elif kind == 0:
            # Delivered only when the last subscriber of this prefix has left.
            self.prefixes.discard(prefix)

    def _topic(self, stream: bytes) -> bytes:
        return topic_for(self.namespace, stream.decode()).encode()

    def wants(self, stream: str, *, namespace: str | None = None) -> bool:
        topic = topic_for(self.namespace if namespace is None else namespace, stream).encode()
        with self._lock:
            return any(topic.startswith(p) for p in self.prefixes)

    def take_info_request(self) -> bool:
        """True once after a subscriber to ``info`` joined (so the latched info is re-sent)."""
        joined, self._joined_info = self._joined_info, False
        return joined

    def wait_for_subscribers(self, n: int, *, timeout_s: float | None = None, should_stop=lambda: False) -> bool:
        """Block until ``n`` subscriber sockets are connected and have sent at least ``n``
        subscriptions; a short settle lets a subscriber's remaining subscriptions arrive too."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not (self.peers >= n and self.subscribe_events >= n):
            if should_stop() or (deadline is not None and time.monotonic() > deadline):
                return False
            self.poll(100)
        settle = time.monotonic() + 0.2
        while time.monotonic() < settle:
            self.poll(20)
        return True

    # -- sending --------------------------------------------------------------------------------

    def publish(self, stream: str, header: dict[str, Any], payload: np.ndarray | bytes) -> None:
        """Send ``[topic, header, payload]``; array payloads go without a copy.

        Each payload array must not be modified afterwards (ZeroMQ may still be sending it): the
        pipeline allocates fresh arrays per frame, so none is reused.
        """
        _publish_counted(self, self, self.namespace, stream, header, payload)

    def _send(self, topic_str: str, header: dict[str, Any], payload: np.ndarray | bytes, *,
              deliver_within_s: float | None = None) -> int | None:
        """Send one message; returns its size instead when it is over the limit (then nothing is sent).

        A live stream drops a message for a subscriber whose queue is full (the high-water mark), and
        libzmq then leaves that subscriber out until it has read half its queue: every message sent in
        between is lost to it, silently. Each send is first tried with XPUB_NODROP, which refuses (sending
        nothing) where a queue is full, so such falls behind are counted (:attr:`lagged`) before the message
        goes to everyone else. With ``deliver_within_s`` (the node's final stats, which tell consumers that it
        has finished) a publisher that has seen a subscriber lag sends the message again every
        quarter second until no subscriber is left or that many seconds have passed, so the lagging
        subscriber gets it once it has caught up (consumers ignore the repeats: same topic and seq)."""
        topic = topic_str.encode()
        body = memoryview(payload).cast("B") if isinstance(payload, np.ndarray) else payload
        if self.checksum:
            header = {**header, "crc32": payload_crc32(body)}
        head = encode_header(header)
        size = len(topic) + len(head) + body.nbytes if isinstance(body, memoryview) else len(topic) + len(head) + len(body)
        if size > self.limits.max_message_bytes:
            return size
        self._send_counted([topic, head, body])
        if deliver_within_s is not None and self.lagged:
            self._repeat([topic, head, body], deliver_within_s)
        return None

    def _send_counted(self, parts: list) -> None:
        with self._lock:
            try:
                self.sock.setsockopt(zmq.XPUB_NODROP, 1)
                try:
                    self.sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                    return
                except zmq.Again:  # some subscriber's queue is full: it will miss this message
                    self.lagged += 1
                finally:
                    self.sock.setsockopt(zmq.XPUB_NODROP, 0)
                self.sock.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)  # to everyone with room
            except zmq.Again:
                pass  # lossy XPUB drops rather than raising; this is belt and braces

    def _repeat(self, parts: list, within_s: float) -> None:
        """Send ``parts`` again every quarter second while subscribers are connected, up to ``within_s``."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            time.sleep(0.25)  # a lagging subscriber's queue drains at its own pace: give it time to catch up
            with self._lock:
                self._poll_locked()  # subscribers that got it and left
                if self.peers == 0:
                    return
            self._send_counted(parts)

    def publish_map(self, stream: str, header: dict[str, Any], data: dict[str, Any], *,
                    deliver_within_s: float | None = None) -> None:
        """Send a msgpack map (info, stats); ``deliver_within_s`` holds it for slow subscribers (:meth:`_send`)."""
        _publish_counted(self, self, self.namespace, stream, {**header, "encoding": "msgpack"}, encode_map(data),
                         deliver_within_s=deliver_within_s)

    def view(self, namespace: str) -> "PublisherView":
        """A publisher for one camera: the same socket, its own namespace and counters."""
        v = PublisherView(self, namespace)
        with self._lock:
            self.views.append(v)
        return v

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket (queued messages may take up to the linger to go), stop CURVE's authenticator,
        and terminate the publisher's own context, which returns once they have gone."""
        if linger_ms is not None and self._finalizer.alive:
            self._finalizer.detach()
            close_monitored(self.sock, self._monitor, linger_ms, self._teardown)
        self._finalizer()  # close_monitored with the constructor's linger, once
        _open_publishers.discard(self)

    def _close_at_exit(self) -> None:
        # weakref's exit handler has disabled the finalizer by now: close directly, once.
        if self._finalizer.detach() is not None or not self.sock.closed:
            close_monitored(self.sock, self._monitor, self._linger_ms, self._teardown)
        _open_publishers.discard(self)


class PublisherView:
    """One camera's side of a shared :class:`Publisher`: what a :class:`~perception.stream.node.pipeline.Node`
    needs (wants, publish, info requests, counters) under the camera's own namespace."""

    def __init__(self, publisher: Publisher, namespace: str) -> None:
        self.publisher = publisher
        self.namespace = namespace
        self.limits = publisher.limits
        self.endpoint = publisher.endpoint
        self.on_oversize = None
        self.sent: dict[str, int] = {}
        self.oversize: dict[str, int] = {}

    @property
    def peers(self) -> int:
        return self.publisher.peers

    @property
    def lagged(self) -> int:
        """Times a subscriber fell behind (the shared socket's count)."""
        return self.publisher.lagged

    def poll(self, timeout_ms: int = 0) -> None:
        self.publisher.poll(timeout_ms)

    def wants(self, stream: str) -> bool:
        return self.publisher.wants(stream, namespace=self.namespace)

    def take_info_request(self) -> bool:
        with self.publisher._lock:
            joined = self.namespace in self.publisher._info_joined
            self.publisher._info_joined.discard(self.namespace)
        return joined

    def wait_for_subscribers(self, n: int, **kwargs) -> bool:
        return self.publisher.wait_for_subscribers(n, **kwargs)

    def publish(self, stream: str, header: dict[str, Any], payload: np.ndarray | bytes) -> None:
        _publish_counted(self, self.publisher, self.namespace, stream, header, payload)

    def publish_map(self, stream: str, header: dict[str, Any], data: dict[str, Any], *,
                    deliver_within_s: float | None = None) -> None:
        _publish_counted(self, self.publisher, self.namespace, stream, {**header, "encoding": "msgpack"},
                         encode_map(data), deliver_within_s=deliver_within_s)

    def close(self, linger_ms: int | None = None) -> None:
        pass  # the shared publisher is closed by its owner


def _publish_counted(owner, publisher: Publisher, namespace: str, stream: str, header: dict[str, Any],
                     payload: np.ndarray | bytes, deliver_within_s: float | None = None) -> None:
    """Send through ``publisher`` and count on ``owner`` (a Publisher or a view): sent, or withheld
    as oversize (``owner.on_oversize(stream, nbytes)`` hears of it)."""
    size = publisher._send(topic_for(namespace, stream), header, payload, deliver_within_s=deliver_within_s)
    if size is not None:
        owner.oversize[stream] = owner.oversize.get(stream, 0) + 1
        if owner.on_oversize is not None:
            owner.on_oversize(stream, size)
        return
    owner.sent[stream] = owner.sent.get(stream, 0) + 1
