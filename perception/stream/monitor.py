"""A libzmq socket monitor that cannot stall the process's ZeroMQ I/O thread.

libzmq delivers monitor events from its I/O thread with a *blocking* send on an inproc PAIR socket
(``socket_base_t::monitor_event``). That send blocks for good, and with it every socket of the
context (no connection is accepted or made any more), in two cases:

- the events are not read and the PAIR's queue fills: a subscriber retrying an endpoint where nothing
  listens makes several a second (a try every 100 ms), and pyzmq's ``get_monitor_socket`` keeps the
  default high-water marks (1000 + 1000 messages), so an unread monitor hangs the process within
  minutes;
- the reading PAIR is closed while monitoring is still on (zeromq/libzmq#3575), which is what the
  garbage collector does to an object that was never closed: it closes the two sockets in either order.

:class:`SocketMonitor` reads through an unbounded PAIR (``RCVHWM`` 0; an event is a few dozen bytes),
turns monitoring off before it closes that PAIR, and uses an address of its own (pyzmq's default is
named after the socket's file descriptor, which the OS hands out again). :func:`close_monitored` is
the one order in which a monitored socket may be closed; owners also register it with
``weakref.finalize`` so that one dropped without ``close()`` is closed in that order too.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable, Iterator, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["SocketMonitor", "close_monitored", "monitor_owned", "own_context_term"]

_addresses = itertools.count()


class SocketMonitor:
    """Events (``zmq.EVENT_*`` bit masks) of ``sock``, read from :attr:`pair`."""

    def __init__(self, sock: zmq.Socket, events: int) -> None:
        self._sock = sock
        address = f"inproc://perception-monitor-{os.getpid()}-{next(_addresses)}"
        self.pair = sock.context.socket(zmq.PAIR)
        self.pair.setsockopt(zmq.RCVHWM, 0)  # 0: no limit, so libzmq's send never waits for a reader
        self.pair.setsockopt(zmq.LINGER, 0)
        # Connect before monitoring starts (inproc allows connecting first): an event libzmq sends
        # before a reader is attached would block just the same.
        self.pair.connect(address)
        try:
            sock.monitor(address, events)
        except zmq.ZMQError:
            self.pair.close(linger=0)
            raise

    def events(self) -> Iterator[int]:
        """The events queued so far (without waiting)."""
        while self.pair.poll(0):
            yield recv_monitor_message(self.pair)["event"]

    def close(self) -> None:
        """Turn monitoring off, then close the reading PAIR (the other order can hang libzmq)."""
        if self.pair.closed:
            return
        if not self._sock.closed:
            try:
                self._sock.monitor(None, 0)
            except zmq.ZMQError:
                pass
        self.pair.close(linger=0)


def close_monitored(sock: zmq.Socket, monitor: SocketMonitor, linger_ms: int | None = 0,
                    then: Sequence[Callable[[], None]] = ()) -> None:
    """Close a monitored socket: its monitor first, then the socket, then ``then`` in order (e.g. stop
    an authenticator, terminate the socket's own context)."""
    monitor.close()
    if not sock.closed:
        sock.close(linger=linger_ms)
    for step in then:
        step()


def own_context_term(ctx: zmq.Context) -> Callable[[], None]:
    """A step for :func:`close_monitored` that terminates an owner's own context.

    ``zmq_ctx_term`` returns once every message queued on the context's (closed) sockets has gone or
    their linger has expired. Until then libzmq's I/O thread may still be reading a zero-copy payload
    (``send(copy=False)``), whose Python buffer pyzmq keeps alive only while its garbage thread runs;
    at interpreter exit that thread is stopped and the buffers freed. Terminating first is what keeps
    the last messages (the final stats) and keeps libzmq off freed memory (segfault, or ``Bad address
    (src/tcp.cpp:227)`` when a large buffer was unmapped).
    """
    def term() -> None:
        if not ctx.closed:
            ctx.term()

    return term


def monitor_owned(owner: object, sock: zmq.Socket, events: int, linger_ms: int | None = 0,
                  then: Sequence[Callable[[], None]] = ()) -> tuple[SocketMonitor, weakref.finalize]:
    """Monitor ``sock`` for ``owner`` (a Subscriber, a Publisher): the monitor, and a finalizer that
    closes both in order, then runs ``then``, once (call it to close; the garbage collector calls it for
    an owner dropped without closing). ``sock`` is closed here (and ``then`` run) if the monitor cannot
    be made."""
    try:
        monitor = SocketMonitor(sock, events)
    except BaseException:
        sock.close(linger=0)
        for step in then:
            step()
        raise
    finalizer = weakref.finalize(owner, close_monitored, sock, monitor, linger_ms, tuple(then))
    # Not at interpreter exit: a daemon thread may still be using the socket then (libzmq sockets
    # are not thread-safe), and the process's end closes everything anyway.
    finalizer.atexit = False
    return monitor, finalizer
