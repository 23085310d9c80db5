"""The consumers robotics teams use, against a live node: ROS 2 bags (read back with rosbags and
mcap-ros2-support, readers this project did not write), the Foxglove bridge (through a plain
WebSocket client speaking Foxglove's protocol) and the browser view (in headless Chromium)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import free_endpoint, make_video, start_node
from perception.stream.client import Subscriber

rosbags = pytest.importorskip("rosbags", reason="the [viz] extra is not installed")


def _stamp(header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def _read_bag(folder: Path) -> dict[str, list]:
    """topic -> [(log time, message)], through rosbags' reader and its own ROS 2 type store."""
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    out: dict[str, list] = {}
    with Reader(folder) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        for conn, t, raw in reader.messages():
            if conn.msgtype not in store.types:  # vision_msgs/LabelInfo: read in tests/test_label_info.py
                continue
            out.setdefault(conn.topic, []).append((t, store.deserialize_cdr(raw, conn.msgtype)))
    out["__types__"] = types  # type: ignore[assignment]
    return out


def _image(msg) -> np.ndarray:
    """A sensor_msgs/Image's pixels, honouring step (rows may be padded)."""
    channels = {"mono8": 1, "bgr8": 3, "32FC1": 4}[msg.encoding]
    rows = np.asarray(msg.data, np.uint8).reshape(msg.height, msg.step)[:, : msg.width * channels]
    if msg.encoding == "32FC1":
        return rows.copy().view("<f4").reshape(msg.height, msg.width)
    return rows.reshape(msg.height, msg.width, channels) if channels == 3 else rows


@pytest.mark.parametrize("image_encoding", ["bgr8", "jpeg"])
def test_mcap_bag_holds_every_published_mask(toy_model, tmp_path, image_encoding):
    from perception.stream.consumers.record import main as record_main

    _, model_dir = toy_model
    video = make_video(tmp_path / "v.avi", n=10)
    node, pub, t, result = start_node(str(video), model_dir, n_subs=2, image_encoding=image_encoding)
    bag = tmp_path / "bag"
    rec: dict = {}
    rt = threading.Thread(target=lambda: rec.setdefault("rc", record_main(
        [pub.endpoint, "--out", str(bag), "--format", "mcap", "--streams", "mask,color_mask,overlay,stats,info",
         "--timeout", "30"])))
    published: dict[int, tuple[dict, np.ndarray]] = {}
    with Subscriber(pub.endpoint, topics=["segnet/mask"]) as sub:
        rt.start()
        t.start()
        t.join(timeout=60)
        while (msg := sub.recv(timeout=1.0)) is not None:
            published[msg.header["stamp_ns"]] = (msg.header, msg.data.copy())
    rt.join(timeout=30)
    pub.close()
    assert result.get("rc") == 0 and rec.get("rc") == 0
    assert len(published) == 10

    got = _read_bag(bag)
    types = got.pop("__types__")
    image_type = "sensor_msgs/msg/CompressedImage" if image_encoding == "jpeg" else "sensor_msgs/msg/Image"
    assert types == {"/segnet/mask": "sensor_msgs/msg/Image", "/segnet/color_mask": image_type,
                     "/segnet/overlay": image_type, "/segnet/stats": "std_msgs/msg/String",
                     "/segnet/info": "std_msgs/msg/String", "/segnet/label_info": "vision_msgs/msg/LabelInfo"}
    masks = got["/segnet/mask"]
    assert sorted(_stamp(m.header) for _, m in masks) == sorted(published), "every published mask, once"
    for log_time, m in masks:
        header, labels = published[_stamp(m.header)]
        assert log_time == header["stamp_ns"], "log time is the capture time"
        assert m.header.frame_id == "camera" and m.encoding == "mono8"
        assert np.array_equal(_image(m), labels)
    for log_time, m in got["/segnet/overlay"]:
        assert log_time == _stamp(m.header) and log_time in published
        img = cv2.imdecode(np.asarray(m.data, np.uint8), cv2.IMREAD_COLOR) if image_encoding == "jpeg" else _image(m)
        assert img.shape == (48, 64, 3)
        if image_encoding == "jpeg":
            assert m.format == "jpeg"
    info = json.loads(got["/segnet/info"][-1][1].data)
    assert info["classes"] == ["bg", "a", "b"] and len(info["palette"]) == 3
    assert json.loads(got["/segnet/stats"][-1][1].data)["final"] is True

    # A second, independent decoder: mcap-ros2-support parses the schema text stored in the file.
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    (path,) = bag.glob("*.mcap")
    with open(path, "rb") as f:
        decoded = [(ch.topic, ros) for _, ch, _, ros in
                   make_reader(f, decoder_factories=[DecoderFactory()]).iter_decoded_messages()]
    mask_msgs = [ros for topic, ros in decoded if topic == "/segnet/mask"]
    assert len(mask_msgs) == 10
    for ros in mask_msgs:
        stamp = ros.header.stamp.sec * 1_000_000_000 + ros.header.stamp.nanosec
        assert np.array_equal(np.frombuffer(bytes(ros.data), np.uint8).reshape(ros.height, ros.width),
                              published[stamp][1])


