"""The one decision table: (folder contents x the CPU's int8 verdict x PyTorch here x an engine here) ->
the graph a model folder runs and the notes a command prints, with no model run (the graphs are empty
ONNX files carrying only the metadata the decision reads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perception.core import model_folder
from perception.core.card import CARD_FILE, INT8_ONNX_FILE, ONNX_FILE, WEIGHTS_FILE
from perception.core.fileio import sha256_file
from perception.core.zoo import ZOO_DIR
from perception.inference import resolve as resolve_module
from perception.inference.resolve import resolve

onnx = pytest.importorskip("onnx")


def _graph(path: Path, **meta: str) -> None:
    from onnx import helper

    model = helper.make_model(helper.make_graph([], "empty", [], []))
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def _folder(tmp_path: Path, contents: str, *, int8_loss: float = 0.0, mc: bool = False) -> Path:
    """A model folder holding what ``contents`` names: onnx (fresh), stale (onnx from other weights), int8
    (7-bit), int8_8bit, weights, engine (with its sidecar)."""
    folder = tmp_path / "m"
    folder.mkdir()
    card = json.loads((ZOO_DIR / "segnet_basic_camvid" / CARD_FILE).read_text())
    card["metrics"] = {"holdout_X": {"miou": 0.40}, "holdout_X_int8": {"miou": 0.40 - int8_loss}}
    card["mc_dropout"] = mc
    (folder / CARD_FILE).write_text(json.dumps(card))
    parts = set(contents.split("+")) if contents else set()
    (folder / WEIGHTS_FILE).write_bytes(b"weights" if "weights" in parts else b"")
    sha = sha256_file(folder / WEIGHTS_FILE)
    if "weights" not in parts:
        (folder / WEIGHTS_FILE).unlink()
    if "onnx" in parts or "stale" in parts:
        _graph(folder / ONNX_FILE, **{"segnet.source_sha256": sha if "onnx" in parts else "0" * 64})
    if "int8" in parts or "int8_8bit" in parts:
        _graph(folder / INT8_ONNX_FILE, **{"segnet.precision": "int8",
                                           "segnet.int8_weight_bits": "7" if "int8" in parts else "8"})
    if "engine" in parts:
        (folder / "segnet.engine").write_bytes(b"")
        (folder / "segnet.engine.json").write_text("{}")
    return folder


@pytest.fixture
def machine(monkeypatch):
    """Set what this machine has: PyTorch, TensorRT with a GPU, and whether u8 x s8 sums saturate."""
    def set_machine(*, torch: bool = True, trt: bool = False, saturates: bool = False) -> None:
        monkeypatch.setattr(resolve_module, "torch_available", lambda: torch)
        # No CUDA GPU for PyTorch (tests/test_cuda_path.py has the device rows): the same table on any machine.
        monkeypatch.setattr(resolve_module, "torch_cuda_status", lambda: (False, "no GPU in this table"))
        monkeypatch.setattr(model_folder, "tensorrt_gpu_available", lambda: trt)
        monkeypatch.setattr(model_folder, "u8s8_may_saturate", lambda: saturates)
    return set_machine


# contents, card's int8 loss, mc dropout, machine, options -> (backend, file or folder, export?, notes' words)
TABLE = [
    ("onnx+int8+weights", 0.0, False, {}, {}, ("onnxruntime", INT8_ONNX_FILE, False, [])),
    ("onnx+int8+weights", 0.0, False, {}, {"precision": "fp32"}, ("onnxruntime", ONNX_FILE, False, [])),
    ("onnx+int8_8bit+weights", 0.0, False, {"saturates": True}, {},
     ("onnxruntime", ONNX_FILE, False, ["fp32, not model_int8.onnx", "no VNNI"])),
    ("onnx+int8_8bit+weights", 0.0, False, {"saturates": False}, {}, ("onnxruntime", INT8_ONNX_FILE, False, [])),
    ("onnx+int8_8bit+weights", 0.0, False, {"saturates": True}, {"precision": "int8"},
     ("onnxruntime", INT8_ONNX_FILE, False, ["warning:", "no VNNI"])),
    ("onnx+int8+weights", 0.01, False, {}, {}, ("onnxruntime", ONNX_FILE, False, ["int8 loses 1.00 points"])),
    ("onnx+weights", 0.0, False, {}, {}, ("onnxruntime", ONNX_FILE, False, [])),
    ("stale+weights", 0.0, False, {}, {}, ("onnxruntime", "m", True, ["other weights", "re-exporting"])),
    ("weights", 0.0, False, {}, {}, ("onnxruntime", "m", True, [])),
    ("onnx+weights", 0.0, False, {}, {"tta": "flip"}, ("onnxruntime", "m", True, [])),
    ("int8", 0.01, False, {"torch": False}, {}, ("onnxruntime", INT8_ONNX_FILE, False, ["int8 loses"])),
    ("onnx+int8+weights+engine", 0.0, False, {"trt": True}, {}, ("tensorrt", "segnet.engine", False, [])),
    ("onnx+int8+weights+engine", 0.0, False, {"trt": False}, {}, ("onnxruntime", INT8_ONNX_FILE, False, [])),
    ("onnx+int8+weights+engine", 0.0, False, {"trt": True}, {"tta": "flip"}, ("onnxruntime", "m", True, [])),
    ("onnx+int8+weights", 0.0, True, {}, {}, ("torch", "m", False, [])),
    ("onnx+int8+weights", 0.0, True, {"torch": False}, {},
     ("onnxruntime", INT8_ONNX_FILE, False, ["needs PyTorch"])),
    ("onnx+int8", 0.0, True, {}, {}, ("onnxruntime", INT8_ONNX_FILE, False, ["does not carry"])),
    ("onnx+int8+weights", 0.0, False, {}, {"backend": "torch"}, ("torch", "m", False, [])),
    ("onnx+int8+weights", 0.0, False, {}, {"reference": True}, ("torch", "m", False, [])),
]


@pytest.mark.parametrize("contents,loss,mc,here,options,expected", TABLE,
                         ids=[f"{r[0]}-{r[1]}-{'mc' if r[2] else 'det'}-{r[3]}-{r[4]}" for r in TABLE])
def test_the_decision_table(tmp_path, machine, contents, loss, mc, here, options, expected):
    machine(**here)
    r = resolve(_folder(tmp_path, contents, int8_loss=loss, mc=mc), **options)
    backend, name, export, words = expected
    assert (r.backend, r.path.name, r.export_tta is not None) == (backend, name, export), r
    text = " ".join(r.notes)
    assert all(w in text for w in words) and (bool(r.notes) == bool(words)), r.notes


@pytest.mark.parametrize("contents,here,options,error", [
    ("stale+weights", {"torch": False}, {}, "needs PyTorch"),
    ("onnx", {}, {"tta": "flip"}, "neither a usable model.onnx nor weights"),
    ("onnx+weights", {}, {"precision": "int8"}, "has no model_int8.onnx"),
    ("onnx+int8+weights+engine", {"trt": True}, {"backend": "tensorrt"}, "needs an .engine file"),
    ("onnx+weights", {}, {"backend": "torch", "precision": "int8"}, "runs fp32, bf16 or fp16"),
    ("onnx+weights", {}, {"backend": "nope"}, "backend must be one of"),
])
def test_what_cannot_be_run_is_a_one_line_reason(tmp_path, machine, contents, here, options, error):
    machine(**here)
    with pytest.raises((ValueError, RuntimeError, FileNotFoundError), match=error) as e:
        resolve(_folder(tmp_path, contents), **options)
    assert "\n" not in str(e.value)


def test_exported_files_run_as_exported(tmp_path, machine):
    machine(saturates=True)
    int8, fp32, engine = tmp_path / "a_int8.onnx", tmp_path / "a.onnx", tmp_path / "a.engine"
    _graph(int8, **{"segnet.precision": "int8", "segnet.int8_weight_bits": "8"})
    _graph(fp32)
    engine.write_bytes(b"")
    r = resolve(int8)
    assert (r.backend, r.path, len(r.notes)) == ("onnxruntime", int8, 1) and "no VNNI" in r.notes[0]
    assert resolve(fp32).notes == [] and resolve(engine).backend == "tensorrt"
    for path, options, error in [(fp32, {"tta": "flip"}, "--tta flip needs"), (fp32, {"precision": "int8"}, "int8"),
                                 (fp32, {"backend": "torch"}, "needs a model folder"),
                                 (fp32, {"backend": "tensorrt"}, "needs an .engine")]:
        with pytest.raises(ValueError, match=error):
            resolve(path, **options)
