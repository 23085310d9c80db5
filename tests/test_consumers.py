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

from conftest import make_video, start_node
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
    from perception.stream.record import main as record_main

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
                     "/segnet/info": "std_msgs/msg/String"}
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

    from perception.stream.record import main as record_main

    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&fps=30&frames=100000", model_dir, n_subs=2)
    bag = tmp_path / "bag"
    recorder = subprocess.Popen(
        [sys.executable, "-m", "perception.stream.record", pub.endpoint, "--out", str(bag), "--format", "mcap",
         "--max-bag-duration", "0.5", "--chunk-size", "4096"], stderr=subprocess.PIPE)
    published: dict[int, np.ndarray] = {}

    def finished_files() -> int:
        try:
            meta = yaml.safe_load((bag / "metadata.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return 0
        return len(meta["rosbag2_bagfile_information"]["relative_file_paths"])

    try:
        with Subscriber(pub.endpoint, topics=["segnet/mask"], rcvhwm=100000) as sub:
            t.start()
            deadline = time.monotonic() + 60
            while finished_files() < 2 and time.monotonic() < deadline:
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
    from perception.stream.foxglove_bridge import FoxgloveBridge

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
