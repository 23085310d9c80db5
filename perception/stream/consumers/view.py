"""``perception-view``: a live page for a person watching a node: the overlay (or the colour mask),
the class legend with the model's palette, and the node's stats, updating as frames arrive.

    perception-view tcp://127.0.0.1:5555            # then open http://127.0.0.1:8080

Served by aiohttp: ``/`` is one self-contained page (no build step, no CDN: it works offline), and
``/ws`` a WebSocket that pushes JSON (info, stats, connection state) and JPEG frames. Each page gets
only the newest frame of the stream it shows (a slow browser skips frames, it never queues them), and
the node computes a stream only while some page shows it. When the node stops or restarts the page
says so and carries on when frames come back; when the view itself restarts the page reconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import sys
import threading
import time
from importlib import resources
from typing import Any

from dataclasses import dataclass

from perception.core.cli import fail
from perception.core.options import add_arguments, at_least, opt, parse_into, positive
from perception.stream.ondemand import OnDemandTopics
from perception.stream.protocol import encode_jpeg, json_text
from perception.stream.security import ClientKeyOptions

log = logging.getLogger("perception-view")

__all__ = ["ViewState", "ViewCounters", "ViewOptions", "build_parser", "main", "make_app", "serve"]

VIEW_STREAMS = ("overlay", "color_mask", "uncertainty")  # uncertainty: Bayesian models, as a heat map
STALE_AFTER_S = 3.0  # the node sends stats every second: this long without any message means it is gone


class ViewState:
    """What the page shows, fed from the node's messages (any thread) and read by the web side."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.info: dict[str, Any] | None = None
        self.stats: dict[str, Any] | None = None
        self.frames: dict[str, tuple[int, bytes]] = {}  # stream -> (seq, JPEG)
        self.frames_received = 0
        self.last_message = 0.0
        self.last_seq = -1
        self.node_restarts = 0
        self.ended = False
        self.version = 0  # bumped on every change, so waiting pages wake up

    def on_message(self, msg, jpeg: bytes | None = None) -> None:
        with self.lock:
            self.last_message = time.monotonic()
            if msg.stream == "info":
                self.info = msg.data
            elif msg.stream == "stats":
                self.stats = msg.data
                self.ended = msg.data.get("final") is True
            elif msg.stream in VIEW_STREAMS and jpeg is not None:
                seq = int(msg.header["seq"])
                # A node counts frames from 0 for each run: a smaller seq means it has restarted.
                if seq < self.last_seq:
                    self.node_restarts += 1
                self.last_seq = seq
                self.ended = False
                self.frames[msg.stream] = (seq, jpeg)
                self.frames_received += 1
            self.version += 1

    def status(self) -> dict[str, Any]:
        with self.lock:
            age = time.monotonic() - self.last_message if self.last_message else None
            if self.last_message == 0.0:
                state, text = "waiting", "waiting for the node"
            elif self.ended:
                state, text = "ended", "the node has finished its source"
            elif age is not None and age > STALE_AFTER_S:
                state, text = "lost", f"no data from the node for {age:.0f} s: waiting for it to come back"
            else:
                state, text = "live", "live"
            return {"type": "status", "state": state, "text": text, "node_restarts": self.node_restarts,
                    "frames_received": self.frames_received}


class _Upstream(threading.Thread):
    """Owns the ZeroMQ subscriber (one thread, as ZeroMQ wants): reads the node, JPEG-encodes raw
    frames for the browser, and applies subscription changes the web side asks for."""

    def __init__(self, endpoint: str, states: dict[str, ViewState], on_change,
                 curve: tuple[str, str] | None = None, on_end=None) -> None:
        super().__init__(daemon=True, name="perception-view-upstream")
        from perception.stream.client import Subscriber

        # states: topic prefix ("segnet", or "segnet/front" per camera) -> what its pages show.
        self.sub = Subscriber(endpoint, topics=[f"{p}/{s}" for p in states for s in ("info", "stats")],
                              decode_jpeg=False, latest_only=True, curve=curve)
        self.states = states
        self.on_change = on_change
        self.on_end = on_end  # called with follow()'s reason when reading ends
        self.requests: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self.stop_event = threading.Event()

    def _apply_requests(self) -> None:
        while True:
            try:
                topic, on = self.requests.get_nowait()
            except queue.Empty:
                return
            (self.sub.subscribe if on else self.sub.unsubscribe)(topic)

    def run(self) -> None:
        from perception.stream.client import Follow

        following = Follow(self.sub, until_final=False, stopped=self.stop_event, idle=True, poll_s=0.1)
        try:
            for msg in following:
                self._apply_requests()
                if msg is not None:
                    self._show(msg)
                self.on_change()  # after a quiet poll too: lets pages see the connection go stale
        finally:
            self.sub.close()
            if self.on_end is not None:
                self.on_end(following.end)

    def _show(self, msg) -> None:
        """Hand a message to the state of its camera, raw frames JPEG-encoded for the browser."""
        from perception.inference.postprocess import uncertainty_to_bgr

        try:
            jpeg = None
            if msg.stream in VIEW_STREAMS:
                if msg.header["encoding"] == "jpeg":
                    jpeg = bytes(msg.data)  # its size was checked against the header (protocol)
                else:
                    img = msg.data
                    if msg.stream == "uncertainty":  # float per pixel -> heat map (brighter = less sure)
                        img = uncertainty_to_bgr(img)
                    jpeg = encode_jpeg(img, quality=85)
            state = self.states.get(msg.topic.rsplit("/", 1)[0])
            if state is not None:
                state.on_message(msg, jpeg)
        except Exception as e:  # noqa: BLE001  (one unusable message must not end the reader)
            self.sub.rejected["unusable"] += 1
            log.warning("skipping a %s message the page cannot show (%s)", msg.stream, type(e).__name__)


