"""The node against a real RTSP server (GStreamer's gst-rtsp-server, see tests/support/rtsp_server.py):
a camera that comes up after the node, goes away, comes back, and finally goes away for good."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_endpoint, start_node
from perception.stream.client import Subscriber
from perception.stream.node.sources import SourceOptions

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).parent / "support" / "rtsp_server.py"


def _gst_rtsp_available() -> bool:
    try:
        return subprocess.run(
            [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import GstRtspServer"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _gst_rtsp_available(), reason=(
    "needs GStreamer's RTSP server for the system python3 (Debian: python3-gi gir1.2-gst-rtsp-server-1.0 "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad; .ci/run installs them)"))


def _h264_video(path: Path, seconds: int = 60, fps: int = 25) -> Path:
    import av

    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    stream.codec_context.gop_size = fps  # a keyframe a second: a reconnecting client decodes soon
    for i in range(seconds * fps):
        img = np.full((120, 160, 3), 90, np.uint8)
        img[40:, (i * 3) % 130 : (i * 3) % 130 + 30] = (20, 200, 40)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    return path


class _RtspServer:
    def __init__(self, port: int, video: Path) -> None:
        self.port, self.video = port, video
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(self.port), str(self.video)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "ready", "the RTSP server did not start"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def test_node_rides_out_a_real_rtsp_camera_coming_and_going(toy_model, tmp_path):
    _, model_dir = toy_model
    server = _RtspServer(int(free_endpoint().rsplit(":", 1)[1]), _h264_video(tmp_path / "camera.mp4"))
    uri = f"rtsp://127.0.0.1:{server.port}/stream"
    # Started before its camera: the node waits for it under the reconnect policy, not an error.
    node, pub, t, result = start_node(uri, model_dir, n_subs=1, source_options=SourceOptions(
        reconnect_attempts=5, reconnect_backoff_s=0.3, stall_timeout=2.0), stats_period=0.2)
    masks: list[int] = []
    states: list[str] = []
    last_stats: dict = {}

    def pump(until, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = sub.recv(timeout=0.2)
            if msg is not None and msg.stream == "mask":
                masks.append(msg.header["seq"])
            elif msg is not None and msg.stream == "stats":
                last_stats.clear()
                last_stats.update(msg.data)
                states.append(msg.data["source_state"])
            if until():
                return True
        return False

    try:
        with Subscriber(pub.endpoint, topics=["segnet/mask", "segnet/stats"]) as sub:
            t.start()
            assert pump(lambda: "reconnecting" in states), "a camera not up yet reads as reconnecting"
            assert not masks
            server.start()
            assert pump(lambda: len(masks) >= 5), "masks once the camera is up"

            server.kill()  # the camera goes away...
            assert pump(lambda: states[-1] == "reconnecting"), f"states seen: {states[-5:]}"
            before = len(masks)
            t_back = time.monotonic()
            server.start()  # ...and comes back
            assert pump(lambda: len(masks) > before), "masks resume after the camera returns"
            print(f"rtsp: masks resumed {time.monotonic() - t_back:.1f} s after the server came back")
            assert pump(lambda: len(masks) >= before + 5)
            assert last_stats["source_reconnects"] >= 1
            assert masks == sorted(masks) and len(set(masks)) == len(masks), "seq keeps counting up"

            server.kill()  # gone for good: the node gives up after its attempts, and says so
            t_gone = time.monotonic()
            t.join(timeout=60)
            print(f"rtsp: the node gave up {time.monotonic() - t_gone:.1f} s after the server went for good")
            assert not t.is_alive()
            pump(lambda: bool(last_stats.get("final")), timeout=5)
    finally:
        server.kill()
        node.stop()
        t.join(timeout=30)
        pub.close()
    assert result.get("rc") == 1, "a source lost for good is an error exit"
    assert last_stats.get("final") is True and last_stats["source_state"] == "failed"
