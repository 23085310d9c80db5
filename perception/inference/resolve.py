"""From a model path to the backend that runs it: the one place that decides, for the node, the
evaluator and the tools.

* an ``.engine`` runs in TensorRT; an ``.onnx`` in ONNX Runtime;
* a model folder runs, with ``backend="auto"``: in TensorRT where the folder holds an engine built
  for this machine (TensorRT and a CUDA GPU present); in PyTorch where its model samples dropout at
  test time (Bayesian SegNet: MC uncertainty) and PyTorch is installed; otherwise in ONNX Runtime:
  with ``precision="auto"`` on the folder's ``model_int8.onnx`` where its card shows the int8 graph
  within 0.5 points of fp32's held-out mIoU and the graph computes here what it computed where it was
  measured (:func:`int8_verdict`, :func:`int8_cpu_verdict`), else on its ``model.onnx`` (no
  PyTorch needed), or on an export cached per weights hash; ``precision="fp32"`` keeps the fp32 graph.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from perception.core.cpu import isa_summary, u8s8_may_saturate
from perception.core.card import CARD_FILE, ONNX_FILE, WEIGHTS_FILE, has_mc_dropout, load_card
from perception.core.fileio import sha256_file
from perception.core.onnx_meta import read_onnx_metadata
from perception.core.zoo import INT8_ONNX_FILE, default_model_name, find_model
from perception.inference import BACKEND_CHOICES, Backend, backend_kind, load_backend


__all__ = ["resolve_backend", "default_model_dir", "folder_onnx", "int8_verdict", "int8_cpu_verdict", "DEFAULT_MODEL", "BACKENDS",
           "TTA_CHOICES", "PRECISIONS", "INT8_MAX_LOSS"]

DEFAULT_MODEL = default_model_name()
BACKENDS = BACKEND_CHOICES  # "auto", then every backend of the table
TTA_CHOICES = ("none", "flip")


def default_model_dir() -> Path | None:
    """The shipped default model's folder (inside the package, in every install), if it is there."""
    try:
        path = find_model(None)
    except FileNotFoundError:
        return None
    return path if (path / CARD_FILE).is_file() else None


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _engine_in_folder(model: Path) -> Path | None:
    """An engine built for this machine inside a model folder (``*.engine`` with its sidecar), if
    TensorRT and a CUDA GPU are both here."""
    engines = sorted(e for e in model.glob("*.engine") if Path(str(e) + ".json").is_file())
    if not engines:
        return None
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        if cuda.Device.count() == 0:
            return None
    except Exception:  # no TensorRT, no pycuda, or no driver: not this machine's engine
        return None
    return engines[0]


def folder_onnx(model_dir: Path, tta: str = "none") -> Path:
    """The ONNX graph of a model folder: its shipped ``model.onnx`` when it was exported from these
    very weights with this TTA, else an export cached per weights hash (needs PyTorch)."""
    shipped = model_dir / ONNX_FILE
    weights = model_dir / WEIGHTS_FILE
    sha = sha256_file(weights) if weights.is_file() else None
    if shipped.is_file():
        meta = read_onnx_metadata(shipped)
        fresh = sha is None or meta.get("segnet.source_sha256") == sha
        if fresh and meta.get("segnet.tta", "none") == tta:
            return shipped
        if not fresh:
            print(f"warning: {shipped} was exported from other weights than {weights}; re-exporting", file=sys.stderr)
    if sha is None:
        raise FileNotFoundError(f"model folder {model_dir} has neither a usable {ONNX_FILE} nor {WEIGHTS_FILE}")
    if not _torch_available():
        raise RuntimeError(
            f"{model_dir} needs an ONNX export ({'--tta ' + tta if tta != 'none' else 'no usable ' + ONNX_FILE}), "
            "which needs PyTorch: pip install 'segnet-perception[train]', or pass an exported .onnx"
        )
    from perception.export.onnx import ExportOptions, export_onnx

    card_sha = hashlib.sha256((model_dir / CARD_FILE).read_bytes()).hexdigest()[:8]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segnet-perception" / "onnx"
    path = cache / f"{model_dir.name}-{sha[:16]}-{card_sha}-onnx{'-' + tta if tta != 'none' else ''}.onnx"
    if not path.is_file():
        export_onnx(model_dir, path, ExportOptions(unpool="onnx", outputs=("labels",), tta=tta))
    return path