def _page() -> str:
    return resources.files("perception.stream.consumers").joinpath("view_page.html").read_text(encoding="utf-8")


def _inline_hash(page: str, tag: str) -> str:
    """The CSP source for the page's one inline ``<tag>`` element ('sha256-...'): the page runs its own
    script and no other, without 'unsafe-inline'."""
    import base64
    import hashlib
    import re

    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
    if len(bodies) != 1:
        raise ValueError(f"the view page must hold exactly one inline <{tag}>, found {len(bodies)}")
    return "sha256-" + base64.b64encode(hashlib.sha256(bodies[0].encode()).digest()).decode()


class ViewCounters:
    """What the view refused (connections, by reason) and rejected (node messages, by reason)."""

    def __init__(self) -> None:
        from collections import Counter

        self.refused: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # the upstream subscriber's, live
        self.upstream_end: str | None = None  # why the upstream stopped reading (follow()'s reason)

    def summary(self) -> str:
        from perception.stream.client import rejections_text

        parts = [rejections_text(self.rejected)]
        if self.refused:
            parts.append(f"{sum(self.refused.values())} connections refused ("
                         + ", ".join(f"{k}: {n}" for k, n in self.refused.most_common()) + ")")
        return "; ".join(p for p in parts if p)


def make_app(endpoint: str, *, namespace: str = "segnet", curve: tuple[str, str] | None = None,
             cameras: list[str] | None = None, allow_origins: list[str] | None = None,
             counters: ViewCounters | None = None, stop: threading.Event | None = None):
    """The aiohttp application (the upstream reader starts and stops with it). ``cameras``: the
    cameras of a node that runs several; the page offers a choice between them. ``allow_origins``:
    other origins (``http://host:port``) whose pages may open the WebSocket. ``counters`` hears of
    refused connections and rejected messages; ``stop`` is set when the node refuses the upstream's
    CURVE handshake (``counters.upstream_end`` says so)."""
    from aiohttp import web

    view = _View(endpoint, namespace=namespace, curve=curve, cameras=cameras, allow_origins=allow_origins,
                 counters=counters if counters is not None else ViewCounters(), stop=stop)
    @web.middleware
    async def check_host(request, handler):
        return await view.check_host(request, handler)

    app = web.Application(middlewares=[check_host])
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", view.index)
    app.router.add_get("/ws", view.websocket)
    app.on_startup.append(view.start_upstream)
    app.on_shutdown.append(view.close_pages)
    app.on_cleanup.append(view.stop_upstream)
    return app


async def _security_headers(request, response) -> None:
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Server"] = "perception-view"  # not aiohttp's name and version


