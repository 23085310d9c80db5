"""Frame sources: every URI kind, and clear errors for bad ones."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import make_video
from perception.stream.node.sources import SourceError, SourceOptions, open_source


def test_video_file_frames_and_options(tmp_path):
    path = make_video(tmp_path / "v.avi", n=9)
    frames = list(open_source(str(path)))
    assert [f.seq for f in frames] == list(range(9)) and frames[0].image.shape == (48, 64, 3)
    assert all(frames[i].stamp_ns <= frames[i + 1].stamp_ns for i in range(8))
    skipped = list(open_source(str(path), SourceOptions(skip=2)))
    assert [f.index for f in skipped] == [0, 3, 6] and [f.seq for f in skipped] == [0, 1, 2]
    assert len(list(open_source(str(path), SourceOptions(max_frames=4)))) == 4
    looped = list(open_source(str(path), SourceOptions(loop=True, max_frames=20)))
    assert len(looped) == 20
    resized = next(iter(open_source(f"file://{path}", SourceOptions(resize=(24, 32)))))
    assert resized.image.shape == (24, 32, 3)


def test_realtime_paces_a_file(tmp_path):
    import time

    path = make_video(tmp_path / "v.avi", n=6, fps=20.0)
    t0 = time.monotonic()
    list(open_source(str(path), SourceOptions(realtime=True)))
    assert time.monotonic() - t0 >= 5 / 20.0 * 0.9


def test_images_folder_glob_and_single(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((10, 12, 3), i * 50, np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    assert len(list(open_source(str(tmp_path)))) == 3
    assert len(list(open_source(str(tmp_path / "f[01].png")))) == 2
    (single,) = list(open_source(str(tmp_path / "f2.png")))
    assert single.image[0, 0, 0] == 100


def test_synthetic():
    frames = list(open_source("synthetic://?width=40&height=30&frames=5"))
    assert len(frames) == 5 and frames[0].image.shape == (30, 40, 3)
    assert not np.array_equal(frames[0].image, frames[4].image)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: str(p / "missing.mp4"), "not found"),
        (lambda p: (p / "fake.mp4").write_text("not a video") and str(p / "fake.mp4"), "not a"),
        (lambda p: (p / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000)) and str(p / "junk.mp4"), "not a"),
        (lambda p: (p / "bad.png").write_text("no") and str(p / "bad.png"), "not a readable image"),
        (lambda p: (p / "doc.pdf").write_text("x") and str(p / "doc.pdf"), "neither a video"),
        (lambda p: "/dev/video99", "camera /dev/video99 is not there"),
        (lambda p: str(p / "*.png"), "no images match"),
        (lambda p: "synthetic://?width=abc", "must be a number"),
    ],
)
def test_bad_sources_fail_with_one_line_errors(tmp_path, make, match):
    with pytest.raises(SourceError, match=match) as e:
        open_source(make(tmp_path))
    assert "\n" not in str(e.value)


class _FlakyCapture:
    """Stands in for cv2.VideoCapture: yields `good` frames, then fails until reopened."""

    opens = 0

    def __init__(self, *args, **kwargs):
        type(self).opens += 1
        self.left = 3

    def isOpened(self):
        return type(self).opens != 2  # the first reconnect attempt fails, the second succeeds

    def get(self, prop):
        return 30.0

    def read(self):
        if self.left == 0:
            return False, None
        self.left -= 1
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self):
        pass


def test_live_source_reconnects_with_backoff_then_gives_up(monkeypatch):
    from perception.stream.node import sources as S

    _FlakyCapture.opens = 0
    monkeypatch.setattr(S.cv2, "VideoCapture", _FlakyCapture)
    src = S.open_source("rtsp://camera.invalid/stream", SourceOptions(reconnect_attempts=2, reconnect_backoff_s=0.01,
                                                                       max_frames=6))
    assert src.live
    frames = list(src)
    # 3 frames, a failed reopen, a successful one, 3 more frames.
    assert [f.seq for f in frames] == list(range(6)) and src.reconnects == 2

    class Dead(_FlakyCapture):
        def isOpened(self):
            return type(self).opens == 1  # opens once, never again

    Dead.opens = 0
    monkeypatch.setattr(S.cv2, "VideoCapture", Dead)
    src = S.open_source("rtsp://camera.invalid/stream", SourceOptions(reconnect_attempts=2, reconnect_backoff_s=0.01))
    with pytest.raises(SourceError, match="2 reconnect attempts failed"):
        list(src)
    assert src.state == "failed"


def test_a_stream_not_up_at_start_gets_the_same_reconnect_policy(monkeypatch):
    from perception.stream.node import sources as S

    class LateCamera(_FlakyCapture):
        def isOpened(self):
            return type(self).opens >= 3  # down at start, up at the second reconnect attempt

    LateCamera.opens = 0
    monkeypatch.setattr(S.cv2, "VideoCapture", LateCamera)
    src = S.open_source("rtsp://camera.invalid/s", SourceOptions(reconnect_attempts=3, reconnect_backoff_s=0.01,
                                                                  max_frames=2))
    assert src.state == "reconnecting", "a live stream that is not up yet is retried, not an error"
    assert [f.seq for f in src] == [0, 1] and src.reconnects == 2

    class NeverUp(_FlakyCapture):
        def isOpened(self):
            return False

    monkeypatch.setattr(S.cv2, "VideoCapture", NeverUp)
    src = S.open_source("rtsp://camera.invalid/s", SourceOptions(reconnect_attempts=2, reconnect_backoff_s=0.01))
    with pytest.raises(SourceError, match="never opened, and 2 reconnect attempts failed"):
        list(src)
    assert src.state == "failed"
    with pytest.raises(SourceError, match="cannot open"):  # no retries asked for: an error at once
        S.open_source("rtsp://camera.invalid/s", SourceOptions(reconnect_attempts=0))


def test_interrupt_ends_a_reconnect_wait_at_once(monkeypatch):
    """Ctrl-C while a stream is down: the source stops waiting (a 60 s backoff would otherwise hold it)."""
    import threading

    from perception.stream.node import sources as S

    class NeverUp(_FlakyCapture):
        def isOpened(self):
            return False

    monkeypatch.setattr(S.cv2, "VideoCapture", NeverUp)
    src = S.open_source("rtsp://camera.invalid/s", SourceOptions(reconnect_attempts=5, reconnect_backoff_s=60))
    frames = []
    t = threading.Thread(target=lambda: frames.extend(src), daemon=True)
    t.start()
    src.interrupt()
    t.join(timeout=10)
    assert not t.is_alive() and frames == []


def test_stalled_is_reported(monkeypatch):
    import time

    from perception.stream.node import sources as S

    _FlakyCapture.opens = 0
    monkeypatch.setattr(S.cv2, "VideoCapture", _FlakyCapture)
    src = S.open_source("rtsp://camera.invalid/s", SourceOptions(stall_timeout=0.05, max_frames=1))
    list(src)
    time.sleep(0.1)
    assert src.stalled()


def test_a_corrupt_image_in_a_folder_is_skipped_warned_and_counted(tmp_path, capsys):
    import cv2

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    (tmp_path / "f1.png").write_bytes(b"not a png at all")
    source = open_source(str(tmp_path))
    frames = list(source)
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 80] and source.unreadable == 1
    assert "skipping" in capsys.readouterr().err and source.state == "ended"


def test_a_truncated_video_says_it_ended_early(tmp_path, capsys):
    """A faststart MP4 (index first) cut short: frames up to the cut, then a warning naming the shortfall."""
    import av

    path = tmp_path / "cut.mp4"
    out = av.open(str(path), "w", options={"movflags": "faststart"})
    stream = out.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for i in range(60):
        img = np.full((48, 64, 3), (i * 4) % 255, np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    whole = list(open_source(str(path)))
    assert len(whole) == 60 and "truncated" not in capsys.readouterr().err
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    source = open_source(str(path))
    frames = list(source)
    assert 0 < len(frames) < 60 and source.truncated
    err = capsys.readouterr().err
    assert f"ended after {len(frames)} of the 60 frames" in err and "truncated" in err


def test_a_fifo_in_an_image_folder_is_left_out_and_names_are_printed_safely(tmp_path, capsys):
    """Issue 45, item 10: a FIFO named *.png hung the node (still 'streaming'); a newline in a file name
    forged a log line. Only regular files are read now, and skipped names are printed with repr."""
    import os

    import cv2

    for i in range(2):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    os.mkfifo(tmp_path / "a_fifo.png")
    (tmp_path / "forged\nwarning: all good.png").write_bytes(b"not a png")
    source = open_source(str(tmp_path))
    frames = list(source)  # returns: the FIFO is never opened
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 40] and source.state == "ended"
    err = capsys.readouterr().err
    assert "a_fifo.png" not in err and "'" + str(tmp_path / "forged") + "\\nwarning: all good.png'" in err
    assert not any(line.startswith("warning: all good") for line in err.splitlines())


def test_an_image_bomb_is_refused_from_its_header(tmp_path, capsys):
    """Issue 45, item 12: a 12000x12000 PNG of 157 KB took the node to 2 GB before any limit applied. The
    header's size is checked against the pixels a frame may have before anything is decoded."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    side = 12000
    raw = zlib.compress((b"\x00" + b"\x00" * side) * side, 9)  # grey rows, filter 0: ~100 KB compressed
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(png)
    import cv2

    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((8, 8, 3), np.uint8))
    source = open_source(str(tmp_path))
    frames = list(source)
    assert len(frames) == 1 and source.unreadable == 1
    assert "12000x12000 pixels, over the" in capsys.readouterr().err
    with pytest.raises(SourceError, match="12000x12000 pixels"):
        open_source(str(tmp_path / "bomb.png"))


def test_a_damaged_packet_does_not_end_a_video(tmp_path, capsys):
    """Issue 45, item 6: the demo clip with 64 KiB of random bytes over its middle gave 24 frames, then the
    source ended; 46 of its 48 frames decode when a failed read is skipped while the index says more follow."""
    from pathlib import Path

    clip = Path(__file__).resolve().parents[1] / "perception" / "assets" / "demo_camvid_0016E5.mp4"
    data = bytearray(clip.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 65536] = np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    source = open_source(str(damaged))
    frames = list(source)
    err = capsys.readouterr().err
    assert len(frames) >= 40 and source.state == "ended", len(frames)
    assert source.unreadable >= 1 and err.count("skipping damaged frames") == 1
    whole = list(open_source(str(clip)))  # an intact file: nothing skipped, nothing said
    assert len(whole) == 48 and "skipping" not in capsys.readouterr().err
