"""The Python API (``from perception import Segmenter``): the same labels and pictures as perception-predict,
through the same choice of backend, and no PyTorch imported for the runtime path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo_frames(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(ROOT / "perception" / "assets" / "demo_camvid_0016E5.mp4"))
    frames = []
    while len(frames) < n:
        ok, frame = cap.read()
        assert ok
        frames.append(cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA))
    cap.release()
    return frames


def test_segmenter_equals_perception_predict(tmp_path):
    from perception import Segmenter
    from perception.inference.predict import main as predict_main

    frames = _demo_frames(2, (270, 400))  # not the network's size: both resize the same way
    images = tmp_path / "images"
    images.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(images / f"f{i}.png"), f)
    assert predict_main(["--model", "segnet_basic_camvid", str(images), "--out", str(tmp_path / "out"),
                         "--save-labels"]) == 0
    with Segmenter("segnet_basic_camvid") as seg:
        assert seg.backend.name == "onnxruntime" and seg.path.name == "model_int8.onnx"
        assert seg.classes[3] == "Road" and len(seg.palette) == len(seg.classes)
        results = seg.batch(np.stack(frames))
        for i, (frame, res) in enumerate(zip(frames, results)):
            labels = cv2.imread(str(tmp_path / "out" / f"f{i}_labels.png"), cv2.IMREAD_UNCHANGED)
            assert res.labels.shape == frame.shape[:2] and res.labels.dtype == np.uint8
            assert np.array_equal(res.labels, labels)
            assert np.array_equal(res.color(), cv2.imread(str(tmp_path / "out" / f"f{i}_mask.png")))
            assert np.array_equal(seg(frame).labels, res.labels)  # one frame at a time: the same
            assert res.overlay(frame).shape == frame.shape and "Road" in res.present()
        with pytest.raises(ValueError, match="labels only"):
            seg(frames[0], probs=True)
        with pytest.raises(ValueError, match="computes no uncertainty"):
            seg(frames[0], uncertainty=True)
        with pytest.raises(ValueError, match="one uint8"):
            seg(np.stack(frames))


def test_segmenter_uncertainty_from_a_bayesian_model():
    pytest.importorskip("torch")
    from perception import Segmenter

    frame = _demo_frames(1, (90, 120))[0]
    with Segmenter("bayesian_segnet_basic_camvid", mc_samples=2) as seg:
        assert seg.backend.name == "torch" and seg.has_uncertainty
        res = seg(frame, uncertainty=True, probs=True)
        assert res.uncertainty.shape == frame.shape[:2] and np.isfinite(res.uncertainty).all()
        assert res.probs.shape == (len(seg.classes), *frame.shape[:2])
        assert np.allclose(res.probs.sum(0), 1.0, atol=1e-3)


def test_importing_the_api_loads_no_torch():
    code = ("import sys\nfrom perception import Segmenter\nseg = Segmenter('segnet_basic_camvid')\n"
            "import numpy as np\nseg(np.zeros((60, 80, 3), np.uint8))\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
