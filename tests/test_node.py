"""The streaming node end to end over loopback: completeness, equality with offline inference,
headers, slow subscribers, signals, and clear failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import zmq

from conftest import make_video, start_node
from perception.inference import load_backend
from perception.stream.client import Subscriber
from perception.stream.node.cli import main as node_main
from perception.stream.node.pipeline import Node, NodeSettings
from perception.stream.publisher import Publisher
from perception.stream.node.sources import open_source


def _free_endpoint() -> str:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PUB)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)
    return f"tcp://127.0.0.1:{port}"


def test_every_mask_arrives_and_equals_offline_inference(toy_model, tmp_path):
    _, model_dir = toy_model
    video = make_video(tmp_path / "v.avi", n=12)
    node, pub, t, result = start_node(str(video), model_dir)
    sub = Subscriber(pub.endpoint, topics=["segnet/mask", "segnet/overlay", "segnet/info"])
    t.start()
    got, overlays, info = {}, {}, None
    deadline = time.monotonic() + 60
    while len(got) < 12 and time.monotonic() < deadline:
        msg = sub.recv(timeout=1)
        if msg is None:
            continue
        if msg.stream == "mask":
            got[msg.header["seq"]] = msg
        elif msg.stream == "overlay":
            overlays[msg.header["seq"]] = msg
        elif msg.stream == "info":
            info = msg.data
    t.join(timeout=30)
    sub.close()
    pub.close()
    assert result.get("rc") == 0
    assert sorted(got) == list(range(12)), "every frame of a file must arrive"
    assert info is not None and info["classes"] == ["bg", "a", "b"]

    # Offline: the same decoded frames through the same backend.
    backend = load_backend(model_dir, backend="torch")
    frames = [f.image for f in open_source(str(video))]
    for seq, msg in got.items():
        h = msg.header
        assert msg.data.shape == frames[seq].shape[:2] == (h["height"], h["width"])
        assert h["encoding"] == "mono8" and h["step"] == h["width"] and h["frame_id"] == "camera"
        assert np.array_equal(msg.data, backend.infer(frames[seq][None]).labels[0])
        assert set(h["latency_ms"]) == {"queue_ms", "infer_ms", "post_ms"}
        if seq in overlays:  # messages of one frame share seq and stamp
            assert overlays[seq].header["stamp_ns"] == h["stamp_ns"]
            assert overlays[seq].data.shape == (*frames[seq].shape[:2], 3)
    stamps = [got[i].header["stamp_ns"] for i in range(12)]
    assert stamps == sorted(stamps)


def test_streams_are_computed_only_when_subscribed(toy_model):
    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&frames=6", model_dir)
    sub = Subscriber(pub.endpoint, topics=["segnet/mask"])
    t.start()
    t.join(timeout=60)
    time.sleep(0.2)
    assert result.get("rc") == 0
    assert pub.sent.get("mask") == 6
    assert "overlay" not in pub.sent and "color_mask" not in pub.sent and "uncertainty" not in pub.sent
    sub.close()
    pub.close()


def test_slow_subscriber_does_not_stall_others(toy_model, tmp_path):
    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&frames=300", model_dir, n_subs=2)
    slow = Subscriber(pub.endpoint, topics=["segnet/overlay"], rcvhwm=1)  # never reads
    fast = Subscriber(pub.endpoint, topics=["segnet/mask"])
    t.start()
    seqs = []
    deadline = time.monotonic() + 120
    while len(seqs) < 300 and time.monotonic() < deadline:
        msg = fast.recv(timeout=1)
        if msg is not None:
            seqs.append(msg.header["seq"])
    t.join(timeout=30)
    assert result.get("rc") == 0
    assert seqs == list(range(300))
    slow.close()
    fast.close()
    pub.close()


def test_latest_only_subscriber_gets_newest_per_topic(toy_model):
    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&frames=40", model_dir)
    sub = Subscriber(pub.endpoint, topics=["segnet/mask", "segnet/color_mask"], latest_only=True)
    t.start()
    t.join(timeout=60)
    time.sleep(0.3)
    first = sub.recv(timeout=2)
    second = sub.recv(timeout=2)
    assert {first.stream, second.stream} == {"mask", "color_mask"}
    assert first.header["seq"] == second.header["seq"] == 39
    assert sub.dropped > 0
    sub.close()
    pub.close()


def test_uncertainty_stream_for_bayesian_model(toy_bayesian_model):
    pub = Publisher("tcp://127.0.0.1:*", "segnet")
    backend = load_backend(toy_bayesian_model[1], mc_samples=3)
    node = Node(open_source("synthetic://?width=64&height=48&frames=2"), backend, pub,
                NodeSettings(wait_for_subscribers=1, wait_timeout=20), log=lambda m: None)
    sub = Subscriber(pub.endpoint, topics=["segnet/uncertainty", "segnet/info"])
    rc = node.run()
    got = {}
    while (msg := sub.recv(timeout=5)) is not None and len(got) < 2:
        got.setdefault(msg.stream, msg)
    msg, info = got["uncertainty"], got["info"].data
    assert rc == 0
    assert msg.header["encoding"] == "32FC1" and msg.data.dtype == np.float32 and msg.data.shape == (48, 64)
    # The default map is the predictive entropy (nats, at most ln of the class count), and info says so.
    assert info["uncertainty_measure"] == "entropy"
    assert (msg.data >= 0).all() and msg.data.max() <= np.log(len(info["classes"])) + 1e-5
    sub.close()
    pub.close()


def _node_cmd(*args):
    return [sys.executable, "-m", "perception.stream.node.cli", *args]


def test_sigterm_mid_stream_exits_cleanly(toy_model):
    _, model_dir = toy_model
    ep = _free_endpoint()
    proc = subprocess.Popen(
        _node_cmd("--source", "synthetic://?width=64&height=48", "--loop", "--model", str(model_dir),
                  "--backend", "torch", "--publish", ep),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with Subscriber(ep, topics=["segnet/mask"]) as sub:
            assert sub.recv(timeout=60) is not None, "node published nothing"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert rc == 0 and time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_inputs_fail_clearly(toy_model, tmp_path, capsys):
    _, model_dir = toy_model
    video = make_video(tmp_path / "v.avi", n=2)
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("hello")
    bad_model = tmp_path / "badmodel"
    bad_model.mkdir()
    (bad_model / "model.json").write_text("{not json")
    base = ["--backend", "torch", "--publish", _free_endpoint()]
    cases = [
        (["--source", str(tmp_path / "missing.mp4"), "--model", str(model_dir)], "source not found"),
        (["--source", str(not_video), "--model", str(model_dir)], "not a"),
        (["--source", "/dev/video77", "--model", str(model_dir)], "camera /dev/video77 is not there"),
        (["--source", str(video), "--model", str(tmp_path / "nomodel")], "model not found"),
        (["--source", str(video), "--model", str(bad_model)], "not valid JSON"),
        (["--source", str(video), "--model", str(model_dir), "--backend", "tensorrt"], "needs an .engine"),
    ]
    for argv, match in cases:
        assert node_main([*base[:2], *argv, *base[2:]] if "--backend" not in argv else [*argv, *base[2:]]) == 2, argv
        err = capsys.readouterr().err
        assert match in err, (argv, err)
    # An endpoint already in use.
    ctx = zmq.Context.instance()
    holder = ctx.socket(zmq.PUB)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    try:
        assert node_main(["--source", str(video), "--model", str(model_dir), "--backend", "torch",
                          "--publish", f"tcp://127.0.0.1:{port}"]) == 2
        assert "already in use" in capsys.readouterr().err
    finally:
        holder.close(linger=0)


def test_echo_and_record_cli(toy_model, tmp_path, capsys):
    from perception.stream.consumers.echo import main as echo_main
    from perception.stream.consumers.record import main as record_main

    _, model_dir = toy_model
    video = make_video(tmp_path / "v.avi", n=5)
    node, pub, t, result = start_node(str(video), model_dir)
    out = tmp_path / "rec"
    rec = {}
    rt = threading.Thread(target=lambda: rec.setdefault("rc", record_main([pub.endpoint, "--out", str(out),
                                                                            "--timeout", "30"])))
    rt.start()
    t.start()
    t.join(timeout=60)
    rt.join(timeout=60)
    pub.close()
    assert rec.get("rc") == 0 and result.get("rc") == 0
    masks = sorted((out / "mask").glob("*.png"))
    assert len(masks) == 5
    assert cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED).shape == (48, 64)
    cap = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    assert (out / "info.json").is_file() and (out / "stats.jsonl").is_file()

    node, pub, t, result = start_node("synthetic://?width=64&height=48&frames=3", model_dir)
    ec = {}
    et = threading.Thread(target=lambda: ec.setdefault("rc", echo_main([pub.endpoint, "segnet/mask", "--count", "3",
                                                                         "--timeout", "30"])))
    et.start()
    t.start()
    et.join(timeout=60)
    t.join(timeout=60)
    pub.close()
    assert ec.get("rc") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("segnet/mask")]
    assert len(lines) == 3 and "seq=0" in lines[0] and "64x48 mono8" in lines[0]


def test_launch_configs_parse():
    from pathlib import Path

    from perception.stream.node.cli import build_parser, load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "launch").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_config(build_parser().parse_args(["--config", str(path)]))
        assert cfg.publish.startswith("tcp://127.0.0.1:"), "configs bind to loopback by default"
    cfg = load_config(build_parser().parse_args(["--config", str(configs[0]), "--namespace", "x"]))
    assert cfg.namespace == "x"  # flags override the file


def test_launch_file_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    """A launch file works from any working directory: its relative paths name files next to it."""
    from pathlib import Path

    from perception.stream.node.cli import build_parser, load_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    for path in sorted((repo / "launch").glob("*.yaml")):
        cfg = load_config(build_parser().parse_args(["--config", str(path)]))
        assert Path(cfg.model).resolve().is_dir(), f"{path.name}: model {cfg.model} not found from elsewhere"
    own = tmp_path / "site" / "cam.yaml"
    own.parent.mkdir()
    own.write_text("source: clips/a.mp4\nmodel: m.onnx\n")
    cfg = load_config(build_parser().parse_args(["--config", str(own)]))
    assert Path(cfg.source) == own.parent / "clips/a.mp4" and Path(cfg.model) == own.parent / "m.onnx"
    cfg = load_config(build_parser().parse_args(["--config", str(own), "--model", "x.onnx", "--source", "0"]))
    assert cfg.model == "x.onnx" and cfg.source == "0", "flags stay relative to the working directory"
    own.write_text("source: rtsp://cam/stream\n")
    assert load_config(build_parser().parse_args(["--config", str(own)])).source == "rtsp://cam/stream"


class _FastLiveSource:
    """A live source producing frames much faster than inference (a camera at high fps)."""

    live = True
    uri = "fake://camera"
    state = "streaming"
    reconnects = 0

    def __init__(self, n):
        self.n = n

    def interrupt(self):
        pass

    def __iter__(self):
        from perception.stream.node.sources import Frame

        for i in range(self.n):
            time.sleep(0.002)
            yield Frame(np.full((48, 64, 3), i % 255, np.uint8), i, time.time_ns(), i)
        self.state = "ended"

    def stalled(self):
        return False


def test_live_source_newest_frame_wins_and_drops_are_counted(toy_model):
    _, model_dir = toy_model

    class SlowBackend:
        def __init__(self, inner):
            self.inner, self.name, self.card = inner, "slow", inner.card
            self.capabilities = inner.capabilities
            self.palette, self.classes = inner.palette, inner.classes

        def infer(self, frames, **kw):
            time.sleep(0.03)
            return self.inner.infer(frames, **kw)

    pub = Publisher("tcp://127.0.0.1:*", "segnet")
    logs = []
    node = Node(_FastLiveSource(200), SlowBackend(load_backend(model_dir, backend="torch")), pub,
                NodeSettings(wait_for_subscribers=1, wait_timeout=20, log_period=0.2), log=logs.append)
    sub = Subscriber(pub.endpoint, topics=["segnet/mask"])
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", node.run()), daemon=True)
    t.start()
    seqs = []
    while True:
        m = sub.recv(timeout=2)
        if m is None:
            break
        seqs.append(m.header["seq"])
    t.join(timeout=30)
    sub.close()
    pub.close()
    c = node.counters
    assert result.get("rc") == 0
    assert c.captured == 200 and c.dropped > 50, "a slow consumer of a live source must drop, not queue"
    assert c.processed + c.dropped == c.captured
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and len(seqs) < 200
    status = [line for line in logs if " fps" in line]
    assert status and "dropped" in status[-1] and "source" in status[-1]


def _echo_while_node_runs(model_dir, source_uri, echo_args):
    """Run perception-echo (with ``echo_args`` after the endpoint) against a node on ``source_uri``;
    returns (echo's return code, the node's), once both have finished."""
    from perception.stream.consumers.echo import main as echo_main

    node, pub, t, result = start_node(source_uri, model_dir)
    ec = {}
    et = threading.Thread(target=lambda: ec.setdefault("rc", echo_main([pub.endpoint, *echo_args])))
    et.start()
    t.start()
    t.join(timeout=60)
    et.join(timeout=30)
    pub.close()
    assert not et.is_alive(), "perception-echo did not finish"
    return ec.get("rc"), result.get("rc")


def test_echo_exits_on_the_nodes_final_stats_and_refuses_bad_endpoints(toy_model, capsys):
    from perception.stream.consumers.echo import main as echo_main

    _, model_dir = toy_model
    # No --count and a long --timeout: only the node's final stats can end it in time.
    echo_rc, node_rc = _echo_while_node_runs(model_dir, "synthetic://?width=64&height=48&frames=3",
                                             ["--timeout", "120", "--json"])
    assert echo_rc == 0 and node_rc == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(m["topic"] == "segnet/mask" for m in out) == 3
    assert out[-1]["topic"] == "segnet/stats" and out[-1]["data"]["final"] is True
    for bad in ("foo", "tcp://nohost", "bogus://x"):
        assert echo_main([bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("perception-echo: error: cannot connect to"), err


def test_options_are_validated_at_start_naming_the_option(tmp_path, capsys):
    cases = [
        (["--skip", "-1"], "--skip must be >= 0, got -1"),
        (["--overlay-alpha", "2"], "--overlay-alpha must be in [0, 1], got 2.0"),
        (["--max-frames", "-5"], "--max-frames must be >= 1, got -5"),
        (["--stats-period", "-1"], "--stats-period must be > 0"),
        (["--wait-timeout", "0"], "--wait-timeout must be > 0"),
        (["--mc-samples", "0"], "--mc-samples must be >= 1"),
        (["--resize", "0x0"], "--resize 0x0 is too small"),
    ]
    for argv, match in cases:
        assert node_main(["--source", "synthetic://", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], (argv, err)
    yaml_cases = [("skip: lots\n", "--skip must be an int, got 'lots'"),
                  ("overlay_alpha: [1, 2]\n", "--overlay-alpha must be a float"),
                  ("legend: 3\n", "--legend must be a bool"),
                  ("skip: [unclosed\n", "is not valid YAML")]
    for text, match in yaml_cases:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        assert node_main(["--source", "synthetic://", "--config", str(cfg)]) == 2, text
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], (text, err)


def test_broken_model_files_are_one_line_errors(toy_model, tmp_path, capsys):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(toy_model[1], truncated)
    w = truncated / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for model, backend in ((truncated, "torch"), (junk, "auto")):
        rc = node_main(["--source", "synthetic://?frames=1", "--model", str(model), "--backend", backend,
                        "--publish", _free_endpoint()])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("perception-node: error: model:"), err
        assert "Traceback" not in "\n".join(err)


def test_frames_without_subscribers_are_skipped_and_counted_apart(toy_model):
    _, model_dir = toy_model
    pub = Publisher("tcp://127.0.0.1:*", "segnet")
    # Nobody subscribes to a frame stream: every frame is read, none inferred.
    node = Node(open_source("synthetic://?width=64&height=48&frames=7"), load_backend(model_dir, backend="torch"), pub,
                NodeSettings(), log=lambda m: None)
    assert node.run() == 0
    st = node.stats()
    pub.close()
    assert st["frames_captured"] == 7 and st["frames_processed"] == 0
    assert st["frames_skipped_no_subscribers"] == 7 and st["fps"] == 0.0


def test_source_state_and_fps_tell_the_truth(toy_model, monkeypatch):
    from perception.stream.node import pipeline as P
    from perception.stream.node.sources import SourceOptions

    _, model_dir = toy_model

    class FakeSource:
        state, reconnects, stalled_now, live = "streaming", 0, False, True

        def stalled(self):
            return self.stalled_now

    src = FakeSource()
    pub = Publisher("tcp://127.0.0.1:*", "segnet")
    try:
        node = Node(src, load_backend(model_dir, backend="torch"), pub, NodeSettings(), log=lambda m: None)
        clock = [1000.0]
        monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
        for state, stalled, expected in [("streaming", False, "streaming"), ("streaming", True, "stalled"),
                                         ("reconnecting", True, "reconnecting"), ("failed", True, "failed"),
                                         ("ended", True, "ended")]:
            src.state, src.stalled_now = state, stalled
            assert node.stats()["source_state"] == expected, (state, stalled)
        # Ten frames at 2 fps, then nothing: fps is 2 while they arrive and falls to 0 once they stop.
        node.counters.recent.extend(1000.0 + 0.5 * k for k in range(10))
        clock[0] = 1004.5
        assert node.stats()["fps"] == pytest.approx(2.0)
        clock[0] = 1012.0  # 7.5 s after the last frame: falling
        assert 0 < node.stats()["fps"] < 1.0
        clock[0] = 1020.0
        assert node.stats()["fps"] == 0.0
    finally:
        pub.close()
    # --max-frames: the source ends, it does not stay "streaming".
    source = open_source("synthetic://?width=32&height=32&frames=50", SourceOptions(max_frames=3))
    assert len(list(source)) == 3 and source.state == "ended"


def test_node_never_sends_what_consumers_refuse(toy_model):
    from perception.stream.protocol import Limits

    _, model_dir = toy_model
    # A limit between a 64x48 mask (3 KiB) and its bgr8 overlay (9 KiB): overlays are withheld, masks flow.
    limits = Limits(max_message_bytes=6000)
    pub = Publisher("tcp://127.0.0.1:*", "segnet", limits=limits)
    logs = []
    node = Node(open_source("synthetic://?width=64&height=48&frames=4"), load_backend(model_dir, backend="torch"), pub,
                NodeSettings(wait_for_subscribers=1, wait_timeout=20), log=logs.append)
    sub = Subscriber(pub.endpoint, topics=["segnet/mask", "segnet/overlay"], limits=limits)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", node.run()), daemon=True)
    t.start()
    got = []
    while len(got) < 4:
        msg = sub.recv(timeout=30)
        assert msg is not None, f"deaf after {len(got)} masks"
        got.append(msg.topic)
    t.join(timeout=30)
    st = node.stats()
    sub.close()
    pub.close()
    assert got == ["segnet/mask"] * 4 and result.get("rc") == 0
    assert st["messages_oversize"] == 4 and pub.oversize == {"overlay": 4}
    assert sum("overlay messages of" in m and "not sent" in m for m in logs) == 1


def test_mask_headers_carry_class_pixels_and_echo_prints_areas(toy_model, capsys):
    from perception.stream.consumers.echo import class_areas

    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&frames=3", model_dir)
    sub = Subscriber(pub.endpoint, topics=["segnet/mask"])
    t.start()
    masks = [sub.recv(timeout=30) for _ in range(3)]
    t.join(timeout=30)
    sub.close()
    pub.close()
    for m in masks:
        counts = m.header["class_pixels"]
        assert len(counts) == 3 and sum(counts) == 64 * 48
        assert counts == np.bincount(m.data.ravel(), minlength=3)[:3].tolist()
    assert class_areas({"class_pixels": [25, 0, 75]}, ["bg", "a", "b"]) == "b 75.0% bg 25.0%"
    assert class_areas({"class_pixels": [1, 3]}) == "1 75.0% 0 25.0%"
    # perception-echo --areas names the classes from the node's info message.
    echo_rc, _ = _echo_while_node_runs(model_dir, "synthetic://?width=64&height=48&frames=2",
                                       ["--areas", "--timeout", "60"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("segnet/mask")]
    assert echo_rc == 0 and len(lines) == 2
    assert all(" | " in x and "%" in x and ("bg" in x or " a " in x or " b " in x) for x in lines), lines


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_hangup_and_interrupt_end_the_node_with_final_stats(toy_model, sig):
    _, model_dir = toy_model
    ep = _free_endpoint()
    proc = subprocess.Popen(
        _node_cmd("--source", "synthetic://?width=64&height=48", "--loop", "--model", str(model_dir),
                  "--backend", "torch", "--publish", ep, "--stats-period", "0.2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with Subscriber(ep, topics=["segnet/mask", "segnet/stats"]) as sub:
            assert sub.recv(timeout=60) is not None, "node published nothing"
            proc.send_signal(sig)
            final = None
            deadline = time.monotonic() + 20
            while final is None and time.monotonic() < deadline:
                msg = sub.recv(timeout=1)
                if msg is not None and msg.stream == "stats" and msg.data.get("final"):
                    final = msg
        assert proc.wait(timeout=20) == 0 and final is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_binding_beyond_loopback_warns(toy_model, capsys):
    _, model_dir = toy_model
    port = _free_endpoint().rsplit(":", 1)[1]
    assert node_main(["--source", "synthetic://?width=64&height=48&frames=1", "--model", str(model_dir),
                      "--backend", "torch", "--publish", f"tcp://0.0.0.0:{port}"]) == 0
    assert "reachable from other machines without encryption" in capsys.readouterr().err
    assert node_main(["--source", "synthetic://?width=64&height=48&frames=1", "--model", str(model_dir),
                      "--backend", "torch", "--publish", _free_endpoint()]) == 0
    assert "reachable from other machines" not in capsys.readouterr().err


def test_png_masks_equal_the_mono8_masks_of_the_same_frames(toy_model, tmp_path):
    """--mask-encoding png through a real node and subscriber: the client decodes each PNG to exactly
    the array mono8 carries (both compared with offline inference of the same frames)."""
    _, model_dir = toy_model
    video = make_video(tmp_path / "v.avi", n=6)
    frames = [f.image for f in open_source(str(video))]
    backend = load_backend(model_dir, backend="torch")
    for encoding in ("mono8", "png"):
        node, pub, t, result = start_node(str(video), model_dir, mask_encoding=encoding)
        got = {}
        with Subscriber(pub.endpoint, topics=["segnet/mask"]) as sub:
            t.start()
            deadline = time.monotonic() + 60
            while len(got) < 6 and time.monotonic() < deadline:
                if (msg := sub.recv(timeout=1)) is not None:
                    got[msg.header["seq"]] = msg
            t.join(timeout=30)
        pub.close()
        assert result.get("rc") == 0 and sorted(got) == list(range(6))
        for seq, msg in got.items():
            assert msg.header["encoding"] == encoding
            assert msg.header["step"] == (0 if encoding == "png" else 64)
            assert msg.data.dtype == np.uint8 and msg.data.shape == (48, 64)
            assert np.array_equal(msg.data, backend.infer(frames[seq][None]).labels[0])
            assert sum(msg.header["class_pixels"]) == 48 * 64


def _stream_with_class_map(video, backend, cmap, frames: int) -> tuple[dict, dict, dict]:
    """A node with ``cmap`` over ``video``: (masks by seq, colour masks by seq, the info map)."""
    pub = Publisher("tcp://127.0.0.1:*", "segnet")
    node = Node(open_source(str(video)), backend, pub, NodeSettings(wait_for_subscribers=1, wait_timeout=20),
                log=lambda m: None, class_map=cmap)
    t = threading.Thread(target=node.run, daemon=True)
    got, colors, info = {}, {}, None
    with Subscriber(pub.endpoint, topics=["segnet/mask", "segnet/info", "segnet/color_mask"]) as sub:
        t.start()
        deadline = time.monotonic() + 60
        while (len(got) < frames or len(colors) < frames or info is None) and time.monotonic() < deadline:
            msg = sub.recv(timeout=1)
            if msg is None:
                continue
            if msg.stream == "mask":
                got[msg.header["seq"]] = msg
            elif msg.stream == "color_mask":
                colors[msg.header["seq"]] = msg.data
            else:
                info = msg.data
        t.join(timeout=30)
    pub.close()
    return got, colors, info


def test_a_class_map_with_a_catch_all_drives_masks_info_and_counts(toy_model, tmp_path, capsys):
    """Toy classes bg, a, b mapped to fg = {a, b} and rest = "*": every mask equals the mapped offline
    labels, info lists the map's classes, class_pixels counts the mapped ids; a bad name fails at start."""
    from perception.core.class_map import load_class_map

    _, model_dir = toy_model
    video = make_video(tmp_path / "v.avi", n=5)
    cmap_file = tmp_path / "map.yaml"
    cmap_file.write_text('fg: {from: [a, b], color: [255, 0, 0]}\nrest: "*"\n')
    backend = load_backend(model_dir, backend="torch")
    cmap = load_class_map(cmap_file, list(backend.classes), list(backend.palette))
    got, colors, info = _stream_with_class_map(video, load_backend(model_dir, backend="torch"), cmap, 5)
    assert info["classes"] == ["fg", "rest"] and info["palette"][0] == [255, 0, 0]
    assert info["model_classes"] == ["bg", "a", "b"]
    frames = [f.image for f in open_source(str(video))]
    for seq, msg in got.items():
        mapped = cmap.lut[backend.infer(frames[seq][None]).labels[0]]
        assert np.array_equal(msg.data, mapped) and set(np.unique(msg.data)) <= {0, 1}
        assert msg.header["class_pixels"] == np.bincount(mapped.ravel(), minlength=2).tolist()
        fg = colors[seq][mapped == 0]  # BGR on the wire
        assert fg.size == 0 or (fg == [0, 0, 255]).all(), "the colour mask follows the map's colours"

    assert node_main(["--source", str(video), "--model", str(model_dir), "--backend", "torch",
                      "--class-map", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("road: [Road]\n")
    assert node_main(["--source", str(video), "--model", str(model_dir), "--backend", "torch",
                      "--class-map", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "class map not found" in err and "unknown class 'Road'; the model's classes are: bg, a, b" in err


def test_a_class_map_without_a_catch_all_leaves_the_rest_unlabelled_255(toy_model, tmp_path):
    """vision_msgs' convention: pixels no output class takes are 255 in the mono8 mask, black in the
    colour mask, not in class_pixels; info says unlabeled: 255."""
    from perception.core.class_map import load_class_map

    _, model_dir = toy_model
    video = make_video(tmp_path / "v.avi", n=3)
    cmap_file = tmp_path / "map.yaml"
    cmap_file.write_text("fg: {from: [a], color: [255, 0, 0]}\n")  # bg and b are in no output class
    backend = load_backend(model_dir, backend="torch")
    cmap = load_class_map(cmap_file, list(backend.classes), list(backend.palette))
    got, colors, info = _stream_with_class_map(video, backend, cmap, 3)
    assert info["classes"] == ["fg"] and info["unlabeled"] == 255
    frames = [f.image for f in open_source(str(video))]
    for seq, msg in got.items():
        labels = backend.infer(frames[seq][None]).labels[0]
        expected = np.where(labels == 1, 0, 255).astype(np.uint8)  # a -> fg (0), bg and b -> 255
        assert np.array_equal(msg.data, expected)
        assert msg.header["class_pixels"] == [int((expected == 0).sum())]
        assert (colors[seq][expected == 255] == 0).all(), "unlabelled pixels are black"
    assert any((m.data == 255).any() for m in got.values()), "the toy frames have background to leave out"


def test_the_per_frame_step_is_a_pure_function_of_frame_labels_and_wanted_streams():
    """render_streams without ZeroMQ or a backend: hand-made labels -> each stream's bytes."""
    from perception.inference.postprocess import palette_lut
    from perception.stream.node.pipeline import StreamStyle, render_streams
    from perception.stream.protocol import decode_message, encode_header, image_header

    palette = [(10, 20, 30), (200, 0, 0), (0, 200, 0)]
    style = StreamStyle(classes=["bg", "a", "b"], palette=palette, lut=palette_lut(palette), legend=False)
    labels = np.zeros((4, 6), np.uint8)
    labels[1:3, 2:5] = 2
    labels[0, 0] = 1
    image = np.full((4, 6, 3), 100, np.uint8)
    assert render_streams(image, labels, None, [], style) == {}
    out = render_streams(image, labels, None, ["mask", "color_mask", "overlay", "uncertainty"], style)
    assert set(out) == {"mask", "color_mask", "overlay"}  # no uncertainty without one
    assert np.array_equal(out["mask"].payload, labels) and out["mask"].extra == {"class_pixels": [17, 1, 6]}
    expected_color = np.array([palette[i][::-1] for i in labels.ravel()], np.uint8).reshape(4, 6, 3)  # BGR
    assert np.array_equal(out["color_mask"].payload, expected_color)
    blend = (expected_color.astype(float) + 100) / 2  # alpha 0.5 over a grey frame, by hand
    assert np.abs(out["overlay"].payload - blend).max() <= 0.5
    png = render_streams(image, labels, None, ["mask"], StreamStyle(**{**style.__dict__, "mask_encoding": "png"}))
    header = image_header(seq=0, stamp_ns=1, frame_id="c", image=png["mask"].image, encoding="png")
    assert np.array_equal(decode_message([b"segnet/mask", encode_header(header), png["mask"].payload]).data, labels)
    unc = render_streams(image, labels, np.full((4, 6), 0.25, np.float64), ["uncertainty"], style)
    assert unc["uncertainty"].encoding == "32FC1" and unc["uncertainty"].payload.dtype == np.float32


def test_the_final_stats_reach_a_slow_subscriber(toy_model):
    """A plain pyzmq subscriber that reads slowly (a busy recorder) falls behind the publisher's high-water
    mark: frames may be dropped for it (a live stream's policy), but the node's final stats message, which
    tells every consumer that the node has finished, must still arrive (issue 45, item 2)."""
    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=480&height=360&frames=24", model_dir, n_subs=1)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 64 << 10)  # small kernel buffers: a slow reader's queue fills after a few frames
    for topic in (b"segnet/overlay", b"segnet/stats"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(pub.endpoint)
    t.start()
    final, overlays = False, 0
    deadline = time.monotonic() + 90
    # The slowest consumer: it reads nothing until the node has processed every frame (polling the
    # node's counter), so its queue overflows whatever the machine's speed; then it reads.
    while node.counters.processed < 24 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        while not final and time.monotonic() < deadline and (t.is_alive() or sub.poll(3000)):
            if not sub.poll(200):
                continue
            topic, header, payload = sub.recv_multipart()
            if topic == b"segnet/overlay":
                overlays += 1
                time.sleep(0.05)  # still slow while it catches up
            else:
                import msgpack

                final = msgpack.unpackb(payload).get("final") is True
    finally:
        t.join(timeout=30)
        sub.close(linger=0)
        pub.close()
    assert result.get("rc") == 0
    assert overlays < 24, "the subscriber was not slow enough to fall behind: the test proves nothing"
    assert final, f"the final stats never arrived ({overlays} of 24 overlays read)"
    assert node.stats()["slow_subscriber_events"] >= 1  # the node says a subscriber fell behind


def test_a_slow_consumer_counts_every_frame_it_missed(toy_model):
    """perception-record paused for seconds used to say "recorded 263 frames" with 137 missing between them:
    the Subscriber now counts what never arrived (seq gaps, and the tail after the last frame received, from
    the node's final stats), and received + missed = sent."""
    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=480&height=360&frames=40", model_dir, n_subs=1)
    sub = Subscriber(pub.endpoint, topics=["segnet/overlay", "segnet/stats"], rcvhwm=1)
    t.start()
    got, final = [], False
    deadline = time.monotonic() + 120
    # A recorder stopped (Ctrl-Z) while the node runs: it reads nothing until the node has processed every
    # frame (polling the node's counter), so its queue overflows whatever the machine's speed; then it reads.
    while node.counters.processed < 40 and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        while not final and time.monotonic() < deadline:
            msg = sub.recv(timeout=5)
            if msg is None:
                break
            if msg.stream == "overlay":
                got.append(msg.header["seq"])
                time.sleep(0.05)  # still slow while it catches up
            final = msg.stream == "stats" and msg.data.get("final") is True
    finally:
        t.join(timeout=30)
        sub.close()
        pub.close()
    missed = sub.missed["segnet/overlay"]
    assert final and result.get("rc") == 0
    assert missed > 0, "the consumer was not slow enough to miss anything: the test proves nothing"
    # Gaps between frames received, and the frames after the last one (from the final stats' frames_captured).
    assert got[0] == 0 and len(got) + missed == 40, (got, missed)
    assert sub.losses().startswith(f"{missed} frames missed (seq gaps: segnet/overlay {missed})")


def test_record_of_masks_only_still_ends_with_the_node(toy_model, tmp_path):
    """perception-record --streams mask used to wait for ever after the node had finished: it did not
    subscribe to stats, whose final message says so (issue 45, item 9). It listens for it now, records no
    stats it was not asked for, and exits 0 when the node does."""
    from perception.stream.consumers.record import main as record_main

    _, model_dir = toy_model
    node, pub, t, result = start_node("synthetic://?width=64&height=48&frames=4", model_dir)
    out = tmp_path / "rec"
    rec = {}
    rt = threading.Thread(target=lambda: rec.setdefault("rc", record_main([pub.endpoint, "--out", str(out),
                                                                            "--streams", "mask"])),
                          daemon=True)  # a recorder that never ends must not hold the test process
    rt.start()
    t.start()
    t.join(timeout=60)
    rt.join(timeout=60)
    alive = rt.is_alive()
    pub.close()
    assert not alive, "perception-record --streams mask did not end when the node finished"
    assert rec.get("rc") == 0 and len(list((out / "mask").glob("*.png"))) == 4
    assert not (out / "stats.jsonl").exists()
