"""The backend contract, parametrised over the one backend table (as smp's BaseModelTester): every
backend the table names is a Backend, runs the files its table row says, and returns what the
interface promises; the CPU backends agree with each other on the same model."""

from __future__ import annotations

import numpy as np
import pytest

from perception.inference import BACKEND_CHOICES, BACKEND_TABLE, Backend, backend_kind, load_backend

CPU_BACKENDS = [name for name, spec in BACKEND_TABLE.items() if not spec.gpu_only]


@pytest.mark.parametrize("name", list(BACKEND_TABLE))
def test_each_table_row_names_a_backend_class(name):
    spec = BACKEND_TABLE[name]
    try:
        cls = spec.load_class()
    except ImportError as e:  # only a backend's own heavy dependency may be missing, never its module
        pytest.skip(f"{name}: {e}")
    assert issubclass(cls, Backend) and cls.name == name
    for suffix in spec.suffixes:
        assert backend_kind("model" + suffix if suffix != "folder" else ".") == name
    assert name in BACKEND_CHOICES and BACKEND_CHOICES[0] == "auto"


@pytest.fixture(scope="module")
def model_files(toy_model, tmp_path_factory):
    """The toy model as each CPU backend runs it: its folder (torch) and its ONNX export (onnxruntime)."""
    from perception.export.onnx import ExportOptions, export_onnx

    _, folder = toy_model
    onnx = export_onnx(folder, tmp_path_factory.mktemp("onnx") / "toy.onnx", ExportOptions(outputs=("labels", "probs")))
    return {"torch": folder, "onnxruntime": onnx}


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_the_interface_contract(name, model_files):
    frames = np.random.default_rng(0).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)  # not the network size
    with load_backend(model_files[name], backend=name) as be:
        assert be.name == name and be.classes == ["bg", "a", "b"] and len(be.palette) == 3
        res = be.infer(frames, probs=be.capabilities.probs)
        assert res.labels.dtype == np.uint8 and res.labels.shape == (3, 50, 70)
        assert res.labels.max() < 3
        if be.capabilities.probs:
            assert res.probs.shape == (3, 3, 50, 70)
            np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-3)
        single = be.infer(frames[0])  # one frame, no batch axis
        assert single.labels.shape == (1, 50, 70)
        with pytest.raises(ValueError, match="uint8 frames"):
            be.infer(frames.astype(np.float32))


def test_cpu_backends_agree_on_the_same_model(model_files):
    frames = np.random.default_rng(1).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    labels = {}
    for name in CPU_BACKENDS:
        with load_backend(model_files[name], backend=name) as be:
            labels[name] = be.infer(frames).labels
    first, *rest = labels.values()
    for other in rest:
        assert (other == first).mean() > 0.999


def test_unknown_backends_and_files_are_clear_errors(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a model folder or one of .onnx, .engine, .plan"):
        backend_kind(f)
    with pytest.raises(ValueError, match="backend 'tflite' is not available"):
        load_backend(f, backend="tflite")
