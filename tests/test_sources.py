"""Frame sources: every URI kind, and clear errors for bad ones."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import make_video
from perception.node.sources import SourceError, SourceOptions, open_source


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
    resized = next(iter(open_source(f"file://{path}", SourceOptions(resize=(32, 24)))))
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
