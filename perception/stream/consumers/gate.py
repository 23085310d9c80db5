"""A front gate for a WebSocket server this project does not own (the Foxglove SDK's, which has no limit on
connections and no time limit on the opening handshake).

The gate listens where the user asked, and relays each connection to the server behind it on loopback once
the client has sent a whole HTTP request head (the WebSocket upgrade) in time. Past ``max_connections`` a
new connection is closed as soon as it is accepted; a connection that has not sent its head within
``request_timeout_s``, or sends one over ``MAX_HEAD`` bytes, is closed. So a Slowloris flood costs the
process a bounded number of file descriptors, and clients that behave still get in once the stalled ones
time out, as with ``perception-view`` (whose aiohttp server does this itself). Bytes then flow both ways
unchanged, with back-pressure: a client that reads slowly fills the server's own per-client queue, which
drops its oldest messages.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["ConnectionGate", "GateCounters", "MAX_HEAD"]

MAX_HEAD = 16 << 10  # bytes of request head (a WebSocket upgrade is a few hundred)
_RELAY_CHUNK = 1 << 16


@dataclass
class GateCounters:
    """What the gate turned away, by reason, and how many connections it relayed."""

    relayed: int = 0
    refused: Counter = field(default_factory=Counter)


class ConnectionGate:
    """Listen on ``host:port`` (0: any free port, see :attr:`port`) and relay to ``target`` on loopback, in a
    thread of its own; :meth:`close` stops it. Binding happens in the constructor, so a port in use raises
    ``OSError`` there."""

    def __init__(self, host: str, port: int, target: tuple[str, int], *, max_connections: int = 64,
                 request_timeout_s: float = 10.0) -> None:
        self.target = target
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.counters = GateCounters()
        self.active = 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=128)
        self.port = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="connection-gate", daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        except BaseException:
            self.close()
            raise

    async def _start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._handle, sock=self._sock, limit=MAX_HEAD)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            self.counters.refused["too many connections"] += 1
            writer.transport.abort()
            return
        self.active += 1
        try:
            head = await self._read_head(reader)
            if head is None:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                self.counters.refused["server unreachable"] += 1
                return
            self.counters.relayed += 1
            up_writer.write(head)
            await asyncio.gather(_relay(reader, up_writer), _relay(up_reader, writer))
        finally:
            self.active -= 1
            writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout_s)
        except asyncio.TimeoutError:
            self.counters.refused["request timeout"] += 1
        except asyncio.LimitOverrunError:
            self.counters.refused["request head too large"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            self.counters.refused["closed before a whole request"] += 1
        return None

    def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        if self._loop.is_closed():
            return

        async def stop() -> None:
            server = getattr(self, "_server", None)
            if server is not None:
                server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._sock.close()
        if not self._thread.is_alive():
            self._loop.close()


async def _relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy ``src`` to ``dst`` until either side closes; waits for ``dst`` to drain (back-pressure)."""
    try:
        while data := await src.read(_RELAY_CHUNK):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        dst.transport.abort()
