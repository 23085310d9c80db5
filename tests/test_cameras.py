"""Several cameras in one node: per-camera topics, frame ids and seq; one batched backend; a dead
camera ends only its own pipeline."""

from __future__ import annotations

import threading
import time

import numpy as np

from conftest import free_endpoint, make_video
from perception.inference import load_backend
from perception.stream.client import Subscriber
from perception.stream.node.cameras import BatchingBackend, parse_camera_specs
from perception.stream.node.sources import open_source


def test_camera_specs_take_names_and_leave_uris_alone():
    specs = parse_camera_specs(["front=rtsp://cam/a?x=1", "synthetic://?width=8&height=8", "rear=/dev/video2"])
    assert [(s.name, s.uri) for s in specs] == [("front", "rtsp://cam/a?x=1"),
                                                ("cam1", "synthetic://?width=8&height=8"), ("rear", "/dev/video2")]
    try:
        parse_camera_specs(["a=x.mp4", "a=y.mp4"])
    except ValueError as e:
        assert "used twice" in str(e)
    else:
        raise AssertionError("duplicate names must fail")


def test_batching_backend_runs_pending_requests_as_one_batch(toy_model):
    """While one request is being inferred, two more arrive: they run together, and each caller gets
    exactly its own frames' labels."""
    _, model_dir = toy_model
    real = load_backend(model_dir, backend="torch")
    gate, sizes = threading.Event(), []

    class Gated:
        card, name, capabilities, classes, palette = real.card, real.name, real.capabilities, real.classes, real.palette

        def infer(self, frames, **kw):
            sizes.append(len(frames))
            gate.wait(30)
            return real.infer(frames, **kw)

        def close(self):
            pass

    shared = BatchingBackend(Gated())
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (1, 48, 64, 3), dtype=np.uint8) for _ in range(3)]
    out: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: out.setdefault(i, shared.infer(frames[i]).labels)) for i in range(3)]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not sizes and time.monotonic() < deadline:  # the first is inside the backend
        time.sleep(0.01)
    threads[1].start()
    threads[2].start()
    while len(shared._pending) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(timeout=30)
    shared.close()
    assert sizes == [1, 2], "the two requests that waited together ran as one batch"
    for i in range(3):
        assert np.array_equal(out[i], real.infer(frames[i]).labels)


def test_two_video_cameras_in_one_node_and_a_dead_one(toy_model, tmp_path):
    from perception.stream.node.cli import main as node_main

    _, model_dir = toy_model
    front = make_video(tmp_path / "front.avi", n=6)
    rear = make_video(tmp_path / "rear.avi", n=4, size=(80, 60))
    endpoint = free_endpoint()
    rc: dict = {}
    node = threading.Thread(target=lambda: rc.setdefault("rc", node_main([
        "--source", f"front={front}", "--source", f"rear={rear}", "--source", "dead=rtsp://127.0.0.1:9/none",
        "--model", str(model_dir), "--backend", "torch", "--publish", endpoint, "--wait-for-subscribers", "1",
        "--reconnect-attempts", "1", "--stall-timeout", "1"])))
    got: dict[str, dict[int, object]] = {"front": {}, "rear": {}}
    infos: dict[str, dict] = {}
    with Subscriber(endpoint, topics=["segnet/"]) as sub:
        node.start()
        deadline = time.monotonic() + 90
        while node.is_alive() and time.monotonic() < deadline:
            msg = sub.recv(timeout=0.5)
            if msg is None:
                continue
            camera = msg.topic.split("/")[1]
            if msg.stream == "mask":
                got[camera][msg.header["seq"]] = msg
            elif msg.stream == "info":
                infos[camera] = msg.data
        node.join(timeout=30)
    assert rc.get("rc") == 1, "the dead camera's failure is the node's exit status"
    assert sorted(got["front"]) == list(range(6)) and sorted(got["rear"]) == list(range(4)), \
        "the live cameras deliver every frame although one camera is dead"
    backend = load_backend(model_dir, backend="torch")
    for camera, video in (("front", front), ("rear", rear)):
        frames = [f.image for f in open_source(str(video))]
        for seq, msg in got[camera].items():
            assert msg.header["frame_id"] == camera
            assert np.array_equal(msg.data, backend.infer(frames[seq][None]).labels[0])
        assert infos[camera]["frame_id"] == camera


def test_record_keeps_each_camera_apart(toy_model, tmp_path):
    """perception-record --camera: files per camera, and one bag holding every camera's topics."""
    from perception.stream.node.cli import main as node_main
    from perception.stream.consumers.record import main as record_main

    _, model_dir = toy_model
    for fmt in ("files", "mcap"):
        endpoint = free_endpoint()
        out = tmp_path / fmt
        rec: dict = {}
        rt = threading.Thread(target=lambda: rec.setdefault("rc", record_main(
            [endpoint, "--out", str(out), "--format", fmt, "--camera", "a", "--camera", "b", "--timeout", "60"])))
        rt.start()
        assert node_main(["--source", "a=synthetic://?width=64&height=48&frames=3",
                          "--source", "b=synthetic://?width=32&height=24&frames=2", "--model", str(model_dir),
                          "--backend", "torch", "--publish", endpoint, "--wait-for-subscribers", "1"]) == 0
        rt.join(timeout=60)
        assert rec.get("rc") == 0, "the recorder ends once every camera has finished"
        if fmt == "files":
            assert len(list((out / "a" / "mask").glob("*.png"))) == 3
            assert len(list((out / "b" / "mask").glob("*.png"))) == 2
        else:
            from rosbags.rosbag2 import Reader

            with Reader(out) as reader:
                counts = {c.topic: c.msgcount for c in reader.connections}
            assert counts["/segnet/a/mask"] == 3 and counts["/segnet/b/mask"] == 2
