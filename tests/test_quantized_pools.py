"""Pools and unpools on the quantized tensors (perception.export.quantized_pools): the rewritten int8
graph predicts exactly the labels of the int8 graph it came from."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from perception.export.onnx import ExportOptions, export_onnx  # noqa: E402
from perception.export.quantize import quantize_int8  # noqa: E402
from perception.export.quantized_pools import pools_on_quantized  # noqa: E402


def _session(model_or_path):
    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _labels(session, frame: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: frame[None]})[0]


def _float_pools_int8(model_dir, tmp_path, frames, size=None):
    fp32 = export_onnx(model_dir, tmp_path / "fp32.onnx", ExportOptions(unpool="onnx", size=size))
    return quantize_int8(fp32, tmp_path / "int8_float_pools.onnx", frames, pools="float")


def _pool_inputs(model) -> list[str]:
    """The op type feeding each MaxPool/MaxUnpool-replacement: DequantizeLinear means a float pool."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type == "MaxPool":
            src = producers.get(n.input[0])
            if src is not None and src.op_type == "Pad":
                src = producers.get(src.input[0])
            out.append(src.op_type if src is not None else "input")
    return out


def test_rewrite_moves_every_pool_and_unpool_onto_the_integers(shipped_model, tmp_path):
    rng = np.random.default_rng(0)
    # 90x120: odd sizes at the last pools, so the -inf padding before them is rewritten too.
    frames = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(4)]
    before = onnx.load(str(_float_pools_int8(shipped_model, tmp_path, frames, size=(90, 120))))
    assert set(_pool_inputs(before)) <= {"DequantizeLinear"}
    ops_before = Counter(n.op_type for n in before.graph.node)
    after, count = pools_on_quantized(onnx.load(str(tmp_path / "int8_float_pools.onnx")))
    ops_after = Counter(n.op_type for n in after.graph.node)
    assert count == ops_before["MaxPool"] + ops_before["MaxUnpool"] == 8
    assert "DequantizeLinear" not in _pool_inputs(after)  # every pool reads the integers
    assert ops_after["MaxUnpool"] == 0 and ops_after["ScatterElements"] == ops_before["MaxUnpool"]
    # The full-resolution DQ before each pool and the Q after each unpool are gone.
    assert ops_after["DequantizeLinear"] < ops_before["DequantizeLinear"]
    assert ops_after["QuantizeLinear"] < ops_before["QuantizeLinear"]
    a, b = _session(before), _session(after)
    for f in frames + [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(8)]:
        np.testing.assert_array_equal(_labels(a, f), _labels(b, f))
    # Ties: flat regions (every window of equal values) pick the same first maximum in both graphs.
    for value in (0, 17, 255):
        flat = np.full((90, 120, 3), value, np.uint8)
        np.testing.assert_array_equal(_labels(a, flat), _labels(b, flat))


def test_rewrite_leaves_a_graph_without_qdq_pools_alone(shipped_model, tmp_path):
    fp32 = export_onnx(shipped_model, tmp_path / "fp32.onnx", ExportOptions(unpool="onnx", size=(64, 96)))
    model, count = pools_on_quantized(onnx.load(str(fp32)))
    assert count == 0
    assert Counter(n.op_type for n in model.graph.node) == Counter(n.op_type for n in onnx.load(str(fp32)).graph.node)


def test_quantized_pools_give_the_float_pool_graphs_labels_on_every_val_frame(shipped_model, camvid_root, tmp_path):
    """The acceptance check of the rewrite: SegNet-Basic's held-out twin (never trained on 0006R0)
    quantized as shipped (uint8 activations) with float pools and run as the node's backend ran such
    graphs (NCHW), against the same graph with the pools, and with the pools and unpools, on the
    integers, each run with the layout the backend now gives it: identical labels on all 101 val frames."""
    import cv2

    from perception.core.fileio import list_images
    from perception.inference.onnxruntime import disabled_optimizers

    twin = shipped_model / "heldout_0006R0"
    calib = [cv2.imread(str(p)) for p in list_images(camvid_root / "train") if not p.name.startswith("0006R0")][::40]
    before_path = _float_pools_int8(twin, tmp_path, calib)
    before = ort.InferenceSession(str(before_path), providers=["CPUExecutionProvider"],
                                  disabled_optimizers=disabled_optimizers({"segnet.precision": "int8"}))
    rewritten = {}
    for unpools in (False, True):
        model, count = pools_on_quantized(onnx.load(str(before_path)), unpools=unpools)
        assert count == (8 if unpools else 4)
        rewritten[unpools] = _session(model)  # ONNX Runtime's defaults: NHWC, as the backend runs these
    val = list_images(camvid_root / "val")
    assert len(val) == 101
    differing = {False: 0, True: 0}
    for p in val:
        frame = cv2.imread(str(p))
        reference = _labels(before, frame)
        for unpools, session in rewritten.items():
            differing[unpools] += int((_labels(session, frame) != reference).sum())
    assert differing == {False: 0, True: 0}, f"pixels that differ: {differing}"


