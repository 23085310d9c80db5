"""ONNX export in all three unpooling forms, checked with ONNX Runtime against PyTorch on CamVid frames."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest

from perception.inference import load_backend
from perception.export.check import op_histogram, plugin_nodes, tensorrt_problems
from perception.export.cli import main as export_main
from perception.export.onnx import ExportOptions, export_onnx, read_card_from_onnx
from perception.export.trt_ops import TENSORRT_SUPPORTED_OPS

FORMS = ["native", "plugin", "onnx"]


@pytest.fixture(scope="module")
def val_frames(camvid_root):
    names = sorted((camvid_root / "val").iterdir())[::34][:3]
    return np.stack([cv2.imread(str(p)) for p in names])


@pytest.fixture(scope="module")
def exported(shipped_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return {
        form: export_onnx(shipped_model, d / f"{form}.onnx", ExportOptions(unpool=form, outputs=("labels", "probs")))
        for form in FORMS
    }


@pytest.fixture(scope="module")
def torch_reference(shipped_model, val_frames):
    return load_backend(shipped_model).infer(val_frames, probs=True)


@pytest.mark.parametrize("form", FORMS)
def test_onnxruntime_matches_pytorch_on_camvid_val(form, exported, val_frames, torch_reference):
    res = load_backend(exported[form]).infer(val_frames, probs=True)
    assert res.labels.dtype == np.uint8 and res.labels.shape == val_frames.shape[:3]
    agreement = (res.labels == torch_reference.labels).mean()
    assert agreement >= 0.999, f"{form}: {agreement:.5f}"
    # fp32 PyTorch itself is ~1e-2 from float64 here (7x7 convolutions); the export must not be worse.
    assert np.abs(res.probs - torch_reference.probs).max() < 2e-2
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-4)


def test_graph_io_contract_and_metadata(exported, shipped_model):
    m = onnx.load(str(exported["native"]))
    (inp,) = m.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 360, 480, 3]
    outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    assert outs == {"labels": onnx.TensorProto.UINT8, "probs": onnx.TensorProto.FLOAT}
    card = read_card_from_onnx(exported["native"])
    assert card.classes[0] == "Sky" and len(card.palette) == 11
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["segnet.classes"]) == card.classes and len(meta["segnet.source_sha256"]) == 64
    # Batch norm is folded: no BatchNormalization nodes remain.
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)


@pytest.mark.parametrize("form", ["native", "plugin"])
def test_tensorrt_parsable_op_set(form, exported):
    assert tensorrt_problems(exported[form]) == []
    hist = op_histogram(exported[form])
    std_ops = {op for (dom, op) in hist if dom == ""}
    assert std_ops <= TENSORRT_SUPPORTED_OPS
    if form == "native":
        assert not any(dom for (dom, _) in hist), "native form must use standard ops only"


def test_plugin_form_nodes_attributes_and_functions(exported):
    m = onnx.load(str(exported["plugin"]))
    nodes = plugin_nodes(m)
    assert sorted({n.op_type for n in nodes}) == ["MaxPoolArgmax", "MaxUnpool2d"] and len(nodes) == 8
    for n in nodes:
        attrs = {a.name: (a.s.decode() if a.type == onnx.AttributeProto.STRING else a.i) for a in n.attribute}
        assert attrs == {"plugin_version": "1", "plugin_namespace": "segnet", "aot": 1}
        assert n.domain == "segnet"
    pool = next(n for n in nodes if n.op_type == "MaxPoolArgmax")
    assert len(pool.input) == 1 and len(pool.output) == 2
    unpool = next(n for n in nodes if n.op_type == "MaxUnpool2d")
    assert len(unpool.input) == 3  # values, indices, the pre-pool tensor whose shape is the output's
    funcs = {(f.domain, f.name) for f in m.functions}
    assert funcs == {("segnet", "MaxPoolArgmax"), ("segnet", "MaxUnpool2d")}
    assert {(o.domain, o.version) for o in m.opset_import} >= {("segnet", 1)}
    domains = [o.domain for o in m.opset_import]
    assert len(domains) == len(set(domains)), domains  # one entry per domain (segnet was listed twice)


def test_onnx_form_is_rejected_by_the_tensorrt_check(exported):
    problems = tensorrt_problems(exported["onnx"])
    assert any("MaxUnpool" in p for p in problems) and any("Indices" in p for p in problems)


@pytest.mark.parametrize("form", ["native", "plugin"])
def test_dynamic_shapes(form, shipped_model, tmp_path):
    path = export_onnx(shipped_model, tmp_path / "d.onnx", ExportOptions(unpool=form, batch=None, dynamic_size=True))
    be = load_backend(path)
    frames = np.random.default_rng(0).integers(0, 256, (2, 352, 640, 3), dtype=np.uint8)
    frames = cv2.GaussianBlur(frames.reshape(-1, 640, 3), (9, 9), 3).reshape(2, 352, 640, 3)
    res = be.infer(frames)
    assert res.labels.shape == (2, 352, 640)
    # The torch backend resizes to the trained size; compare with the model run at the frames' own size.
    import torch

    from perception.data.transforms import normalize
    from perception.models import load

    model = load(shipped_model)
    x = normalize(torch.from_numpy(frames[..., ::-1].copy()).permute(0, 3, 1, 2), model.card.input)
    with torch.no_grad():
        want = model(x).argmax(1).numpy()
    assert (res.labels == want).mean() >= 0.999


def test_fp16_export_runs_and_mostly_agrees(shipped_model, val_frames, torch_reference, tmp_path):
    path = export_onnx(shipped_model, tmp_path / "h.onnx",
                       ExportOptions(unpool="plugin", fp16=True, batch=None, dynamic_size=True))
    m = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    res = load_backend(path).infer(val_frames)
    assert (res.labels == torch_reference.labels).mean() >= 0.99


def test_export_cli(shipped_model, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_main(["--model", str(shipped_model), "--out", str(out), "--unpool", "plugin",
                        "--outputs", "labels,logits"]) == 0
    text = capsys.readouterr().out
    assert "TensorRT parser check: ok" in text and "labels agree" in text
    assert export_main(["--model", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert export_main(["--model", str(shipped_model), "--out", str(out), "--outputs", "masks"]) == 2
    with pytest.raises(SystemExit):
        export_main(["--model", str(shipped_model), "--out", str(out), "--size", "10x10"])


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_every_registered_model_exports_at_360x480(form, tmp_path):
    """Every architecture, every unpooling form, at the CamVid size; ONNX Runtime agrees with PyTorch."""
    import torch

    from perception.models import get_model, list_models, save
    from perception.models.io import ModelCard
    from perception.models.registry import model_config

    frame = np.random.default_rng(0).integers(0, 256, (1, 360, 480, 3), dtype=np.uint8)
    frame = cv2.GaussianBlur(frame[0], (15, 15), 5)[None]
    for name in list_models():
        torch.manual_seed(0)
        model = get_model(name, num_classes=11).eval()
        with torch.no_grad():  # give batch norm non-trivial statistics so folding is exercised
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        card = ModelCard(id=name, architecture=model_config(model), classes=[f"c{i}" for i in range(11)],
                         palette=[[i, i, i] for i in range(11)])
        save(model, tmp_path / name, card)
        path = export_onnx(tmp_path / name, tmp_path / f"{name}.onnx", ExportOptions(unpool=form, outputs=("logits",)))
        ort_logits = onnxruntime_logits(path, frame)
        torch_logits = load_backend(tmp_path / name).infer(frame, probs=True)
        # compare through probabilities' argmax where margins are clear
        got = ort_logits.argmax(1)
        want = torch_logits.probs.argmax(1)
        assert (got == want).mean() >= 0.999, name
        (tmp_path / f"{name}.onnx").unlink()


def onnxruntime_logits(path, frame):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": frame})[0]


def test_int8_quantized_export(shipped_model, camvid_root, val_frames, torch_reference, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert export_main(["--model", str(shipped_model), "--out", str(out), "--unpool", "onnx", "--int8",
                        "--calibration-data", str(camvid_root / "train"), "--calibration-count", "4"]) == 0
    m = onnx.load(str(out))
    assert any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["segnet.precision"] == "int8" and read_card_from_onnx(out).classes[0] == "Sky"
    res = load_backend(out).infer(val_frames)
    assert (res.labels == torch_reference.labels).mean() >= 0.9  # a trade, measured by tools/benchmark.py
    assert export_main(["--model", str(shipped_model), "--out", str(out), "--int8"]) == 2
    assert "--calibration-data" in capsys.readouterr().err