INT8_MAX_LOSS = 0.005  # auto runs a folder's int8 graph where its card shows at most this held-out mIoU loss
PRECISIONS = ("auto", "fp32", "int8", "bf16", "fp16")


def int8_cpu_verdict(onnx_path: Path, *, saturates: bool | None = None) -> tuple[bool, str]:
    """Whether an int8 graph computes on this CPU the integers it computed where it was measured. A graph
    with 8-bit weights (``segnet.int8_weight_bits`` 8, or absent: graphs made before the field) does not
    on an x86 CPU without VNNI, where ONNX Runtime's u8 x s8 pair sums saturate int16
    (:mod:`perception.core.cpu`; measured there: 37.3 -> 30.4 held-out mIoU). 7-bit weights cannot."""
    bits = read_onnx_metadata(onnx_path).get("segnet.int8_weight_bits", "8")
    if bits == "7" or not (u8s8_may_saturate() if saturates is None else saturates):
        return True, f"{bits}-bit weights on {isa_summary()}"
    return False, (f"{onnx_path.name} has 8-bit weights and this CPU ({isa_summary()}) has no VNNI: ONNX Runtime's "
                   "u8 x s8 sums saturate here, so the card's int8 mIoU does not hold (perception-export --int8 "
                   "makes a 7-bit-weight graph that is exact on every CPU)")


def int8_verdict(model_dir: Path, *, saturates: bool | None = None) -> tuple[bool, str]:
    """Whether ``precision="auto"`` runs the folder's ``model_int8.onnx``, and why: it must be there,
    the card must record its held-out mIoU (``<split>_int8``) within :data:`INT8_MAX_LOSS` of fp32's,
    and the graph must compute the same here (:func:`int8_cpu_verdict`; ``saturates`` overrides the
    CPU probe, for tests)."""
    if not (model_dir / INT8_ONNX_FILE).is_file():
        return False, f"no {INT8_ONNX_FILE}"
    cpu_ok, cpu_why = int8_cpu_verdict(model_dir / INT8_ONNX_FILE, saturates=saturates)
    if not cpu_ok:
        return False, cpu_why
    card = load_card(model_dir)
    for key, m in card.metrics.items():
        base = card.metrics.get(key.removesuffix("_int8"))
        if key.endswith("_int8") and isinstance(m, dict) and isinstance(base, dict) and "miou" in m and "miou" in base:
            loss = base["miou"] - m["miou"]
            split = key.removesuffix("_int8")
            if loss <= INT8_MAX_LOSS + 1e-9:  # at most half a point (float rounding aside)
                return True, f"int8 {100 * m['miou']:.1f} vs fp32 {100 * base['miou']:.1f} mIoU on {split}"
            return False, f"int8 loses {100 * loss:.2f} points of mIoU on {split} (more than {100 * INT8_MAX_LOSS:g})"
    return False, "its card records no held-out int8 mIoU next to fp32's"


def _warn_if_int8_differs_here(onnx_path: Path) -> None:
    ok, why = int8_cpu_verdict(onnx_path)
    if not ok:
        print(f"warning: {why}", file=sys.stderr)


