"""Messages and clients that must not stop a consumer (issue 27, B-D): malformed or misplaced payloads,
non-finite and out-of-range values, slow and cross-origin clients, and tools given nonsense."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from perception.stream.client import Subscriber
from perception.stream.protocol import ProtocolError, decode_message, encode_header

STAMP = 1_700_000_000_000_000_000


def _h(encoding: str, seq: int = 0, **extra) -> dict:
    return {"v": 1, "seq": seq, "stamp_ns": STAMP + seq, "frame_id": "camera", "encoding": encoding, **extra}


def _img(encoding: str, h: int, w: int, seq: int = 0, **extra) -> dict:
    step = 0 if encoding in ("jpeg", "png") else w * {"mono8": 1, "bgr8": 3, "32FC1": 4}[encoding]
    return _h(encoding, seq, height=h, width=w, step=step, **extra)


GOOD_MASK = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64) % 3
GOOD_BGR = np.full((48, 64, 3), 77, np.uint8)
JPEG_48x64 = cv2.imencode(".jpg", GOOD_BGR)[1].tobytes()

# (name, topic, header, payload, the reason a consumer counts)
HOSTILE = [
    ("deep_nesting", "segnet/stats", _h("msgpack"), b"\x81\xa1a" + b"\x91" * 400 + b"\xc0", "malformed msgpack"),
    ("msgpack_on_mask", "segnet/mask", _h("msgpack"), msgpack.packb({"a": 1}), "wrong stream"),
    ("empty_color_mask", "segnet/color_mask", _img("bgr8", 0, 0), b"", "bad image"),
    ("jpeg_on_mask", "segnet/mask", _img("jpeg", 48, 64), b"\xff\xd8" + b"\x00" * 100, "wrong stream"),
    ("image_on_stats", "segnet/stats", _img("bgr8", 48, 64), GOOD_BGR.tobytes(), "wrong stream"),
    ("foreign_jpeg_on_overlay", "segnet/overlay", _img("jpeg", 48, 64), b"\xff\xd8\xff\xe0" + b"\x13" * 200, "bad jpeg"),
    ("jpeg_of_another_size", "segnet/overlay", _img("jpeg", 480, 640), JPEG_48x64, "bad jpeg"),
    ("empty_overlay", "segnet/overlay", _img("bgr8", 0, 0), b"", "bad image"),
    ("mono8_overlay", "segnet/overlay", _img("mono8", 48, 64), GOOD_MASK.tobytes(), "wrong stream"),
    ("msgpack_overlay", "segnet/overlay", _h("msgpack"), msgpack.packb({"x": 1}), "wrong stream"),
    ("unknown_stream", "segnet/lidar", _h("msgpack"), msgpack.packb({"x": 1}), "wrong stream"),
]


@pytest.mark.parametrize("name,topic,header,payload,reason", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_each_hostile_message_is_a_protocol_error_with_its_reason(name, topic, header, payload, reason):
    with pytest.raises(ProtocolError) as info:
        decode_message([topic.encode(), encode_header(header), payload], decode_jpeg=False)
    assert info.value.reason == reason


def test_deep_nesting_within_the_limit_still_decodes():
    nested = {"a": [[{"b": [1, 2]}]]}
    msg = decode_message([b"segnet/stats", encode_header(_h("msgpack")), msgpack.packb(nested)])
    assert msg.data == nested


def test_json_text_is_strict_json_for_non_finite_stats():
    from perception.stream.protocol import json_text

    text = json_text({"fps": float("nan"), "latency_ms": {"p50": float("inf"), "ok": 1.5}, "list": [float("-inf"), 2]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "fps": None, "latency_ms": {"p50": None, "ok": 1.5}, "list": [None, 2]}


class _RawNode:
    """An XPUB on a free loopback port that sends whatever it is given (a hostile or a well-behaved
    node), once some subscriber has subscribed."""

    def __init__(self, port: int | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        if port is None:
            self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        else:  # a node restarted on the port of one before it
            self.sock.bind(f"tcp://127.0.0.1:{port}")
            self.port = port
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.subscriptions: set[bytes] = set()

    def wait_for(self, prefix: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(prefix.encode().startswith(s) for s in self.subscriptions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nobody subscribed to {prefix}")
            if self.sock.poll(100):
                m = self.sock.recv()
                if m[:1] == b"\x01":
                    self.subscriptions.add(m[1:])

    def send(self, topic: str, header: dict, payload: bytes) -> None:
        self.sock.send_multipart([topic.encode(), encode_header(header), payload])

    def send_hostile(self) -> None:
        for _, topic, header, payload, _ in HOSTILE:
            self.send(topic, header, payload)

    def close(self) -> None:
        self.sock.close(linger=1000)
        self.ctx.term()


def _good(node: _RawNode, seq: int, *, final: bool = False, nan: bool = False) -> None:
    node.send("segnet/info", _h("msgpack", seq), msgpack.packb({"classes": ["bg", "a", "b"], "model_id": "raw"}))
    node.send("segnet/mask", _img("mono8", 48, 64, seq), GOOD_MASK.tobytes())
    node.send("segnet/overlay", _img("bgr8", 48, 64, seq), GOOD_BGR.tobytes())
    node.send("segnet/color_mask", _img("jpeg", 48, 64, seq), JPEG_48x64)
    stats = {"fps": float("nan") if nan else 5.0, "frames_processed": seq + 1, "final": final}
    node.send("segnet/stats", _h("msgpack", seq), msgpack.packb(stats))


def _feed(node: _RawNode, prefix: str, frames: int = 3, after=None):
    """In a thread: wait for a subscriber, then hostile messages before each good frame, then final stats."""
    def run() -> None:
        node.wait_for(prefix)
        time.sleep(0.2)  # a subscriber's remaining subscriptions arrive (not a test synchronisation)
        for seq in range(frames):
            node.send_hostile()
            _good(node, seq, nan=seq == 1)
        if after is not None:
            after()
        node.send("segnet/stats", _h("msgpack", frames), msgpack.packb({"fps": 1.0, "final": True}))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_subscriber_skips_and_counts_each_rejection_by_reason():
    node = _RawNode()
    try:
        t = _feed(node, "segnet/")
        with Subscriber(node.endpoint, decode_jpeg=False) as sub:
            good = []
            while True:
                msg = sub.recv(timeout=20)
                assert msg is not None, "the good messages after the hostile ones must arrive"
                good.append(msg.stream)
                if msg.stream == "stats" and msg.data.get("final"):
                    break
            expected: dict[str, int] = {}
            for *_, reason in HOSTILE:
                expected[reason] = expected.get(reason, 0) + 3
            assert dict(sub.rejected) == expected
            assert sub.rejections().startswith(f"{3 * len(HOSTILE)} messages rejected (")
        t.join(10)
        assert good.count("mask") == 3
    finally:
        node.close()


def test_echo_reports_rejections_and_exits_0_on_the_final_stats(capsys):
    from perception.stream.consumers.echo import main as echo_main

    node = _RawNode()
    try:
        t = _feed(node, "segnet/")
        assert echo_main([node.endpoint, "--timeout", "30"]) == 0
        t.join(10)
        out, err = capsys.readouterr()
        assert out.count("segnet/mask") == 3
        assert '"fps":null' in out  # NaN printed as JSON null
        assert f"{3 * len(HOSTILE)} messages rejected (" in err
    finally:
        node.close()


@pytest.mark.parametrize("fmt", ["files", "mcap"])
def test_a_recording_survives_hostile_messages_and_counts_them(fmt, tmp_path, capsys):
    from perception.stream.consumers.record import main as record_main

    if fmt == "mcap":
        pytest.importorskip("mcap")
    node = _RawNode()
    try:
        def far_stamp() -> None:  # a stamp at the end of int64: no ROS 2 form, skipped, not a 292-year bag
            node.send("segnet/stats", {**_h("msgpack", 99), "stamp_ns": 2**63 - 1}, msgpack.packb({"fps": 1.0}))
            node.send("segnet/info", {**_h("msgpack", 99), "stamp_ns": 2**63 - 1}, msgpack.packb({"classes": []}))

        t = _feed(node, "segnet/stats", after=far_stamp if fmt == "mcap" else None)
        out = tmp_path / "rec"
        streams = "mask,overlay,stats,info" + (",color_mask" if fmt == "mcap" else "")
        assert record_main([node.endpoint, "--out", str(out), "--format", fmt, "--streams", streams,
                            "--timeout", "30"]) == 0
        t.join(10)
        err = capsys.readouterr().err
        assert "recorded 3 frames" in err and "messages rejected (" in err, err
    finally:
        node.close()
    strict = {"parse_constant": lambda c: pytest.fail(f"non-JSON constant {c}")}
    if fmt == "files":
        assert len(list((out / "mask").glob("*.png"))) == 3
        rows = [json.loads(line, **strict) for line in (out / "stats.jsonl").read_text().splitlines()]
        assert rows[1]["fps"] is None  # the NaN
        cap = cv2.VideoCapture(str(out / "overlay.mp4"))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
        return
    import yaml
    from mcap_ros2.reader import read_ros2_messages

    meta = yaml.safe_load((out / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["duration"]["nanoseconds"] < 10**9 * 60, "one far stamp must not stretch the bag"
    strings = [json.loads(m.ros_msg.data, **strict) for m in read_ros2_messages(str(next(out.glob("*.mcap"))))
               if m.channel.topic == "/segnet/stats"]
    assert any(s.get("fps", 0) is None for s in strings)
    assert "skipped (no ROS 2 form)" in err


def test_foxglove_bridge_keeps_forwarding_after_hostile_messages():
    pytest.importorskip("foxglove")
    from perception.stream.consumers.foxglove_bridge import FoxgloveBridge

    node = _RawNode()
    bridge = FoxgloveBridge(node.endpoint, port=0)
    stop = threading.Event()
    bt = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    try:
        for stream in ("mask", "color_mask", "overlay", "stats", "info"):  # as a Foxglove client watching all
            bridge._changes.put((f"segnet/{stream}", 1, True))
        bt.start()
        t = _feed(node, "segnet/mask")
        t.join(30)
        deadline = time.monotonic() + 20
        while bridge.forwarded.get("stats", 0) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling what the bridge forwarded
        assert bt.is_alive(), "the bridge's loop must survive"
        assert bridge.forwarded.get("mask") == 3 and bridge.forwarded.get("color_mask") == 3
        assert bridge.forwarded.get("stats", 0) == 4  # the NaN stats went too, as JSON null
        assert sum(bridge.sub.rejected.values()) == 3 * (len(HOSTILE) - 1)  # all but segnet/lidar (not subscribed)
    finally:
        stop.set()
        bt.join(10)
        bridge.close()
        node.close()


def _view(endpoint: str, **kwargs):
    from perception.stream.consumers.view import ViewCounters, serve

    stop, got_url, ready = threading.Event(), threading.Event(), {}
    counters = ViewCounters()

    def run() -> None:
        asyncio.run(serve(endpoint, "127.0.0.1", 0, "segnet", stop, counters=counters,
                          ready=lambda url: (ready.setdefault("url", url), got_url.set()), **kwargs))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert got_url.wait(20)
    return ready["url"], stop, t, counters


def test_view_survives_hostile_messages_and_pages_that_send_nonsense():
    pytest.importorskip("aiohttp")
    websockets = pytest.importorskip("websockets")
    node = _RawNode()
    url, stop, vt, counters = _view(node.endpoint)
    ws_url = url.replace("http://", "ws://") + "ws"
    # What the view subscribes to (overlay for the page, stats, info). The reader keeps the newest
    # message per topic, so each is sent alone and seen rejected before the next.
    hostile = [c for c in HOSTILE if c[1] in ("segnet/overlay", "segnet/stats")]

    def feed() -> None:
        node.wait_for("segnet/overlay")
        for i, (name, topic, header, payload, _) in enumerate(hostile, start=1):
            node.send(topic, header, payload)
            deadline = time.monotonic() + 10
            while sum(counters.rejected.values()) < i:  # polling: the reader decoded and refused it
                assert time.monotonic() < deadline, f"the view's reader did not get past {name}"
                time.sleep(0.01)
        _good(node, 0, nan=True, final=True)  # the last stats, NaN fps: the page must still parse it

    async def page() -> tuple[int, list]:
        frames, stats = 0, []
        async with websockets.connect(ws_url, origin=url.rstrip("/")) as ws:
            await ws.send(json.dumps({"camera": []}))  # once closed the page with a TypeError
            await ws.send("[1, 2]")
            await ws.send(json.dumps({"stream": {"a": 1}}))
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (frames and any(s.get("final") for s in stats)):
                data = await asyncio.wait_for(ws.recv(), 20)
                if isinstance(data, bytes):
                    frames += 1
                else:
                    m = json.loads(data, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
                    if m["type"] == "stats":
                        stats.append(m["stats"])
            await asyncio.to_thread(feeder.join, 10)
        return frames, stats

    try:
        frames, stats = asyncio.run(page())
        assert frames >= 1, "overlays after the hostile messages reach the page"
        assert stats and stats[-1].get("final") is True
        assert sum(counters.rejected.values()) == len(hostile)
        assert any(s.get("fps", 0) is None for s in stats)  # the NaN, as null: the panel still renders
    finally:
        stop.set()
        vt.join(10)
        node.close()


def test_view_refuses_foreign_origins_and_sends_strict_headers():
    pytest.importorskip("aiohttp")
    websockets = pytest.importorskip("websockets")
    import urllib.request

    node = _RawNode()
    url, stop, vt, counters = _view(node.endpoint, allow_origins=["http://dashboard.test:3000"])
    ws_url = url.replace("http://", "ws://") + "ws"

    async def connect(origin: str | None) -> bool:
        try:
            async with websockets.connect(ws_url, origin=origin) as ws:
                await asyncio.wait_for(ws.recv(), 10)  # the cameras message
                return True
        except websockets.exceptions.InvalidStatus as e:
            assert e.response.status_code == 403
            return False

    try:
        assert asyncio.run(connect("http://evil.test:8000")) is False
        assert asyncio.run(connect("http://127.0.0.1:1")) is False  # loopback, but another origin
        assert asyncio.run(connect(url.rstrip("/"))) is True  # the view's own page
        assert asyncio.run(connect("http://dashboard.test:3000")) is True  # --allow-origin
        assert asyncio.run(connect(None)) is True  # not a browser
        assert counters.refused["origin"] == 2
        with urllib.request.urlopen(url, timeout=10) as r:
            headers = r.headers
        csp = headers["Content-Security-Policy"]
        assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "aiohttp" not in headers.get("Server", "").lower() and "python" not in headers.get("Server", "").lower()
    finally:
        stop.set()
        vt.join(10)
        node.close()


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""  # closed (a timed-out request)
    except ConnectionResetError:
        return True  # reset (refused over the cap)


def test_view_times_out_partial_requests_and_caps_connections():
    pytest.importorskip("aiohttp")
    import urllib.request

    node = _RawNode()
    url, stop, vt, counters = _view(node.endpoint, max_connections=4, request_timeout_s=1.0)
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(6):  # slowloris: half a request each, never finished
            s = socket.create_connection(("127.0.0.1", port), timeout=15)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            held.append(s)
        t0 = time.monotonic()
        closed = [_closed_by_peer(s) for s in held]  # blocks until the server closes each one
        assert all(closed) and time.monotonic() - t0 < 12, "every partial request is closed within the timeout"
        assert counters.refused["too many connections"] >= 2  # the two over the cap went at once
        with urllib.request.urlopen(url, timeout=10) as r:  # the view still serves a normal request
            assert r.status == 200
    finally:
        for s in held:
            s.close()
        stop.set()
        vt.join(10)
        node.close()


def test_foxglove_bridge_times_out_half_open_handshakes_and_caps_connections():
    """Issue 45, item 11: 20,000 half-open handshakes took all the bridge's file descriptors and new clients
    were refused for 15 s and more (the SDK has no cap and no handshake time limit). Now a gate in front of
    the SDK closes connections over the cap at once and half-open ones after --request-timeout, and a real
    Foxglove client gets in afterwards."""
    pytest.importorskip("foxglove")
    websockets = pytest.importorskip("websockets")
    from perception.stream.consumers.foxglove_bridge import FoxgloveBridge

    node = _RawNode()
    bridge = FoxgloveBridge(node.endpoint, port=0, max_connections=4, request_timeout_s=1.0)
    held = []
    try:
        for _ in range(6):  # slowloris: half an upgrade request each, never finished
            s = socket.create_connection(("127.0.0.1", bridge.port), timeout=15)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nX-Slow: ")
            held.append(s)
        assert all(_closed_by_peer(s) for s in held)  # blocks until the gate closes each one
        refused = bridge.gate.counters.refused
        assert refused["too many connections"] >= 2 and refused["request timeout"] >= 1, refused
        big = socket.create_connection(("127.0.0.1", bridge.port), timeout=15)
        big.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000)  # a head over the limit goes too
        assert _closed_by_peer(big)
        big.close()

        async def client() -> str:
            async with websockets.connect(f"ws://127.0.0.1:{bridge.port}", subprotocols=["foxglove.sdk.v1"],
                                          open_timeout=10) as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 10))["op"]

        assert asyncio.run(client()) == "serverInfo"  # relayed to the SDK's server, both ways
        assert bridge.gate.counters.relayed == 1
    finally:
        for s in held:
            s.close()
        bridge.close()
        node.close()


def test_a_consumer_ends_when_the_node_is_killed_and_follows_a_restart(capsys):
    """Issue 45, item 2: with no --timeout, perception-echo waited for ever when its node died without the
    final stats (SIGKILL, a lost machine). Now a node disconnected --gone-after seconds is gone (status 1, one
    line); a node restarted on the same port sooner is followed on, and its final stats end the run (0)."""
    from perception.stream.consumers.echo import main as echo_main

    def run_echo(gone_after: str, script) -> tuple[int, str]:
        node = _RawNode()
        rc: dict = {}
        argv = [node.endpoint, "segnet/stats", "--gone-after", gone_after]
        t = threading.Thread(target=lambda: rc.setdefault("rc", echo_main(argv)), daemon=True)
        t.start()
        node.wait_for("segnet/stats")
        node.send("segnet/stats", _h("msgpack", 0), msgpack.packb({"fps": 5.0, "final": False}))
        script(node)
        t.join(60)
        assert not t.is_alive(), "the consumer still waits for a node that is gone"
        return rc["rc"], capsys.readouterr().err

    rc, err = run_echo("0.5", lambda node: node.close())  # killed: no final stats, ever
    assert rc == 1 and "went away without its final stats" in err, err

    def restart(node: _RawNode) -> None:
        port = node.port
        node.close()
        again = _RawNode(port=port)  # the same port, well within --gone-after
        again.wait_for("segnet/stats")
        again.send("segnet/stats", _h("msgpack", 0), msgpack.packb({"fps": 5.0, "final": True}))
        again.close()

    rc, err = run_echo("30", restart)
    assert rc == 0 and "went away" not in err, err


def test_repeated_log_records_are_summarised():
    import logging

    from perception.core.logs import RepeatSummary

    now = [0.0]
    f = RepeatSummary(burst=3, period_s=60, clock=lambda: now[0])
    rec = lambda: logging.LogRecord("foxglove", logging.WARNING, __file__, 1, "bogus subscription id %s", (7,), None)  # noqa: E731
    passed = sum(f.filter(rec()) for _ in range(4000))
    assert passed == 3
    now[0] = 61.0
    r = rec()
    assert f.filter(r) and "3997 more like this" in r.getMessage()


def test_a_flood_from_many_clients_is_summarised_as_one_kind():
    """Issue 45, item 11: the Foxglove SDK's "handshake failed" record names each client's address, and the
    summariser keyed on the whole text: 20,000 half-open handshakes logged 19,979 lines."""
    import logging

    from perception.core.logs import RepeatSummary

    f = RepeatSummary(burst=3, period_s=60, clock=lambda: 0.0)
    records = [logging.LogRecord("foxglove::websocket", logging.WARNING, __file__, 1,
                                 f"handshake failed for 127.0.0.{k % 250}:{40000 + k}: connection reset", None, None)
               for k in range(20000)]
    records += [logging.LogRecord("foxglove::websocket", logging.WARNING, __file__, 1,
                                  f"handshake failed for [::1]:{40000 + k}: timed out", None, None) for k in range(50)]
    assert sum(f.filter(r) for r in records) == 6  # two kinds (reset, timed out), three of each


@pytest.mark.slow
def test_foxglove_bridge_memory_stays_bounded_with_clients_that_never_read(tmp_path):
    """Clients that subscribe to masks and never read: the bridge queues a bounded backlog for each
    (the SDK's default, 1024 messages per client, grew a bridge by hundreds of MB)."""
    pytest.importorskip("foxglove")
    websockets = pytest.importorskip("websockets")
    node = _RawNode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ws_port = s.getsockname()[1]
    bridge = subprocess.Popen([sys.executable, "-m", "perception.stream.consumers.foxglove_bridge", node.endpoint,
                               "--port", str(ws_port), "--image-format", "raw"],
                              stderr=subprocess.PIPE, text=True)

    def rss_mb() -> float:
        with open(f"/proc/{bridge.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    async def lazy_client(channels_ready: asyncio.Event, conns: list) -> None:
        ws = await websockets.connect(f"ws://127.0.0.1:{ws_port}", subprotocols=["foxglove.sdk.v1"],
                                      max_size=1 << 24, max_queue=1)
        conns.append(ws)
        while True:
            m = json.loads(await ws.recv())
            if m["op"] == "advertise":
                ids = [c["id"] for c in m["channels"] if c["topic"] in ("/segnet/mask", "/segnet/overlay")]
                await ws.send(json.dumps({"op": "subscribe", "subscriptions": [
                    {"id": i, "channelId": c} for i, c in enumerate(ids)]}))
                channels_ready.set()
                return  # and never read again

    big = np.random.default_rng(0).integers(0, 255, (360, 480, 3), dtype=np.uint8)

    async def run() -> tuple[float, float]:
        deadline = time.monotonic() + 30
        while True:  # the bridge listens
            try:
                with socket.create_connection(("127.0.0.1", ws_port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline and bridge.poll() is None, bridge.stderr.read()
                await asyncio.sleep(0.1)
        conns: list = []
        readies = [asyncio.Event() for _ in range(8)]
        await asyncio.gather(*(lazy_client(r, conns) for r in readies))
        await asyncio.to_thread(node.wait_for, "segnet/overlay")
        before = rss_mb()
        for seq in range(600):  # 600 raw 480x360 overlays (518 KB each) + masks, to 8 clients
            node.send("segnet/overlay", _img("bgr8", 360, 480, seq), big.tobytes())
            node.send("segnet/mask", _img("mono8", 360, 480, seq), big[:, :, 0].tobytes())
            if seq % 20 == 0:
                await asyncio.sleep(0.05)
        await asyncio.sleep(2)
        after = rss_mb()
        for ws in conns:
            ws.transport.abort()
        return before, after

    try:
        before, after = asyncio.run(run())
        print(f"bridge RSS {before:.0f} -> {after:.0f} MB")
    finally:
        bridge.terminate()
        bridge.wait(10)
        node.close()
    # Unbounded: 8 clients x ~1000 queued messages x ~0.35 MB. Bounded (16 per client): a few tens of MB
    # over the socket buffers.
    assert after - before < 250, f"bridge RSS grew {after - before:.0f} MB ({before:.0f} -> {after:.0f})"


def test_recover_refuses_a_file_that_is_not_mcap_and_changes_nothing(tmp_path, capsys):
    pytest.importorskip("mcap")
    from perception.stream.consumers.record import main as record_main

    bag = tmp_path / "bag"
    bag.mkdir()
    junk = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (bag / "x.mcap").write_bytes(junk)
    assert record_main(["--recover", str(bag)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an MCAP file" in err[0], err
    assert (bag / "x.mcap").read_bytes() == junk and sorted(p.name for p in bag.iterdir()) == ["x.mcap"]


def test_recover_keeps_the_original_of_a_truncated_bag(tmp_path, capsys):
    pytest.importorskip("mcap")
    from perception.stream.protocol import Message
    from perception.stream.consumers.record import main as record_main
    from perception.stream.consumers.rosbag import BagWriter

    bag = tmp_path / "bag"
    with BagWriter(bag, chunk_size=1024) as w:
        for seq in range(20):
            w.write(Message("segnet/mask", "mask", _img("mono8", 48, 64, seq), GOOD_MASK))
    path = next(bag.glob("*.mcap"))
    whole = path.read_bytes()
    cut = whole[: len(whole) * 2 // 3]  # a recorder killed mid-file: no footer
    path.write_bytes(cut)
    assert record_main(["--recover", str(bag)]) == 0
    assert (bag / (path.name + ".orig")).read_bytes() == cut, "the original is kept, unchanged"
    assert path.read_bytes()[:8] == b"\x89MCAP0\r\n" and path.read_bytes() != cut
    capsys.readouterr()
    # A second recovery of the (now complete) bag rewrites nothing and keeps the .orig.
    assert record_main(["--recover", str(bag)]) == 0
    assert (bag / (path.name + ".orig")).read_bytes() == cut


@pytest.mark.parametrize("argv,text", [
    (["--out", "{file}"], "is a file, not a folder"),
    (["--out", "{file}/sub"], "cannot be created"),
    (["--out", "{dir}/rec", "--count", "-1"], "--count must be > 0"),
    (["--out", "{dir}/rec", "--duration", "-5"], "--duration must be > 0"),
    (["--out", "{dir}/rec", "--timeout", "0"], "--timeout must be > 0"),
], ids=["out_is_a_file", "out_under_a_file", "negative_count", "negative_duration", "zero_timeout"])
def test_record_refuses_nonsense_in_one_line(argv, text, tmp_path, capsys):
    from perception.stream.consumers.record import main as record_main

    f = tmp_path / "afile"
    f.write_text("mine")
    argv = [a.format(file=f, dir=tmp_path) for a in argv]
    assert record_main(["tcp://127.0.0.1:5555", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("perception-record: error:") and text in err[0], err
    assert f.read_text() == "mine" and not (tmp_path / "rec").exists()


@pytest.mark.parametrize("argv,text", [(["--count", "-1"], "--count must be >= 1"),
                                       (["--count", "0"], "--count must be >= 1"),
                                       (["--timeout", "-3"], "--timeout must be > 0")])
def test_echo_refuses_nonsense_in_one_line(argv, text, capsys):
    from perception.stream.consumers.echo import main as echo_main

    assert echo_main(["tcp://127.0.0.1:5555", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


def test_on_demand_topics_hold_an_upstream_topic_while_any_viewer_watches_a_key_it_feeds():
    from perception.stream.ondemand import OnDemandTopics

    topics = OnDemandTopics(lambda key: key.replace("label_info", "info"))
    assert topics.watch("s/info", "a") == ({"s/info"}, set())
    assert topics.watch("s/label_info", "a") == (set(), set())  # fed by the same topic
    assert topics.watch("s/info", "b") == (set(), set())
    assert topics.unwatch("s/info", "a") == (set(), set())
    assert topics.unwatch("s/info", "b") == (set(), set())  # a still watches label_info
    assert topics.unwatch("s/label_info", "a") == (set(), {"s/info"})
    assert topics.unwatch("s/label_info", "a") == (set(), set()) and topics.wanted() == set()


def test_view_refuses_a_rebound_host_name():
    """DNS rebinding (issue 45, item 5): after an attacker's name resolves to this machine, its page sends
    Host and Origin of that name, which an Origin-against-Host check let through to the frames. Only Hosts
    naming the view's own address, localhost or an --allow-origin host are served now, on / and on /ws."""
    pytest.importorskip("aiohttp")
    import http.client
    from urllib.parse import urlsplit

    node = _RawNode()
    url, stop, vt, counters = _view(node.endpoint, allow_origins=["http://dashboard.test:3000"])
    port = urlsplit(url).port

    def status(path: str, host: str, *, websocket: bool = False) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        if websocket:
            for k, v in (("Origin", f"http://{host}"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                         ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")):
                conn.putheader(k, v)
        conn.endheaders()
        try:
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        for host in (f"rebind.example:{port}", f"127.0.0.2:{port}", "127.0.0.1:1"):
            assert status("/", host) == 403, host
            assert status("/ws", host, websocket=True) == 403, host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
            assert status("/", host) == 200, host
            assert status("/ws", host, websocket=True) == 101, host
        assert status("/", "dashboard.test:3000") == 200  # --allow-origin names it
        assert counters.refused["host"] == 6
    finally:
        stop.set()
        vt.join(10)
        node.close()


def _write_mask_bag(folder, n: int):
    """A bag of ``n`` small masks in 2 KiB chunks (several chunks); returns its .mcap file."""
    from perception.stream.consumers.rosbag import BagWriter
    from perception.stream.protocol import Message

    with BagWriter(folder, chunk_size=2048) as w:
        for seq in range(n):
            w.write(Message("segnet/mask", "mask", _img("mono8", 48, 64, seq), GOOD_MASK))
    return next(folder.glob("*.mcap"))


def _bag_message_count(folder) -> int:
    """Messages of a bag, read by an independent reader (rosbags)."""
    from rosbags.rosbag2 import Reader

    with Reader(folder) as reader:
        return sum(1 for _ in reader.messages())


def test_recover_brings_back_every_complete_chunk_before_any_cut(tmp_path, capsys):
    """Issue 45, item 3: a bag cut at an arbitrary point (a power loss, a full disk) crashed --recover with a
    struct.error in 27.5% of cuts inside the data and 46% inside the summary; a file missing only its closing
    magic was called complete and still did not open. At every cut point now: exit 0, and the recovered bag,
    read by rosbags, holds at least every message of the chunks that ended before the cut."""
    pytest.importorskip("mcap")
    pytest.importorskip("rosbags")
    import shutil

    from mcap.reader import make_reader

    from perception.stream.consumers.record import main as record_main

    path = _write_mask_bag(tmp_path / "src", 30)
    whole = path.read_bytes()
    with open(path, "rb") as f:
        reader = make_reader(f)
        times = [m.log_time for _, _, m in reader.iter_messages()]
        chunks = [(c.chunk_start_offset + c.chunk_length, c.message_start_time, c.message_end_time)
                  for c in reader.get_summary().chunk_indexes]
    assert len(times) == 30 and len(chunks) > 5
    cuts = sorted({*range(8, len(whole), max(1, len(whole) // 97)), len(whole) - 1, len(whole) - 8})
    last = -1
    for cut in cuts:
        bag = tmp_path / f"cut{cut}"
        bag.mkdir()
        (bag / path.name).write_bytes(whole[:cut])
        rc = record_main(["--recover", str(bag)])
        assert rc == 0, (cut, capsys.readouterr().err)
        got = _bag_message_count(bag)
        expected = sum(1 for t in times for end, lo, hi in chunks if end <= cut and lo <= t <= hi)
        assert got >= expected and got >= last, (cut, got, expected, last)
        last = got
        shutil.rmtree(bag)
    assert last == 30  # the file missing only its closing magic: every message back
    capsys.readouterr()


def test_an_empty_file_of_a_split_bag_does_not_block_the_others(tmp_path, capsys):
    """Issue 45, item 3: a zero-byte .mcap (a recorder killed right after a split) made --recover refuse the
    whole bag. It is set aside (kept as .orig) and the other files are recovered."""
    pytest.importorskip("mcap")
    pytest.importorskip("rosbags")
    from perception.stream.consumers.record import main as record_main

    bag = tmp_path / "bag"
    first = _write_mask_bag(bag, 5)
    data = first.read_bytes()
    first.write_bytes(data[: len(data) - 100])  # the first file cut short, as by a kill
    (bag / "bag_1.mcap").write_bytes(b"")  # the next file, made and never written
    assert record_main(["--recover", str(bag)]) == 0, capsys.readouterr().err
    assert not (bag / "bag_1.mcap").exists() and (bag / "bag_1.mcap.orig").exists()
    assert _bag_message_count(bag) == 5


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 1 MiB filesystem (tmpfs), which fills up; skipped where this process may not mount one."""
    import os

    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if r.returncode != 0 or not os.path.ismount(mount_point):
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()[:100]}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("fmt", ["files", "mcap"])
def test_a_full_disk_ends_a_recording_in_one_line_with_what_was_written(fmt, tiny_filesystem, tmp_path, capsys):
    """Issue 45, item 4: into a full filesystem, --format files said "recorded 200 frames", exit 0, with 185
    of the 200 PNGs empty (cv2.imwrite's False unchecked); mcap ended in two chained ENOSPC tracebacks and a
    bag that did not open. Now: one error line, exit 1, every mask written is whole, and the bag, finished in
    the space its reserve held, opens as it is (no --recover) with every frame the recorder counted."""
    if fmt == "mcap":
        pytest.importorskip("mcap")
        pytest.importorskip("rosbags")
    from perception.stream.consumers.record import main as record_main

    node = _RawNode()
    out = tiny_filesystem / "rec"
    rec: dict = {}
    argv = [node.endpoint, "--out", str(out), "--format", fmt, "--streams", "mask", "--timeout", "20",
            "--chunk-size", "65536"]
    t = threading.Thread(target=lambda: rec.setdefault("rc", record_main(argv)), daemon=True)
    t.start()
    rng = np.random.default_rng(0)
    try:
        node.wait_for("segnet/mask")
        for seq in range(40):  # random 360x480 masks: ~170 KB each as PNG, so 1 MiB fills after a few
            node.send("segnet/mask", _img("mono8", 360, 480, seq), rng.integers(0, 256, (360, 480), np.uint8).tobytes())
        t.join(60)
    finally:
        node.close()
    assert not t.is_alive() and rec.get("rc") == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "warning: frames are being missed" not in line]
    assert err and "Traceback" not in "\n".join(err) and err[0].startswith("perception-record: error: stopped after"), err
    written = int(err[0].split("stopped after ")[1].split()[0])
    assert err[-1].startswith(f"recorded {written} frames to"), err  # the summary, as after any stop
    if fmt == "files":
        assert len(err) == 2, err
        pngs = sorted((out / "mask").glob("*.png"))
        assert len(pngs) == written and 0 < written < 40
        assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == (360, 480) for p in pngs)  # none empty
    else:
        assert len(err) == 2 and "the bag is closed" in err[0], err
        assert 0 < written < 40 and _bag_message_count(out) == written  # rosbags opens it, no --recover
        assert sorted(p.name for p in out.iterdir()) == ["metadata.yaml", "rec_0.mcap"]  # no reserve left


def test_a_bags_space_reserve_grows_with_its_largest_message_and_leaves_with_it(tmp_path):
    """The reserve that lets a full disk finish a bag holds the chunk in flight: it grows when a larger
    message arrives, is gone once the bag is closed, and a killed recorder's reserve goes with --recover."""
    pytest.importorskip("mcap")
    pytest.importorskip("rosbags")
    from perception.stream.consumers.rosbag import RESERVE_NAME, BagWriter, recover_bag
    from perception.stream.protocol import Message

    big = np.zeros((720, 1280), np.uint8)
    w = BagWriter(tmp_path / "bag", chunk_size=65536)
    reserve = tmp_path / "bag" / RESERVE_NAME
    w.write(Message("segnet/mask", "mask", _img("mono8", 48, 64, 0), GOOD_MASK))
    small = reserve.stat().st_size
    assert small >= 2 * 65536 and reserve.stat().st_blocks * 512 >= small  # allocated, not sparse
    w.write(Message("segnet/mask", "mask", _img("mono8", 720, 1280, 1), big))
    assert reserve.stat().st_size >= 2 * (65536 + big.size) > small
    w.close()
    assert not reserve.exists() and _bag_message_count(tmp_path / "bag") == 2

    killed = BagWriter(tmp_path / "killed", chunk_size=2048)  # never closed: as after SIGKILL
    for seq in range(5):
        killed.write(Message("segnet/mask", "mask", _img("mono8", 48, 64, seq), GOOD_MASK))
    assert (tmp_path / "killed" / RESERVE_NAME).exists()
    recover_bag(tmp_path / "killed")
    assert not (tmp_path / "killed" / RESERVE_NAME).exists() and _bag_message_count(tmp_path / "killed") >= 4


def test_a_recording_into_a_disk_with_no_room_is_refused_in_one_line(tiny_filesystem, capsys):
    pytest.importorskip("mcap")
    pytest.importorskip("rosbags")
    from perception.stream.consumers.record import main as record_main

    (tiny_filesystem / "filler").write_bytes(b"\0" * (900 << 10))
    out = tiny_filesystem / "rec"
    rc = record_main(["tcp://127.0.0.1:9", "--out", str(out), "--format", "mcap", "--timeout", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "has no room for a bag" in err[0], err
    assert not out.exists()  # nothing half-written


def test_stopping_the_view_closes_open_pages_with_a_close_frame():
    """Issue 45, item 12: the view took ~12 s to stop while a page was open and dropped it without a
    WebSocket close frame (the page saw an abnormal closure, 1006). Pages now get 1001 (going away)."""
    pytest.importorskip("aiohttp")
    websockets = pytest.importorskip("websockets")
    node = _RawNode()
    url, stop, vt, counters = _view(node.endpoint)
    ws_url = url.replace("http://", "ws://") + "ws"

    async def page() -> int:
        async with websockets.connect(ws_url, origin=url.rstrip("/")) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # the cameras message: the page is open
            stop.set()  # the view is told to stop while this page is open
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except websockets.exceptions.ConnectionClosed as e:
                return e.rcvd.code if e.rcvd is not None else 1006

    try:
        code = asyncio.run(page())
        vt.join(30)
        assert code == 1001, code
        assert not vt.is_alive()
    finally:
        stop.set()
        node.close()