def test_a_killed_mcap_recording_opens_and_recovers(toy_model, tmp_path):
    """SIGKILL mid-recording: the bag still opens (every finished file), and --recover brings back the
    file in progress; every mask read back equals the one the node published."""
    import yaml

    from perception.stream.consumers.record import main as record_main

    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&fps=30&frames=100000", model_dir, n_subs=2)
    bag = tmp_path / "bag"
    recorder = subprocess.Popen(
        [sys.executable, "-m", "perception.stream.consumers.record", pub.endpoint, "--out", str(bag), "--format", "mcap",
         "--max-bag-duration", "0.5", "--chunk-size", "4096"], stderr=subprocess.PIPE)
    published: dict[int, np.ndarray] = {}

    def listed_files() -> list[str]:
        try:
            meta = yaml.safe_load((bag / "metadata.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return []
        return meta["rosbag2_bagfile_information"]["relative_file_paths"]

    def finished_files() -> int:
        return len(listed_files())

    def ready_to_kill() -> bool:
        """Two files finished, and the one in progress holds a few chunks (a file just begun has
        nothing yet for --recover to bring back)."""
        listed = listed_files()
        in_progress = [p for p in bag.glob("*.mcap") if p.name not in listed]
        return len(listed) >= 2 and any(p.stat().st_size > 3 * 4096 for p in in_progress)

    try:
        with Subscriber(pub.endpoint, topics=["segnet/mask"], rcvhwm=100000) as sub:
            t.start()
            deadline = time.monotonic() + 60
            while not ready_to_kill() and time.monotonic() < deadline:
                if (msg := sub.recv(timeout=0.1)) is not None:
                    published[msg.header["stamp_ns"]] = msg.data.copy()
            os.kill(recorder.pid, signal.SIGKILL)
            recorder.wait(timeout=10)
            node.stop()
            t.join(timeout=30)
            while (msg := sub.recv(timeout=0.5)) is not None:
                published[msg.header["stamp_ns"]] = msg.data.copy()
    finally:
        if recorder.poll() is None:
            recorder.kill()
        recorder.stderr.close()
        pub.close()
    assert finished_files() >= 2, "the recorder never finished a file"
    on_disk = len(list(bag.glob("*.mcap")))
    assert on_disk > finished_files(), "the file in progress is on disk but not yet listed"

    before = _read_bag(bag)["/segnet/mask"]
    assert before
    for _, m in before:
        assert np.array_equal(_image(m), published[_stamp(m.header)])

    assert record_main(["--recover", str(bag)]) == 0
    after = _read_bag(bag)["/segnet/mask"]
    assert finished_files() == on_disk
    assert len(after) > len(before), "recovery brings back the masks of the file that was in progress"
    for _, m in after:
        assert np.array_equal(_image(m), published[_stamp(m.header)])


def _protobuf_class(channel: dict):
    """The message class for an advertised protobuf channel, built with google.protobuf from the
    FileDescriptorSet the server sent (nothing from the Foxglove SDK)."""
    import base64

    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    assert channel["schemaEncoding"] == "protobuf"
    files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(channel["schema"])).file
    pool = descriptor_pool.DescriptorPool()
    pending = list(files)
    while pending:  # add each file after its dependencies
        for fd in pending:
            if all(_in_pool(pool, dep) for dep in fd.dependency):
                pool.Add(fd)
                pending.remove(fd)
                break
        else:
            raise AssertionError("unresolvable protobuf dependencies")
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(channel["schemaName"]))