def resolve_backend(
    model: str | Path | None = None,
    *,
    backend: str = "auto",
    device: str = "cpu",
    precision: str = "auto",
    mc_samples: int = 8,
    threads: int | None = None,
    tta: str = "none",
) -> Backend:
    """The backend for ``model`` (default: the shipped model), as the module docstring says."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if tta not in TTA_CHOICES:
        raise ValueError(f"--tta must be one of {TTA_CHOICES}, got {tta!r}")
    path = find_model(model)  # a path, or a model's name (perception-models lists them)
    kind = backend_kind(path)
    if backend == "auto":
        backend = kind
        engine = _engine_in_folder(path) if kind == "torch" and tta == "none" else None
        if engine is not None:
            path, kind, backend = engine, "tensorrt", "tensorrt"
        elif kind == "torch":
            bayes = has_mc_dropout(load_card(path))
            has_weights = (path / WEIGHTS_FILE).is_file()
            if bayes and not _torch_available():
                print(f"warning: {path.name} samples dropout for its uncertainty, which needs PyTorch; running its "
                      "exported graph without uncertainty", file=sys.stderr)
            elif bayes and not has_weights:
                # A wheel leaves large weights out (perception/zoo/index.yaml: packaged_without): a clone has them.
                print(f"warning: {path.name} samples dropout for its uncertainty from {WEIGHTS_FILE}, which this "
                      "install does not carry (a clone of the repository does); running its exported graph without "
                      "uncertainty", file=sys.stderr)
            backend = "torch" if bayes and has_weights and _torch_available() else "onnxruntime"
    if backend == "tensorrt" and kind != "tensorrt":
        raise ValueError(f"--backend tensorrt needs an .engine file (build one with tools/build_engine.py), got {path}")
    if tta != "none" and kind != "torch":
        if kind != "onnxruntime" or read_onnx_metadata(path).get("segnet.tta", "none") != tta:
            raise ValueError(f"--tta {tta} needs a model folder, or an .onnx exported with --tta {tta}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "onnxruntime" and kind == "torch":
        wants_int8 = tta == "none" and precision in ("auto", "int8")
        use_int8, why = int8_verdict(path) if wants_int8 else (False, "")
        if precision == "auto" and wants_int8 and not use_int8 and (path / INT8_ONNX_FILE).is_file():
            print(f"note: {path.name}: fp32, not {INT8_ONNX_FILE}: {why}", file=sys.stderr)
        if precision == "int8" and not use_int8 and not (path / INT8_ONNX_FILE).is_file():
            raise ValueError(f"--precision int8: {path} has no {INT8_ONNX_FILE} (perception-export --int8 makes one)")
        if use_int8 or precision == "int8":
            path = path / INT8_ONNX_FILE
            if not use_int8:  # forced by --precision int8; a passing verdict already checked this CPU
                _warn_if_int8_differs_here(path)
        elif precision == "auto" and not (path / ONNX_FILE).is_file() and (path / INT8_ONNX_FILE).is_file() \
                and not _torch_available():
            path = path / INT8_ONNX_FILE  # the only graph this install can run
            _warn_if_int8_differs_here(path)
        else:
            path = folder_onnx(path, tta)
    elif precision == "int8" and not (kind == "onnxruntime" and read_onnx_metadata(path).get("segnet.precision") == "int8"):
        raise ValueError("--precision int8 runs a model folder's int8 graph (or pass an int8 .onnx)")
    elif backend == "torch" and kind != "torch":
        raise ValueError(f"--backend torch needs a model folder, got {path}")
    elif kind == "onnxruntime" and read_onnx_metadata(path).get("segnet.precision") == "int8":
        _warn_if_int8_differs_here(path)
    opts: dict[str, Any] = {}
    if backend == "torch":
        torch_precision = "fp32" if precision == "auto" else precision
        if torch_precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"the torch backend runs fp32, bf16 or fp16, not {precision}")
        if torch_precision == "bf16":
            from perception.models.precision import native_bf16

            if not native_bf16("cpu" if device == "auto" else device):
                print(f"warning: --precision bf16 on this {device} has no native bf16 (AVX512_BF16 or AMX): emulated, "
                      "it can be several times slower than --precision fp32", file=sys.stderr)
        opts = {"precision": torch_precision, "mc_samples": mc_samples, "threads": threads, "tta": tta}
    elif backend == "onnxruntime":
        opts = {"threads": threads}
    return load_backend(path, backend=backend, device=device, **opts)
