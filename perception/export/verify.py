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
    """Run ``frame`` (BGR uint8; a synthetic one by default) through the exported graph in ONNX Runtime
    and through the model folder in PyTorch (with the graph's TTA); returns the label agreement and,
    where the graph outputs probabilities, their largest difference."""
    import cv2
    import onnxruntime as ort
    import torch

    from perception.core.onnx_meta import read_onnx_metadata
    from perception.data.transforms import normalize
    from perception.models.io import load
    from perception.models.tta import with_tta

    model = load(model_dir)
    spec = model.card.input
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    h, w = inp.shape[1], inp.shape[2]
    if frame is None:
        frame = synthetic_frame(spec.height, spec.width)
    if isinstance(h, int) and isinstance(w, int) and frame.shape[:2] != (h, w):
        frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {inp.name: np.ascontiguousarray(frame[None])})))
    net = with_tta(model, read_onnx_metadata(onnx_path).get("segnet.tta", "none"))
    x = normalize(torch.from_numpy(np.ascontiguousarray(frame[..., ::-1])).permute(2, 0, 1)[None], spec)
    with torch.no_grad():
        probs = torch.softmax(net(x).float(), dim=1)
    labels = probs.argmax(1).numpy()
    ort_labels = got["labels"] if "labels" in got else got[names[0]].argmax(1)
    out = {"agreement": float((ort_labels == labels).mean()), "max_prob_diff": None}
    if "probs" in got:
        out["max_prob_diff"] = float(np.abs(got["probs"] - probs.numpy()).max())
    return out
