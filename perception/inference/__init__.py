"""Inference backends behind one interface; :func:`load_backend` picks one from the model file.

Heavy libraries (onnxruntime, tensorrt, pycuda) are imported only by the backend that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perception.inference.base import Backend, InferenceResult

__all__ = ["Backend", "InferenceResult", "BackendSpec", "BACKEND_TABLE", "BACKEND_NAMES", "BACKEND_CHOICES",
           "load_backend", "backend_kind"]


@dataclass(frozen=True)
class BackendSpec:
    """One inference backend: where its class lives (imported only when used), which model files it
    runs (``suffixes``; ``folder`` for a model folder), and what it needs."""

    name: str
    module: str
    cls: str
    suffixes: tuple[str, ...]
    needs: str  # the extra to install, for error messages
    gpu_only: bool = False

    def load_class(self) -> type[Backend]:
        import importlib

        return getattr(importlib.import_module(self.module), self.cls)


# The one table: every CLI's --backend choices, backend_kind and load_backend derive from it
# (inference.resolve adds the "auto" policy on top).
BACKEND_TABLE: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", "perception.inference.torch", "TorchBackend", ("folder",), "segnet-perception[train]"),
    BackendSpec("onnxruntime", "perception.inference.onnxruntime", "OnnxRuntimeBackend", (".onnx",),
                "segnet-perception"),
    BackendSpec("tensorrt", "perception.inference.tensorrt", "TensorRTBackend", (".engine", ".plan"),
                "segnet-perception[tensorrt-cu12] or [tensorrt-cu13]", gpu_only=True),
)}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKEND_TABLE)
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKEND_NAMES)  # what --backend offers


def backend_kind(path: str | Path) -> str:
    """The backend that runs ``path`` by its kind: a model folder, or a file suffix of the table."""
    path = Path(path)
    suffix = "folder" if path.is_dir() else path.suffix.lower()
    for spec in BACKEND_TABLE.values():
        if suffix in spec.suffixes:
            return spec.name
    kinds = ", ".join(s for spec in BACKEND_TABLE.values() for s in spec.suffixes if s != "folder")
    raise ValueError(f"cannot tell the backend for {path}: expected a model folder or one of {kinds}")


def load_backend(path: str | Path, *, backend: str | None = None, device: str = "cpu", **opts: Any) -> Backend:
    """The backend ``backend`` (default: by the file, :func:`backend_kind`) on ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    kind = backend or backend_kind(path)
    spec = BACKEND_TABLE.get(kind)
    if spec is None:
        raise ValueError(f"backend {kind!r} is not available for {path}; backends: {', '.join(BACKEND_NAMES)}")
    return spec.load_class()(path, device=device, **opts)
