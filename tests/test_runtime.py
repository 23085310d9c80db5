"""The torch-free runtime: the node runs a shipped model folder (its model.onnx) where PyTorch cannot be
imported, and the shipped graphs are the shipped weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from perception.stream.client import Subscriber

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models"
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None; "


def _free_endpoint() -> str:
    s = zmq.Context.instance().socket(zmq.PUB)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.parametrize("name", ["segnet_basic_camvid", "bayesian_segnet_basic_camvid"])
def test_shipped_onnx_is_exported_from_the_shipped_weights(name):
    from perception.core.card import load_card
    from perception.core.fileio import sha256_file
    from perception.core.onnx_meta import read_card_from_onnx, read_onnx_metadata

    folder = SHIPPED / name
    meta = read_onnx_metadata(folder / "model.onnx")
    assert meta["segnet.source_sha256"] == sha256_file(folder / "weights.safetensors"), "re-export model.onnx"
    assert meta["segnet.tta"] == "none"
    assert read_card_from_onnx(folder / "model.onnx").classes == load_card(folder).classes


def test_shipped_onnx_predicts_what_the_weights_predict(camvid_root):
    from perception.inference import load_backend
    from perception.data.folder import read_image_rgb

    img = read_image_rgb(sorted((camvid_root / "val").glob("*.png"))[0])
    frame = np.ascontiguousarray(img[..., ::-1])[None]
    folder = SHIPPED / "segnet_basic_camvid"
    a = load_backend(folder / "model.onnx").infer(frame).labels
    b = load_backend(folder, backend="torch").infer(frame).labels
    assert (a == b).mean() > 0.999


def test_node_runs_a_shipped_model_without_torch():
    ep = _free_endpoint()
    code = NO_TORCH + (
        "from perception.stream.node.cli import main; "
        f"sys.exit(main(['--source', 'synthetic://?width=480&height=360&frames=3', '--publish', '{ep}', "
        "'--wait-for-subscribers', '1', '--wait-timeout', '60', '--log-period', '0']))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        masks = []
        with Subscriber(ep, topics=["segnet/mask", "segnet/info"]) as sub:
            info = None
            while len(masks) < 3:
                msg = sub.recv(timeout=90)
                assert msg is not None, "the node published nothing"
                if msg.topic.endswith("/mask"):
                    masks.append(msg)
                else:
                    info = msg
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert all(m.data.shape == (360, 480) and m.data.dtype == np.uint8 for m in masks)
        from perception.core.zoo import default_model_name

        # The default model, its int8 graph (--precision auto; the card shows it within 0.5 points).
        assert f"onnxruntime backend, model {default_model_name()}, int8 model_int8.onnx" in err, err
        if info is not None:
            assert info.data["classes"][0] == "Sky"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_folder_without_onnx_needs_torch_and_says_so(toy_model, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(toy_model[1], folder)
    code = NO_TORCH + (
        "from perception.inference.resolve import resolve_backend\n"
        f"try:\n    resolve_backend({str(folder)!r})\nexcept RuntimeError as e:\n    print('ERR', e)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "ERR" in r.stdout and "segnet-perception[train]" in r.stdout, r.stdout + r.stderr


def test_backends_declare_their_capabilities(toy_model, toy_bayesian_model, tmp_path):
    from perception.export.onnx import ExportOptions, export_onnx
    from perception.inference import load_backend

    assert load_backend(toy_bayesian_model[1], backend="torch").capabilities.uncertainty
    plain = load_backend(toy_model[1], backend="torch").capabilities
    assert not plain.uncertainty and plain.probs and plain.batch is None
    labels_only = export_onnx(toy_model[1], tmp_path / "a.onnx", ExportOptions(batch=2))
    caps = load_backend(labels_only).capabilities
    assert caps.batch == 2 and not caps.probs and not caps.uncertainty
    with_probs = export_onnx(toy_model[1], tmp_path / "b.onnx", ExportOptions(outputs=("labels", "probs")))
    assert load_backend(with_probs).capabilities.probs


def test_predict_runs_the_shipped_model_without_torch(tmp_path):
    """perception-predict resolves its model as the node does: the shipped folder's model.onnx, no torch."""
    import cv2

    img = tmp_path / "frame.png"
    cv2.imwrite(str(img), np.full((360, 480, 3), 100, np.uint8))
    code = NO_TORCH + (
        "from perception.inference.predict import main; "
        f"sys.exit(main([{str(img)!r}, '--out', {str(tmp_path / 'out')!r}, '--save-labels']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    labels = cv2.imread(str(tmp_path / "out" / "frame_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (360, 480) and labels.max() < 11


def test_torch_backend_uncertainty_map_is_the_measure_asked_for(toy_bayesian_model):
    """The default map is the predictive entropy of the MC samples' mean (checked against the mean
    probabilities the same call returns, in float64); ``variance`` is the paper's map of the same samples."""
    import torch

    from perception.inference import load_backend

    frames = np.random.default_rng(0).integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
    results = {}
    for measure in ("entropy", "variance"):
        backend = load_backend(toy_bayesian_model[1], backend="torch", mc_samples=4, uncertainty_measure=measure)
        torch.manual_seed(3)
        results[measure] = backend.infer(frames, probs=True, uncertainty=True)
    assert load_backend(toy_bayesian_model[1], backend="torch").uncertainty_measure == "entropy"
    p = results["entropy"].probs.astype(np.float64)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    np.testing.assert_allclose(results["entropy"].uncertainty, entropy, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(results["variance"].probs, results["entropy"].probs)  # the same samples
    variance = results["variance"].uncertainty
    assert variance.max() <= 0.25 and variance.max() > 0
    assert not np.allclose(variance, results["entropy"].uncertainty)
    with pytest.raises(ValueError, match="uncertainty measure must be one of"):
        load_backend(toy_bayesian_model[1], backend="torch", uncertainty_measure="std")