def test_ship_int8_calibrates_off_the_measured_drive_and_feeds_the_auto_rule(shipped_model, camvid_root, tmp_path):
    """perception-ship int8 on a copy of SegNet-Basic's held-out twin: calibration frames never come from
    the measured drive (nor a drive the model was held out of), the card gains ``holdout_0006R0_int8``
    from an evaluation of the written graph, and --precision auto picks that graph by it."""
    import json
    import shutil

    from perception.core.card import load_card
    from perception.data.splits import group_of
    from perception.eval.scoring import evaluate_backend
    from perception.data.loading import open_dataset
    from perception.inference import load_backend
    from perception.inference.resolve import int8_verdict, resolve_backend
    from perception.release.cli import main as ship_main
    from perception.release.int8 import README_HEADING, _update_readme, calibration_pairs

    folder = tmp_path / "twin"
    shutil.copytree(shipped_model / "heldout_0006R0", folder)
    (folder / "model_int8.onnx").unlink(missing_ok=True)
    card = load_card(folder)
    pairs = calibration_pairs(card, str(camvid_root), "train+val", ["0016E5"], 6)
    assert len(pairs) == 6 and {group_of(p[0].name) for p in pairs} == {"0001TP"}  # not 0016E5, not 0006R0
    assert ship_main(["int8", str(folder), "--data", str(camvid_root), "--groups", "0006R0", "--count", "4"]) == 0
    card = load_card(folder)
    int8 = card.metrics["holdout_0006R0_int8"]
    # The recorded number is the written graph's, re-measured here through the node's backend.
    with load_backend(folder / "model_int8.onnx") as b:
        again = evaluate_backend(b, open_dataset(camvid_root, "train+val", groups=["0006R0"]), progress=False)
    assert again["miou"] == pytest.approx(int8["miou"], abs=1e-9)
    loss = card.metrics["holdout_0006R0"]["miou"] - int8["miou"]
    assert int8_verdict(folder)[0] == (loss <= 0.005 + 1e-9)
    if loss <= 0.005:
        with resolve_backend(folder, precision="auto") as b:
            assert b.name == "onnxruntime" and b.path.name == "model_int8.onnx"
    # Shipping again replaces the README section instead of adding a second one.
    readme = (folder / "README.md").read_text()
    assert readme.count(README_HEADING) == 1
    _update_readme(folder, README_HEADING + "\n\nagain\n")
    assert (folder / "README.md").read_text().count(README_HEADING) == 1
    assert (folder / "README.md").read_text().startswith(readme.split(README_HEADING)[0])
    assert "0006R0" not in json.loads((folder / "model.json").read_text())["extra"]["int8"]["calibration"]


def test_int8_export_records_its_pools_and_the_backend_chooses_the_layout_by_them(shipped_model, tmp_path):
    from perception.core.onnx_meta import read_onnx_metadata
    from perception.inference.onnxruntime import disabled_optimizers

    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(2)]
    fp32 = export_onnx(shipped_model, tmp_path / "fp32.onnx", ExportOptions(unpool="onnx", size=(64, 96)))
    seen = {}
    for pools in ("float", "quantized", "quantized+unpools"):
        out = quantize_int8(fp32, tmp_path / f"{pools}.onnx", frames, pools=pools)
        meta = read_onnx_metadata(out)
        ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
        seen[pools] = (meta["segnet.int8_pools"], ops["MaxUnpool"], ops["ScatterElements"], disabled_optimizers(meta))
    assert seen["float"] == ("float", 4, 0, ["NhwcTransformer"])
    assert seen["quantized"] == ("quantized", 4, 0, [])
    assert seen["quantized+unpools"] == ("quantized+unpools", 0, 4, [])
    # s8 activations (TensorRT's) keep float pools: TensorRT places its own Q/DQ.
    s8 = quantize_int8(fp32, tmp_path / "s8.onnx", frames, activations="s8")
    assert read_onnx_metadata(s8)["segnet.int8_pools"] == "float"
    assert disabled_optimizers({"segnet.precision": "fp32"}) == []
    assert disabled_optimizers({"segnet.precision": "int8"}) == ["NhwcTransformer"]  # graphs from before the key
