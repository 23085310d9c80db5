"""Inference backends behind one interface; :func:`load_backend` picks one from the model file.

Heavy libraries (onnxruntime, tensorrt, pycuda) are imported only by the backend that needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perception.inference.base import Backend, InferenceResult

__all__ = ["Backend", "InferenceResult", "load_backend", "backend_kind"]


def backend_kind(path: str | Path) -> str:
    """'torch' for a model folder, 'onnxruntime' for .onnx, 'tensorrt' for .engine/.plan."""
    path = Path(path)
    if path.is_dir():
        return "torch"
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnxruntime"
    if suffix in (".engine", ".plan"):
        return "tensorrt"
    raise ValueError(f"cannot tell the backend for {path}: expected a model folder, .onnx or .engine")


def load_backend(path: str | Path, *, backend: str | None = None, device: str = "cpu", **opts: Any) -> Backend:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    kind = backend or backend_kind(path)
    if kind == "torch":
        from perception.inference.torch import TorchBackend

        return TorchBackend(path, device=device, **opts)
    if kind == "onnxruntime":
        from perception.inference.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, device=device, **opts)
    if kind == "tensorrt":
        from perception.inference.tensorrt import TensorRTBackend

        return TensorRTBackend(path, device=device, **opts)
    raise ValueError(f"backend {kind!r} is not available for {path}")