def _in_pool(pool, name: str) -> bool:
    try:
        pool.FindFileByName(name)
        return True
    except KeyError:
        return False


def _wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling a condition, not timing the test
    return True


def test_foxglove_bridge_forwards_only_what_a_client_watches(toy_model):
    """A plain WebSocket client speaking Foxglove's protocol subscribes, receives and decodes masks,
    colour masks and stats; the node computes the mask only while the client watches it."""
    import asyncio
    import struct

    websockets = pytest.importorskip("websockets")
    pytest.importorskip("foxglove")
    from perception.stream.consumers.foxglove_bridge import FoxgloveBridge

    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&fps=30&frames=100000", model_dir, n_subs=0)
    bridge = FoxgloveBridge(pub.endpoint, port=0)
    stop = threading.Event()
    bt = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    bt.start()
    t.start()
    published: dict[int, np.ndarray] = {}
    collecting, collected = threading.Event(), threading.Event()

    def collect() -> None:  # what the node publishes, straight from ZeroMQ, to compare with
        with Subscriber(pub.endpoint, topics=["segnet/mask"]) as sub:
            collecting.set()
            while not collected.is_set():
                if (m := sub.recv(timeout=0.05)) is not None:
                    published[m.header["stamp_ns"]] = m.data.copy()

    async def client() -> dict:
        got: dict = {"mask": [], "color_mask": [], "stats": []}
        # Foxglove's protocol was named foxglove.websocket.v1; the SDK's server speaks its successor
        # foxglove.sdk.v1 (same messages). Offer both, as the Foxglove app does.
        async with websockets.connect(f"ws://127.0.0.1:{bridge.port}",
                                      subprotocols=["foxglove.sdk.v1", "foxglove.websocket.v1"],
                                      max_size=1 << 24) as ws:
            channels = {}
            while not channels:
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if m["op"] == "advertise":
                    channels = {c["topic"]: c for c in m["channels"]}
            assert {"/segnet/mask", "/segnet/color_mask", "/segnet/overlay", "/segnet/uncertainty",
                    "/segnet/stats", "/segnet/info"} <= set(channels)
            assert channels["/segnet/mask"]["schemaName"] == "foxglove.RawImage"
            assert channels["/segnet/color_mask"]["schemaName"] == "foxglove.CompressedImage"
            assert not pub.wants("mask"), "nobody watches yet: the node must not compute masks"
            subs = {1: "mask", 2: "color_mask", 3: "stats"}
            await ws.send(json.dumps({"op": "subscribe", "subscriptions": [
                {"id": i, "channelId": channels[f"/segnet/{s}"]["id"]} for i, s in subs.items()]}))
            assert await asyncio.to_thread(_wait_until, lambda: pub.wants("mask"))
            threading.Thread(target=collect, daemon=True).start()
            await asyncio.to_thread(collecting.wait, 10)
            raw_image = _protobuf_class(channels["/segnet/mask"])
            jpeg_image = _protobuf_class(channels["/segnet/color_mask"])
            deadline = time.monotonic() + 30
            while (len(got["mask"]) < 8 or not got["color_mask"] or not got["stats"]) and time.monotonic() < deadline:
                data = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(data, str):
                    continue
                assert data[0] == 0x01  # binary opcode: message data
                sub_id, log_time = struct.unpack_from("<IQ", data, 1)
                payload = data[13:]
                stream = subs[sub_id]
                if stream == "stats":
                    got[stream].append(json.loads(payload))
                else:
                    got[stream].append((log_time, (raw_image if stream == "mask" else jpeg_image).FromString(payload)))
            await ws.send(json.dumps({"op": "unsubscribe", "subscriptionIds": [1, 2, 3]}))
        return got

    try:
        got = asyncio.run(client())
        collected.set()  # end the collector, so only the bridge could still want masks
        assert _wait_until(lambda: not pub.wants("mask")), "nobody watches: the bridge must unsubscribe upstream"
    finally:
        stop.set()
        collected.set()
        node.stop()
        t.join(timeout=30)
        bt.join(timeout=10)
        bridge.close()
        pub.close()

    assert len(got["mask"]) >= 8 and got["color_mask"] and got["stats"]
    compared = 0
    for log_time, m in got["mask"]:
        assert (m.width, m.height, m.encoding, m.step, m.frame_id) == (64, 48, "mono8", 64, "camera")
        assert m.timestamp.seconds * 1_000_000_000 + m.timestamp.nanos == log_time, "stamped with capture time"
        if log_time in published:
            assert np.array_equal(np.frombuffer(m.data, np.uint8).reshape(48, 64), published[log_time])
            compared += 1
    assert compared >= 2, "the masks Foxglove received are the ones the node published"
    log_time, c = got["color_mask"][-1]
    assert c.format == "jpeg" and cv2.imdecode(np.frombuffer(c.data, np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)
    assert "fps" in got["stats"][-1] and "latency_ms" in got["stats"][-1]


def _chromium_or_skip() -> str:
    """Chromium's executable; a test skips (before it starts anything) where there is none."""
    import shutil

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("needs Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    return exe


class _Chromium:
    """Headless Chromium driven over the DevTools protocol (a plain WebSocket, no driver package)."""

    def __init__(self, tmp_path: Path) -> None:
        import urllib.request

        from websockets.sync.client import connect

        exe = _chromium_or_skip()
        profile = tmp_path / "chromium-profile"
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
             "--window-size=1200,800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        if not _wait_until(lambda: port_file.is_file() and port_file.read_text().strip(), timeout=30):
            self.close()
            pytest.fail("Chromium did not start its DevTools server")
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self._connection = connect(page["webSocketDebuggerUrl"], max_size=1 << 26)
        self.ws = self._connection.__enter__()
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression: str):
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, f"{expression}: {reply['exceptionDetails']}"
        return reply["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 30.0) -> bool:
        def holds() -> bool:
            try:
                return bool(self.js(expression))
            except AssertionError:  # the page is still loading (document.body not there yet)
                return False

        return _wait_until(holds, timeout)

    def screenshot_rgb(self) -> np.ndarray:
        import base64

        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    def element_pixels(self, element_id: str) -> np.ndarray:
        """The rendered pixels (RGB) inside an element's box."""
        shot = self.screenshot_rgb()
        r = self.js(f"(() => {{ const b = document.getElementById({element_id!r}).getBoundingClientRect();"
                    " return [b.left, b.top, b.right, b.bottom, window.devicePixelRatio]; })()")
        x0, y0, x1, y1 = (int(round(v * r[4])) for v in r[:4])
        return shot[y0:y1, x0:x1]

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self._connection.__exit__(None, None, None)
        self.proc.kill()
        self.proc.wait(timeout=10)


def _serve_view(endpoint: str):
    """perception-view's server on a free loopback port, in a thread: (url, stop event, thread)."""
    import asyncio

    from perception.stream.consumers.view import serve

    stop = threading.Event()
    ready: dict = {}
    got_url = threading.Event()

    def run() -> None:
        asyncio.run(serve(endpoint, "127.0.0.1", 0, "segnet", stop,
                          ready=lambda url: (ready.setdefault("url", url), got_url.set())))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert got_url.wait(20), "perception-view did not start"
    return ready["url"], stop, t


def _shut_down(browser, view_stop, view_thread, node, node_thread, pub) -> None:
    browser.close()
    view_stop.set()
    node.stop()
    node_thread.join(timeout=30)
    view_thread.join(timeout=10)
    pub.close()


def test_view_in_chromium_shows_the_road_and_live_stats(shipped_model, camvid_root, tmp_path):
    """The page, rendered by Chromium against a live node running the shipped CamVid model: switched to
    the colour mask it shows the road's palette colour over much of the frame, and its stats update."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("websockets")
    _chromium_or_skip()
    from perception.stream.node.sources import SourceOptions

    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for src in sorted((camvid_root / "val").glob("0016E5_*.png"))[:6]:
        (frames_dir / src.name).symlink_to(src)
    node, pub, t, result = start_node(str(frames_dir), shipped_model / "model.onnx", n_subs=0, backend="onnxruntime",
                                      source_options=SourceOptions(loop=True))
    url, stop, vt = _serve_view(pub.endpoint)
    t.start()
    browser = _Chromium(tmp_path)
    try:
        browser.call("Page.navigate", url=url)
        assert browser.wait_js("+document.body.dataset.frames >= 2"), "no frames reached the page"
        legend = browser.js("[...document.querySelectorAll('#legend li')].map(li => li.textContent)")
        assert legend[:4] == ["Sky", "Building", "Pole", "Road"]
        assert browser.wait_js("document.getElementById('status').textContent === 'live'")

        browser.js("document.getElementById('btn-color_mask').click()")
        shown = int(browser.js("+document.body.dataset.frames"))
        assert browser.js("document.body.dataset.stream") == "color_mask"
        # Colour-mask frames have replaced the overlay once a few more have arrived.
        assert browser.wait_js(f"+document.body.dataset.frames >= {shown + 3}")
        pixels = browser.element_pixels("frame").reshape(-1, 3).astype(int)
        assert pixels.shape[0] > 10000, "the frame is not on screen"
        road = np.array([128, 64, 128])  # CamVid's road colour
        share = float((np.abs(pixels - road).max(axis=1) <= 12).mean())
        if os.environ.get("PERCEPTION_VIEW_SCREENSHOT"):  # to look at it: a path to write the page to
            cv2.imwrite(os.environ["PERCEPTION_VIEW_SCREENSHOT"], cv2.cvtColor(browser.screenshot_rgb(), cv2.COLOR_RGB2BGR))
        assert share > 0.15, f"the road colour covers only {share:.1%} of the rendered frame"

        first = browser.js("document.getElementById('processed').textContent")
        assert browser.wait_js(f"document.getElementById('processed').textContent !== {first!r}"), \
            "the stats panel does not update"
        assert browser.js("document.getElementById('fps').textContent") not in ("", "–")
        assert browser.js("document.querySelectorAll('#latency tr.stage').length") >= 3
    finally:
        _shut_down(browser, stop, vt, node, t, pub)


def test_view_says_when_the_node_stops_and_carries_on_when_it_restarts(toy_model, tmp_path):
    pytest.importorskip("aiohttp")
    pytest.importorskip("websockets")
    _chromium_or_skip()
    _, model_dir = toy_model
    source = "synthetic://?width=64&height=48&fps=20&frames=100000"
    node, pub, t, result = start_node(source, model_dir, n_subs=0)
    endpoint = pub.endpoint
    url, stop, vt = _serve_view(endpoint)
    t.start()
    browser = _Chromium(tmp_path)
    try:
        browser.call("Page.navigate", url=url)
        assert browser.wait_js("+document.body.dataset.frames >= 2")
        node.stop()
        t.join(timeout=30)
        pub.close()
        assert browser.wait_js("document.body.dataset.state === 'ended'"), "the page must say the node stopped"
        shown = int(browser.js("+document.body.dataset.frames"))

        node, pub, t, result = start_node(source, model_dir, n_subs=0, publish=endpoint)
        t.start()
        assert browser.wait_js(f"+document.body.dataset.frames >= {shown + 2}"), "frames must come back"
        assert browser.wait_js("document.body.dataset.state === 'live'")
        assert int(browser.js("document.getElementById('restarts').textContent")) >= 1
    finally:
        _shut_down(browser, stop, vt, node, t, pub)


def test_consumer_commands_fail_in_one_line(tmp_path, capsys):
    """Bad endpoints, busy ports and used folders: a one-line error and a non-zero status, nothing written."""
    import gc
    import socket
    import warnings

    from perception.stream.consumers.foxglove_bridge import main as foxglove_main
    from perception.stream.consumers.record import main as record_main
    from perception.stream.consumers.view import main as view_main

    pytest.importorskip("foxglove")
    pytest.importorskip("aiohttp")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cases = [
            (foxglove_main, ["tcp://127.0.0.1:5555", "--port", str(port)], "cannot serve on"),
            (view_main, ["tcp://127.0.0.1:5555", "--http", f"127.0.0.1:{port}"], "cannot serve on"),
            (foxglove_main, ["not-an-endpoint", "--port", "0"], "cannot connect to"),
            (view_main, ["not-an-endpoint", "--http", "127.0.0.1:0"], "cannot connect to"),
            (record_main, ["--recover", str(tmp_path / "nothing")], "holds no .mcap files"),
            # /proc passes os.access for root, yet nothing can be made in it (issue 45, item 12: a traceback)
            *([(record_main, ["tcp://127.0.0.1:5555", "--out", "/proc/nope"], "cannot be created")]
              if Path("/proc").is_dir() else []),
        ]
        for main, argv, text in cases:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert main(argv) != 0, argv
                gc.collect()
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and text in err[0], (argv, err)
            # A failed start closes what it opened: a forgotten subscriber retrying an endpoint once
            # stalled every ZeroMQ socket of the process (see perception/stream/monitor.py).
            unclosed = [str(w.message) for w in caught if str(w.message).startswith("Unclosed socket <zmq")]
            assert not unclosed, (argv, unclosed)
    finally:
        busy.close()
    bag = tmp_path / "bag"
    bag.mkdir()
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
    assert record_main(["tcp://127.0.0.1:5555", "--out", str(bag), "--format", "mcap"]) == 2
    assert "already holds a bag" in capsys.readouterr().err
    assert sorted(p.name for p in bag.iterdir()) == ["metadata.yaml"]
    with pytest.raises(SystemExit):
        view_main(["tcp://127.0.0.1:5555", "--http", "no-port"])


@pytest.mark.parametrize("fmt", ["files", "mcap"])
def test_a_recording_that_times_out_with_nothing_received_leaves_no_folder(fmt, tmp_path, capsys):
    """Nothing arrives before --timeout: rc 1, one line, and no empty --out folder; a folder that was
    there before is left alone."""
    import zmq

    from perception.stream.consumers.record import main as record_main

    if fmt == "mcap":
        pytest.importorskip("mcap")
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.PUB)  # a node that never publishes
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        out = tmp_path / "rec"
        assert record_main([f"tcp://127.0.0.1:{port}", "--out", str(out), "--format", fmt, "--timeout", "0.3"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "nothing received" in err[0], err
        assert not out.exists()
        kept = tmp_path / "existing"
        kept.mkdir()
        (kept / "notes.txt").write_text("mine")
        assert record_main([f"tcp://127.0.0.1:{port}", "--out", str(kept), "--format", fmt, "--timeout", "0.3"]) == 1
        assert (kept / "notes.txt").read_text() == "mine"
    finally:
        silent.close(linger=0)


def test_a_killed_file_recording_keeps_its_video_but_the_last_second(toy_model, tmp_path):
    """perception-record --format files killed with SIGKILL: overlay.mp4 still plays (OpenCV's FFmpeg
    reads it), holds every frame but at most the last second's, and its frames are the overlays sent."""
    _, model_dir = toy_model
    fps = 10
    node, pub, t, result = start_node(f"synthetic://?width=64&height=48&fps={fps}&frames=100000", model_dir,
                                      n_subs=2)
    out = tmp_path / "rec"
    recorder = subprocess.Popen([sys.executable, "-m", "perception.stream.consumers.record", pub.endpoint, "--out", str(out),
                                 "--fps", str(fps)], stderr=subprocess.PIPE)
    overlays: list[np.ndarray] = []
    try:
        with Subscriber(pub.endpoint, topics=["segnet/overlay"], rcvhwm=100000) as sub:
            t.start()
            # Run until the recorder has written 3.5 seconds of masks.
            while len(list((out / "mask").glob("*.png"))) < 3.5 * fps:
                if (msg := sub.recv(timeout=0.1)) is not None:
                    overlays.append(msg.data.copy())
                assert recorder.poll() is None and t.is_alive()
            os.kill(recorder.pid, signal.SIGKILL)
            recorder.wait(timeout=10)
            written = len(list((out / "mask").glob("*.png")))
            node.stop()
            t.join(timeout=30)
            while (msg := sub.recv(timeout=0.5)) is not None:
                overlays.append(msg.data.copy())
    finally:
        if recorder.poll() is None:
            recorder.kill()
        pub.close()
    cap = cv2.VideoCapture(str(out / "overlay.mp4"))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    assert len(frames) >= written - fps - 1, f"{len(frames)} frames survived of {written} recorded"
    for i, img in enumerate(frames):  # lossy H.264, so compare by PSNR
        assert img.shape == overlays[i].shape
        assert cv2.PSNR(img, overlays[i]) > 28, f"frame {i} is not overlay {i}"


def test_view_shows_a_bayesian_models_uncertainty_as_a_heat_map(toy_bayesian_model):
    """A page that picks the uncertainty stream gets JPEG heat maps, and only then does the node
    compute uncertainty (MC dropout is the expensive stream)."""
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")
    _, model_dir = toy_bayesian_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&fps=10&frames=100000", model_dir, n_subs=0)
    url, stop, vt = _serve_view(pub.endpoint)
    t.start()

    async def page() -> tuple[dict, np.ndarray]:
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "ws") as ws:
            info, showing = None, None
            await ws.send_str(json.dumps({"stream": "uncertainty"}))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                m = await asyncio.wait_for(ws.receive(), 60)
                if m.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(m.data)
                    info = data.get("info", info)
                    showing = data.get("stream", showing)  # status messages say what the page is shown
                elif m.type == aiohttp.WSMsgType.BINARY and showing == "uncertainty":
                    assert pub.wants("uncertainty"), "the node computes uncertainty once a page shows it"
                    return info, cv2.imdecode(np.frombuffer(m.data, np.uint8), cv2.IMREAD_COLOR)
            raise AssertionError("no uncertainty frame reached the page")

    try:
        assert not pub.wants("uncertainty")
        info, heat = asyncio.run(page())
    finally:
        stop.set()
        node.stop()
        t.join(timeout=30)
        vt.join(timeout=10)
        pub.close()
    assert info is not None and info["bayesian"] is True
    assert heat.shape == (48, 64, 3)


def _two_camera_node(model_dir) -> tuple[str, threading.Thread]:
    """perception-node with cameras a (64x48) and b (32x24), 10 s each at 20 fps, in a started thread."""
    from perception.stream.node.cli import main as node_main

    endpoint = free_endpoint()
    node = threading.Thread(target=node_main, args=([
        "--source", "a=synthetic://?width=64&height=48&fps=20&frames=200",
        "--source", "b=synthetic://?width=32&height=24&fps=20&frames=200", "--realtime",
        "--model", str(model_dir), "--backend", "torch", "--publish", endpoint],), daemon=True)
    node.start()
    return endpoint, node


def test_foxglove_bridge_gives_each_camera_its_channels(toy_model):
    import asyncio
    import struct

    websockets = pytest.importorskip("websockets")
    pytest.importorskip("foxglove")
    from perception.stream.consumers.foxglove_bridge import FoxgloveBridge

    _, model_dir = toy_model
    endpoint, node = _two_camera_node(model_dir)
    bridge = FoxgloveBridge(endpoint, port=0, cameras=["a", "b"])
    stop = threading.Event()
    bt = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    bt.start()

    async def client():
        async with websockets.connect(f"ws://127.0.0.1:{bridge.port}", subprotocols=["foxglove.sdk.v1"]) as ws:
            channels = {}
            while not channels:
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if m["op"] == "advertise":
                    channels = {c["topic"]: c for c in m["channels"]}
            assert {"/segnet/a/mask", "/segnet/b/mask", "/segnet/a/stats", "/segnet/b/overlay"} <= set(channels)
            await ws.send(json.dumps({"op": "subscribe", "subscriptions": [
                {"id": 1, "channelId": channels["/segnet/b/mask"]["id"]}]}))
            raw_image = _protobuf_class(channels["/segnet/b/mask"])
            while True:
                data = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(data, bytes):
                    return raw_image.FromString(data[13:]), struct.unpack_from("<I", data, 1)[0]

    try:
        msg, sub_id = asyncio.run(client())
        assert bridge.watched() == {"segnet/b/mask"}, "only camera b's mask is asked of the node"
    finally:
        stop.set()
        bt.join(timeout=10)
        bridge.close()
        node.join(timeout=60)
    assert sub_id == 1 and (msg.width, msg.height, msg.frame_id) == (32, 24, "b")


def test_view_offers_each_camera_of_a_node(toy_model):
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")
    from perception.stream.consumers.view import serve

    _, model_dir = toy_model
    endpoint, node = _two_camera_node(model_dir)
    stop = threading.Event()

    async def run() -> tuple[list, dict, np.ndarray]:
        got_url = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(serve(endpoint, "127.0.0.1", 0, "segnet", stop, ready=got_url.set_result,
                                           cameras=["a", "b"]))
        url = await asyncio.wait_for(got_url, 20)
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(url + "ws") as ws:
                cameras, info, showing = None, None, None
                await ws.send_str(json.dumps({"camera": "b"}))
                while True:
                    m = await asyncio.wait_for(ws.receive(), 60)
                    if m.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(m.data)
                        cameras = data.get("cameras", cameras)
                        info = data.get("info", info)
                        showing = data.get("camera", showing)
                    elif m.type == aiohttp.WSMsgType.BINARY and showing == "b" and (info or {}).get("frame_id") == "b":
                        return cameras, info, cv2.imdecode(np.frombuffer(m.data, np.uint8), cv2.IMREAD_COLOR)
        finally:
            stop.set()
            await server

    try:
        cameras, info, frame = asyncio.run(run())
    finally:
        stop.set()
        node.join(timeout=60)
    assert cameras == ["a", "b"]
    assert info["frame_id"] == "b" and frame.shape == (24, 32, 3), "the page shows camera b's frames and info"


def test_mcap_bag_records_uncertainty_as_32fc1(toy_bayesian_model, tmp_path):
    """A Bayesian node's uncertainty in a bag: sensor_msgs/Image 32FC1, equal to what was published."""
    from perception.stream.consumers.record import main as record_main

    _, model_dir = toy_bayesian_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&frames=3", model_dir, n_subs=2)
    bag = tmp_path / "bag"
    rec: dict = {}
    rt = threading.Thread(target=lambda: rec.setdefault("rc", record_main(
        [pub.endpoint, "--out", str(bag), "--format", "mcap", "--streams", "uncertainty,stats", "--timeout", "30"])))
    published: dict[int, np.ndarray] = {}
    with Subscriber(pub.endpoint, topics=["segnet/uncertainty"]) as sub:
        rt.start()
        t.start()
        t.join(timeout=60)
        while (msg := sub.recv(timeout=1.0)) is not None:
            published[msg.header["stamp_ns"]] = msg.data.copy()
    rt.join(timeout=30)
    pub.close()
    assert rec.get("rc") == 0 and len(published) == 3
    got = _read_bag(bag)
    assert got.pop("__types__")["/segnet/uncertainty"] == "sensor_msgs/msg/Image"
    for _, m in got["/segnet/uncertainty"]:
        assert m.encoding == "32FC1" and m.is_bigendian == 0
        assert np.array_equal(_image(m), published[_stamp(m.header)])


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                          ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                          ("dashboard.test", False)])
def test_the_view_warns_only_off_this_machine(host, loopback):
    """Issue 45, item 12: the off-machine warning fired for 127.0.0.2 (loopback) and did not say the page has
    no authentication."""
    from perception.stream.consumers.view import _is_loopback

    assert _is_loopback(host) is loopback
