"""From a model to the backend that runs it: the one place that decides, for the Python API, the node,
the evaluator, predict and the tools.

* an ``.engine`` runs in TensorRT; an ``.onnx`` in ONNX Runtime (``device="cuda"``: its CUDA provider);
* a model folder runs, with ``backend="auto"``: in TensorRT where the folder holds an engine built
  for this machine (TensorRT and a CUDA GPU present) and the device is not ``cpu``; on a CUDA GPU
  (``device="cuda"``, or ``"auto"`` where PyTorch sees one and the weights are here) in PyTorch, fp16 with
  CUDA graphs unless ``precision`` says otherwise; in PyTorch where its model samples dropout at
  test time (Bayesian SegNet: MC uncertainty) and PyTorch and the weights are here; otherwise in ONNX
  Runtime: with ``precision="auto"`` on the folder's ``model_int8.onnx`` where
  :meth:`~perception.core.model_folder.ModelFolder.int8_verdict` allows it, else on its ``model.onnx``
  where that was exported from these weights, else on an export made on demand (needs PyTorch);
  ``precision="fp32"`` keeps the fp32 graph.

:func:`resolve` answers with a :class:`Resolution` (backend, path, options and the notes a command should
print) without loading or printing anything; :meth:`Resolution.load` opens the backend.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perception.core.card import INT8_ONNX_FILE, load_card
from perception.core.choices import PRECISIONS, TORCH_PRECISIONS, TTA_MODES, UNCERTAINTY_MEASURES, parse_device
from perception.core.model_folder import (
    INT8_MAX_LOSS, ModelFolder, int8_cpu_verdict, torch_available, torch_cuda_status,
)
from perception.core.onnx_meta import read_onnx_metadata
from perception.core.zoo import default_model_name, find_model
from perception.inference import BACKEND_CHOICES, Backend, backend_kind, load_backend

__all__ = ["resolve", "Resolution", "resolve_backend", "default_model_dir", "int8_verdict", "int8_cpu_verdict",
           "DEFAULT_MODEL", "BACKENDS", "TTA_CHOICES", "PRECISIONS", "INT8_MAX_LOSS"]

DEFAULT_MODEL = default_model_name()
BACKENDS = BACKEND_CHOICES  # "auto", then every backend of the table
TTA_CHOICES = TTA_MODES


@dataclass
class Resolution:
    """What :func:`resolve` chose: the backend, the file or folder it opens, its options, and the notes a
    command prints (``"warning: ..."``, ``"note: ..."``). ``export_tta`` is set where the folder's graph must
    be exported first (missing, or from other weights); :meth:`load` does that through the export layer."""

    backend: str
    path: Path
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    export_tta: str | None = None

    def load(self) -> Backend:
        """Open the backend (exporting the folder's graph first where :attr:`export_tta` says so)."""
        path = self.path
        if self.export_tta is not None:
            from perception.export.cache import cached_onnx

            path = cached_onnx(ModelFolder(path, load_card(path)), self.export_tta)
        return load_backend(path, backend=self.backend, device=self.device, **self.options)


def default_model_dir() -> Path | None:
    """The shipped default model's folder (inside the package, in every install), if it is there."""
    try:
        return ModelFolder.open(None).path
    except (FileNotFoundError, ValueError):
        return None


def int8_verdict(model_dir: Path, *, saturates: bool | None = None) -> tuple[bool, str]:
    """:meth:`ModelFolder.int8_verdict` of the folder at ``model_dir``."""
    return ModelFolder(Path(model_dir), load_card(model_dir)).int8_verdict(saturates=saturates)


def _check_choices(backend: str, precision: str, tta: str) -> None:
    for value, choices, what in ((backend, BACKENDS, "backend"), (tta, TTA_CHOICES, "--tta"),
                                 (precision, PRECISIONS, "precision")):
        if value not in choices:
            raise ValueError(f"{what} must be one of {choices}, got {value!r}")


def resolve(
    model: str | Path | None = None, *, backend: str = "auto", device: str = "auto", precision: str = "auto",
    mc_samples: int = 8, threads: int | None = None, tta: str = "none", reference: bool = False,
    uncertainty_measure: str = "entropy",
) -> Resolution:
    """The backend for ``model`` (a name, a folder, an ``.onnx`` or an ``.engine``; None: the default), as
    the module docstring says; ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``reference``
    measures the model itself rather than what a folder deploys (a folder runs in PyTorch: perception-eval).
    Raises ValueError/FileNotFoundError/RuntimeError with a one-line reason."""
    _check_choices(backend, precision, tta)
    if uncertainty_measure not in UNCERTAINTY_MEASURES:
        raise ValueError(f"--uncertainty-measure must be one of {UNCERTAINTY_MEASURES}, got {uncertainty_measure!r}")
    device = parse_device(device)
    path = find_model(model)
    kind = backend_kind(path)
    if kind != "torch":
        return _resolve_file(path, kind, backend, device=device, precision=precision, threads=threads, tta=tta)
    folder = ModelFolder(path, load_card(path))
    notes: list[str] = []
    wants_engine = backend == "auto" and not reference and tta == "none" and device != "cpu"
    engine = folder.engine_here()[0] if wants_engine else None
    if engine is not None:  # an engine built for here (probing TensorRT and the GPU once)
        return Resolution("tensorrt", engine, "cuda", {}, notes)
    device = _folder_device(folder, device, backend, notes)
    if device.startswith("cuda") and backend in ("auto", "torch"):
        if precision == "int8":
            raise ValueError("--precision int8 runs on the CPU (ONNX Runtime's int8 graph); on CUDA use fp16, "
                             "or a TensorRT engine")
        return Resolution("torch", path, device, _torch_options(precision, device, mc_samples, threads, tta, notes)
                          | {"uncertainty_measure": uncertainty_measure},
                          notes)
    chosen = backend if backend != "auto" else "torch" if reference else _auto_backend(folder, notes)
    if chosen == "tensorrt":
        raise ValueError(f"--backend tensorrt needs an .engine file (build one with tools/build_engine.py), got {path}")
    if chosen == "torch":
        return Resolution("torch", path, device, _torch_options(precision, device, mc_samples, threads, tta, notes)
                          | {"uncertainty_measure": uncertainty_measure},
                          notes)
    return _folder_graph(folder, precision, tta, notes, device=device, threads=threads)


def _folder_device(folder: ModelFolder, device: str, backend: str, notes: list[str]) -> str:
    """``auto`` becomes ``cuda`` where PyTorch sees a GPU and the folder's weights are here, else ``cpu``; a
    CUDA device asked for PyTorch must be usable (a one-line reason otherwise)."""
    if device == "cpu" or backend in ("onnxruntime", "tensorrt"):
        return "cpu" if device == "auto" else device  # ONNX Runtime: its CUDA provider says for itself
    cuda_ok, why_not = torch_cuda_status()
    if device == "auto":
        if cuda_ok and folder.weights is None:
            notes.append(f"note: {folder.name} runs on the CPU: PyTorch on the GPU needs weights.safetensors, which "
                         "this install does not carry (a clone of the repository does)")
        return "cuda" if cuda_ok and folder.weights is not None else "cpu"
    if not cuda_ok:
        raise RuntimeError(f"--device {device}: {why_not}; use --device cpu")
    if folder.weights is None:
        raise FileNotFoundError(f"--device {device} runs {folder.name} in PyTorch from weights.safetensors, which "
                                "this install does not carry (a clone does); use --device cpu, or a TensorRT engine")
    return device


def _auto_backend(folder: ModelFolder, notes: list[str]) -> str:
    """``backend="auto"`` for a folder without an engine for here: PyTorch for MC dropout, else ONNX Runtime."""
    if not folder.mc_dropout:
        return "onnxruntime"
    if not torch_available():
        notes.append(f"warning: {folder.name} samples dropout for its uncertainty, which needs PyTorch; running "
                     "its exported graph without uncertainty")
    elif folder.weights is None:  # a wheel leaves large weights out (zoo/index.yaml: packaged_without)
        notes.append(f"warning: {folder.name} samples dropout for its uncertainty from weights.safetensors, which "
                     "this install does not carry (a clone of the repository does); running its exported graph "
                     "without uncertainty")
    else:
        return "torch"
    return "onnxruntime"


def _folder_graph(folder: ModelFolder, precision: str, tta: str, notes: list[str], **where: Any) -> Resolution:
    """Which graph of a folder ONNX Runtime runs: int8 where allowed, the shipped fp32 graph where fresh,
    else one exported on demand."""
    def runs(path: Path, *, check_cpu: bool = False, **extra: Any) -> Resolution:
        if check_cpu and not (cpu := int8_cpu_verdict(path))[0]:
            notes.append(f"warning: {cpu[1]}")
        return Resolution("onnxruntime", path, where["device"], {"threads": where["threads"]}, notes, **extra)

    wants_int8 = tta == "none" and precision in ("auto", "int8")
    use_int8, why = folder.int8_verdict() if wants_int8 else (False, "")
    if precision == "int8" and folder.int8_onnx is None:
        raise ValueError(f"--precision int8: {folder.path} has no {INT8_ONNX_FILE} (perception-export --int8 makes one)")
    if use_int8 or precision == "int8":  # forced by --precision int8: check this CPU (a passing verdict did)
        return runs(folder.int8_onnx, check_cpu=not use_int8)
    if precision == "auto" and wants_int8 and folder.int8_onnx is not None:
        notes.append(f"note: {folder.name}: fp32, not {INT8_ONNX_FILE}: {why}")
    fresh, stale_why = folder.onnx_verdict(tta)
    if fresh:
        return runs(folder.onnx)
    if precision == "auto" and folder.onnx is None and folder.int8_onnx is not None and not torch_available():
        return runs(folder.int8_onnx, check_cpu=True)  # the only graph this install can run
    if folder.weights is None:
        raise FileNotFoundError(f"model folder {folder.path} has neither a usable model.onnx nor weights.safetensors")
    if not torch_available():
        raise RuntimeError(f"{folder.path} needs an ONNX export ({'--tta ' + tta if tta != 'none' else 'no usable model.onnx'}"
                           "), which needs PyTorch: pip install 'segnet-perception[train]', or pass an exported .onnx")
    if folder.onnx is not None and "other weights" in stale_why:
        notes.append(f"warning: {stale_why}; re-exporting")
    return runs(folder.path, export_tta=tta)


def _resolve_file(path: Path, kind: str, backend: str, *, device: str, precision: str, threads: int | None,
                  tta: str) -> Resolution:
    """An exported file runs as it was exported: the checks that the options fit it."""
    meta = read_onnx_metadata(path) if kind == "onnxruntime" else {}
    if backend == "tensorrt" and kind != "tensorrt":
        raise ValueError(f"--backend tensorrt needs an .engine file (build one with tools/build_engine.py), got {path}")
    if tta != "none" and meta.get("segnet.tta", "none") != tta:
        raise ValueError(f"--tta {tta} needs a model folder, or an .onnx exported with --tta {tta}")
    is_int8 = meta.get("segnet.precision") == "int8"
    if precision == "int8" and not is_int8:
        raise ValueError("--precision int8 runs a model folder's int8 graph (or pass an int8 .onnx)")
    if backend == "torch":
        raise ValueError(f"--backend torch needs a model folder, got {path}")
    notes = [f"warning: {why}" for ok, why in [int8_cpu_verdict(path)] if not ok] if is_int8 else []
    chosen = kind if backend == "auto" else backend
    if device == "auto":  # an engine runs on its GPU; an .onnx on the CPU unless --device cuda asks for its provider
        device = "cuda" if chosen == "tensorrt" else "cpu"
    return Resolution(chosen, path, device, {"threads": threads} if chosen == "onnxruntime" else {}, notes)


def _torch_options(precision: str, device: str, mc_samples: int, threads: int | None, tta: str,
                   notes: list[str]) -> dict[str, Any]:
    on_cuda = device.startswith("cuda")
    torch_precision = ("fp16" if on_cuda else "fp32") if precision == "auto" else precision
    if torch_precision not in TORCH_PRECISIONS:
        raise ValueError(f"the torch backend runs fp32, bf16 or fp16, not {precision}")
    if torch_precision == "bf16" and not on_cuda:
        from perception.models.precision import native_bf16

        if not native_bf16("cpu"):
            notes.append(f"warning: --precision bf16 on this {device} has no native bf16 (AVX512_BF16 or AMX): "
                         "emulated, it can be several times slower than --precision fp32")
    return {"precision": torch_precision, "mc_samples": mc_samples, "threads": threads, "tta": tta}


def resolve_backend(model: str | Path | None = None, **options: Any) -> Backend:
    """:func:`resolve` then :meth:`Resolution.load`, for library callers: the notes become
    :class:`UserWarning` (commands print them instead: :func:`resolve` returns them)."""
    resolution = resolve(model, **options)
    for note in resolution.notes:
        warnings.warn(note, stacklevel=2)
    return resolution.load()
