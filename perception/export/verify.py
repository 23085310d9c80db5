"""Compare an exported ONNX file with its PyTorch model on a frame."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["verify_against_torch", "synthetic_frame"]


def synthetic_frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, street-like test frame (BGR uint8): gradients plus blocks, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 127 // (h + w))], -1)
    for _ in range(8):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        frame[y0 : y0 + h // 5, x0 : x0 + w // 5] = rng.integers(0, 256, 3)
    return frame.astype(np.uint8)


def verify_against_torch(model_dir: str | Path, onnx_path: str | Path, frame: np.ndarray | None = None) -> dict[str, Any]:
    from ..backends.onnxruntime import OnnxRuntimeBackend
    from ..backends.torch import TorchBackend

    from .onnx import read_onnx_metadata

    ort_b = OnnxRuntimeBackend(onnx_path)
    torch_b = TorchBackend(model_dir, tta=read_onnx_metadata(onnx_path).get("segnet.tta", "none"))
    if frame is None:
        frame = synthetic_frame(torch_b.card.input.height, torch_b.card.input.width)
    want_probs = "probs" in ort_b.output_names
    a = ort_b.infer(frame[None], probs=want_probs)
    b = torch_b.infer(frame[None], probs=want_probs)
    out = {"agreement": float((a.labels == b.labels).mean()), "max_prob_diff": None}
    if want_probs:
        out["max_prob_diff"] = float(np.abs(a.probs - b.probs).max())
    return out