class _View:
    """The web side of the view: the page, the WebSocket of each page, and which node streams the pages
    watch (the upstream subscribes to a stream only while some page shows it)."""

    def __init__(self, endpoint: str, *, namespace: str, curve: tuple[str, str] | None, cameras: list[str] | None,
                 allow_origins: list[str] | None, counters: ViewCounters, stop: threading.Event | None) -> None:
        self.endpoint, self.curve, self.counters, self.stop = endpoint, curve, counters, stop
        self.allowed_origins = set(allow_origins or ())
        # Hosts named by --allow-origin (``http://host:port`` -> ``host:port``) may be asked for too.
        self.allowed_hosts = {o.split("://", 1)[-1].rstrip("/").lower() for o in self.allowed_origins}
        ns = namespace.strip("/")
        self.names = list(cameras) if cameras else [""]
        self.prefix_of = {c: (f"{ns}/{c}" if c else ns).strip("/") for c in self.names}
        self.states = {self.prefix_of[c]: ViewState() for c in self.names}
        # Started with the app (an attribute, not app state: aiohttp's AppKey needs a module-level frame,
        # which a server run from a thread does not have).
        self.upstream: _Upstream | None = None
        self.on_demand = OnDemandTopics()  # node topic -> the pages showing it
        self.wakers: set[asyncio.Event] = set()  # one per page: every page wakes on every change
        self.pages: set = set()  # open WebSockets, closed with a close frame when the view stops
        self.page = _page()
        self.csp = ("default-src 'none'; img-src 'self' blob:; style-src 'unsafe-inline'; "
                    f"script-src '{_inline_hash(self.page, 'script')}'; connect-src 'self'; frame-ancestors 'none'; "
                    "base-uri 'none'; form-action 'none'")

    def notify(self) -> None:
        for event in self.wakers:
            event.set()

    async def index(self, request):
        from aiohttp import web

        return web.Response(text=self.page, content_type="text/html",
                            headers={"Cache-Control": "no-store", "Content-Security-Policy": self.csp})

    def host_allowed(self, request) -> bool:
        """DNS rebinding: a page of an attacker's name that now resolves to this machine sends ``Host`` and
        ``Origin`` of that name, so an Origin check against Host passes. Only a Host naming the address
        the request came in on, ``localhost`` or a loopback address (with the port), or a host of
        ``--allow-origin`` is served."""
        sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
        if not sockname:
            return False
        addr, port = sockname[0], sockname[1]
        names = {"localhost", "127.0.0.1", "[::1]", f"[{addr}]" if ":" in addr else addr}
        host = (request.headers.get("Host") or "").lower()
        return host in {f"{n}:{port}" for n in names} or host in self.allowed_hosts

    @staticmethod
    def _refuse(counters: "ViewCounters", kind: str, what: str):
        from aiohttp import web

        counters.refused[kind] += 1
        log.warning("refused a request %s", what)
        return web.Response(status=403, text=f"{kind} refused\n")

    async def check_host(self, request, handler):
        """aiohttp middleware: :meth:`host_allowed` for every request (the page and the WebSocket)."""
        if not self.host_allowed(request):
            return self._refuse(self.counters, "host", f"for host {request.headers.get('Host')!r} (not this "
                                "view's address; see --allow-origin)")
        return await handler(request)

    def origin_allowed(self, request) -> bool:
        """Browsers send Origin with every WebSocket handshake: only pages this view served (same
        origin), or origins named with --allow-origin, may read the streams. Clients that are not
        browsers send none and are let in (loopback by default)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        return origin in self.allowed_origins or origin == f"{request.scheme}://{request.host}"

    def watch(self, camera: str, stream: str, page: object, on: bool) -> None:
        """Count ``page`` as a viewer of ``camera``'s ``stream`` (or no longer); the upstream (un)subscribes
        where that changes whether anyone watches."""
        start, stop = (self.on_demand.watch if on else self.on_demand.unwatch)(f"{self.prefix_of[camera]}/{stream}", page)
        for topic in start:
            self.upstream.requests.put((topic, True))
        for topic in stop:
            self.upstream.requests.put((topic, False))

    async def websocket(self, request):
        from aiohttp import web

        if not self.origin_allowed(request):
            return self._refuse(self.counters, "origin", f"WebSocket from origin {request.headers.get('Origin')} "
                                "(not this view's; see --allow-origin)")
        ws = web.WebSocketResponse(heartbeat=10, max_msg_size=4096)
        await ws.prepare(request)
        self.pages.add(ws)
        try:
            await _PageSession(self, ws).run()
        finally:
            self.pages.discard(ws)
        return ws

    async def close_pages(self, app) -> None:
        """On shutdown: tell every open page that the view is going away (WebSocket close 1001) rather than
        dropping its connection, so pages say so and the view stops at once."""
        from aiohttp import WSCloseCode

        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"perception-view stopped")
                               for ws in list(self.pages)), return_exceptions=True)

    async def start_upstream(self, app) -> None:
        loop = asyncio.get_running_loop()
        self.upstream = _Upstream(self.endpoint, self.states, lambda: loop.call_soon_threadsafe(self.notify),
                                  self.curve, on_end=self._upstream_ended)
        self.counters.rejected = self.upstream.sub.rejected
        self.upstream.start()

    def _upstream_ended(self, reason: str | None) -> None:
        self.counters.upstream_end = reason
        if reason == "handshake" and self.stop is not None:
            self.stop.set()  # nothing will ever arrive: the view ends with the reason

    async def stop_upstream(self, app) -> None:
        self.upstream.stop_event.set()
        await asyncio.to_thread(self.upstream.join, 5)


class _PageSession:
    """One page's WebSocket: the camera and stream it shows, and what it has already been sent."""

    def __init__(self, view: _View, ws) -> None:
        self.view, self.ws = view, ws
        self.stream, self.camera = "overlay", view.names[0]
        self.changed = asyncio.Event()
        self.sent_seq = self.sent_info = self.sent_stats = self.sent_status = None

    async def run(self) -> None:
        view = self.view
        view.watch(self.camera, self.stream, self, True)
        view.wakers.add(self.changed)
        await self.ws.send_str(json_text({"type": "cameras", "cameras": [c for c in view.names if c]}))
        reader = asyncio.create_task(self.read_choices())
        try:
            while not self.ws.closed and not reader.done():
                await self.send_news()
                # Wait for news; a page that is still sending simply skips the frames in between.
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                self.changed.clear()
        except (ConnectionResetError, RuntimeError):
            pass  # the page went away mid-send
        finally:
            reader.cancel()
            view.wakers.discard(self.changed)
            view.watch(self.camera, self.stream, self, False)

    async def send_news(self) -> None:
        """What changed since the last send: info, stats, status, and the newest frame of the stream shown."""
        state = self.view.states[self.view.prefix_of[self.camera]]
        with state.lock:
            info, stats, frame = state.info, state.stats, state.frames.get(self.stream)
        status = state.status()
        if info is not None and info is not self.sent_info:
            await self.ws.send_str(json_text({"type": "info", "info": info}))
            self.sent_info = info
        if stats is not None and stats is not self.sent_stats:
            await self.ws.send_str(json_text({"type": "stats", "stats": stats}))
            self.sent_stats = stats
        if status != self.sent_status:
            await self.ws.send_str(json_text({**status, "stream": self.stream, "camera": self.camera}))
            self.sent_status = status
        if frame is not None and frame[0] != self.sent_seq:
            self.sent_seq = frame[0]
            await self.ws.send_bytes(frame[1])

    async def read_choices(self) -> None:
        """The page's choices of camera and stream (JSON text messages); anything else is ignored."""
        from aiohttp import WSMsgType

        async for m in self.ws:
            if m.type != WSMsgType.TEXT:
                continue
            try:
                choice = json.loads(m.data)
            except ValueError:
                continue
            if isinstance(choice, dict):
                self.choose(choice.get("stream", self.stream), choice.get("camera", self.camera))

    def choose(self, stream: object, camera: object) -> None:
        if not (isinstance(stream, str) and isinstance(camera, str)):
            return  # e.g. {"camera": []}: ignored, the page stays open
        if stream not in VIEW_STREAMS or camera not in self.view.prefix_of or (stream, camera) == (self.stream, self.camera):
            return
        self.view.watch(camera, stream, self, True)
        self.view.watch(self.camera, self.stream, self, False)
        if camera != self.camera:
            self.sent_info = self.sent_stats = None  # the other camera's info and stats, at once
        self.stream, self.camera = stream, camera
        self.sent_seq, self.sent_status = None, None  # the page hears of the switch first
        self.changed.set()


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_http(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.strip("[]") or "127.0.0.1", int(port)


REQUEST_TIMEOUT_S = 10.0  # a connection must complete its request (headers) within this
MAX_CONNECTIONS = 256  # open connections (pages, requests in progress); more are closed at once


@dataclass(kw_only=True)
class ViewOptions(ClientKeyOptions):
    """perception-view's options: its arguments come from these fields (core.options)."""

    endpoint: str = opt(flag="endpoint", help="the node's endpoint, e.g. tcp://127.0.0.1:5555")
    http: tuple[str, int] = opt(("127.0.0.1", 8080), parse=_parse_http, metavar="HOST:PORT",
                                help="where to serve the page (default 127.0.0.1:8080, loopback only; port 0: any free)")
    namespace: str = opt("segnet", help="topic prefix of the node")
    camera: list[str] | None = opt(None, repeat=True, metavar="NAME",
                                   help="a node running several cameras: offer this one on the page (repeatable)")
    allow_origin: list[str] | None = opt(None, repeat=True, metavar="ORIGIN",
                                         help="let pages of this origin (e.g. http://dashboard.local:3000) open the "
                                              "view's WebSocket (repeatable); by default only the view's own page may, "
                                              "so other sites open in the same browser cannot read the streams")
    max_connections: int = opt(MAX_CONNECTIONS, check=at_least(1), metavar="N",
                               help="open connections at most; more are closed at once")
    request_timeout: float = opt(REQUEST_TIMEOUT_S, check=positive, metavar="SECONDS",
                                 help="close a connection that has not sent a whole request in this time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-view", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, ViewOptions)
    return p




class _Refused:
    """A protocol for a connection over the cap: closed as soon as it is accepted (it costs one fd
    for a moment, never a handler or a buffer)."""

    def __init__(self, counters: ViewCounters) -> None:
        self.counters = counters

    def connection_made(self, transport) -> None:
        self.counters.refused["too many connections"] += 1
        transport.abort()

    def connection_lost(self, exc) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False


async def serve(endpoint: str, host: str, port: int, namespace: str, stop: threading.Event,
                ready=None, curve: tuple[str, str] | None = None, cameras: list[str] | None = None, *,
                allow_origins: list[str] | None = None, max_connections: int = MAX_CONNECTIONS,
                request_timeout_s: float = REQUEST_TIMEOUT_S, counters: ViewCounters | None = None) -> None:
    """Serve until ``stop`` is set; ``ready(url)`` is called once the socket listens.

    A connection that has not sent a whole request within ``request_timeout_s`` is closed (a slow or
    stalled client cannot hold a connection: aiohttp's keep-alive timer also runs from the moment a
    connection opens), and past ``max_connections`` new connections are closed at once, so clients
    cannot exhaust the process's file descriptors.
    """
    from aiohttp import web

    counters = counters if counters is not None else ViewCounters()
    app = make_app(endpoint, namespace=namespace, curve=curve, cameras=cameras, allow_origins=allow_origins,
                   counters=counters, stop=stop)
    runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=request_timeout_s)
    await runner.setup()
    server = None
    try:
        handlers = runner.server
        loop = asyncio.get_running_loop()
        # Handlers made but not yet registered: a burst of accepts makes several before the loop runs
        # their connection_made (queued with call_soon by each new transport), which registers them.
        pending = [0]

        def registered() -> None:
            pending[0] -= 1

        def factory():
            if len(handlers.connections) + pending[0] >= max_connections:
                return _Refused(counters)
            pending[0] += 1
            loop.call_soon(loop.call_soon, registered)  # after this transport's connection_made
            return handlers()

        server = await loop.create_server(factory, host, port, reuse_address=True)
        bound = server.sockets[0].getsockname()[1]  # the port 0 resolved to
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/"
        if ready is not None:
            ready(url)
        while not stop.is_set():
            await asyncio.sleep(0.1)
    finally:
        if server is not None:
            server.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_into(build_parser(), ViewOptions, argv)
    except ValueError as e:
        return fail("perception-view", str(e))
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return fail("perception-view", "needs aiohttp: pip install 'segnet-perception[viz]'")
    import zmq

    from perception.core.cli import stop_on_signals
    from perception.stream.security import CurveError, client_keys_from_args

    try:
        curve = client_keys_from_args(args)
    except CurveError as e:
        return fail("perception-view", str(e))
    host, port = args.http
    if not _is_loopback(host):
        print(f"perception-view: warning: serving on {host}, reachable beyond this machine: the page has no "
              "authentication, and a CURVE stream is re-served in clear to whoever opens it", file=sys.stderr)
    from perception.core.logs import configure_service_logging

    configure_service_logging()  # clients cannot flood stderr: repeated records are summarised
    stop = stop_on_signals()
    counters = ViewCounters()
    try:
        asyncio.run(serve(args.endpoint, host, port, args.namespace, stop,
                          ready=lambda url: print(f"perception-view: open {url}", file=sys.stderr, flush=True),
                          curve=curve, cameras=args.camera, allow_origins=args.allow_origin,
                          max_connections=args.max_connections, request_timeout_s=args.request_timeout,
                          counters=counters))
    except zmq.ZMQError as e:
        return fail("perception-view", f"cannot connect to {args.endpoint!r} ({e})")
    except OSError as e:
        return fail("perception-view", f"cannot serve on {host}:{port} ({e.strerror or e})")
    if counters.summary():
        print(f"perception-view: {counters.summary()}", file=sys.stderr)
    if counters.upstream_end == "handshake":  # a wrong --curve-server-key, or this client's key is not allowed
        from perception.stream.security import handshake_failed

        return fail("perception-view", handshake_failed(args.endpoint), status=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
