"""The Python API: a model that segments your frames, in three lines.

    from perception import Segmenter

    seg = Segmenter("segnet_camvid")             # a name, a folder, an .onnx or an .engine
    result = seg(frame_bgr)                      # uint8 HxWx3 (OpenCV's BGR), any size
    result.labels                                # HxW uint8 class ids at the frame's size
    result.color(), result.overlay(frame_bgr, alpha=0.5), seg.classes, seg.palette

The backend is chosen as the node chooses it (:func:`perception.inference.resolve.resolve`): the int8 graph
in ONNX Runtime on a CPU where the model's card allows it, PyTorch for Monte-Carlo dropout uncertainty, a
TensorRT engine built into the folder on a GPU. Importing this module loads no PyTorch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perception.inference.postprocess import classes_present, colorize, overlay, palette_lut

__all__ = ["Segmenter", "Segmentation"]


@dataclass
class Segmentation:
    """One frame's result: class ids (and, on request, class probabilities and uncertainty) at the frame's
    own size, with the model's class names and palette to draw them."""

    labels: np.ndarray  # (H, W) uint8 class ids
    classes: list[str]
    palette: list[list[int]]  # RGB per class
    probs: np.ndarray | None = None  # (K, H, W) float32
    uncertainty: np.ndarray | None = None  # (H, W) float32 (Bayesian models)

    def color(self) -> np.ndarray:
        """The colour mask, (H, W, 3) uint8 BGR (ids beyond the palette are black)."""
        return colorize(self.labels, palette_lut(self.palette))

    def overlay(self, frame_bgr: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The frame blended with its colour mask, (H, W, 3) uint8 BGR."""
        return overlay(frame_bgr, self.color(), alpha)

    def present(self) -> list[str]:
        """Names of the classes that occur in the frame."""
        return [self.classes[i] for i in classes_present(self.labels, len(self.classes))]


class Segmenter:
    """A segmentation model ready to run on frames (see the module docstring).

    ``backend`` ("auto", "onnxruntime", "torch", "tensorrt"), ``precision`` ("auto", "fp32", "int8", "bf16",
    "fp16"), ``device`` ("auto": a CUDA GPU where PyTorch sees one; "cpu", "cuda", "cuda:N"), ``tta`` ("none",
    "flip"), ``mc_samples``, ``uncertainty_measure`` ("entropy", "variance") and ``threads`` mean what they mean
    on the command line. Why it chose what it runs is in :attr:`notes` (also issued as warnings). Close it (or
    use ``with``) to release the backend.
    """

    def __init__(self, model: str | Path | None = None, *, backend: str = "auto", precision: str = "auto",
                 device: str = "auto", tta: str = "none", mc_samples: int = 8, threads: int | None = None,
                 uncertainty_measure: str = "entropy") -> None:
        from perception.inference.resolve import resolve

        resolution = resolve(model, backend=backend, precision=precision, device=device, tta=tta,
                             mc_samples=mc_samples, threads=threads, uncertainty_measure=uncertainty_measure)
        self.notes: list[str] = list(resolution.notes)
        for note in self.notes:
            warnings.warn(note, stacklevel=2)
        self.backend = resolution.load()
        self.path = Path(getattr(self.backend, "path", resolution.path))

    @property
    def classes(self) -> list[str]:
        return self.backend.classes

    @property
    def palette(self) -> list[list[int]]:
        return self.backend.palette

    @property
    def card(self) -> Any:
        """The model card (``model.json``): architecture, input contract, training, metrics."""
        return self.backend.card

    @property
    def has_uncertainty(self) -> bool:
        """Whether this backend computes per-pixel uncertainty (a Bayesian model in PyTorch)."""
        return self.backend.capabilities.uncertainty

    def __call__(self, frame_bgr: np.ndarray, *, probs: bool = False, uncertainty: bool = False) -> Segmentation:
        """Segment one uint8 (H, W, 3) BGR frame."""
        frame = np.asarray(frame_bgr)
        if frame.ndim != 3:
            raise ValueError(f"expected one uint8 (H, W, 3) BGR frame, got shape {frame.shape}; batch() takes several")
        return self.batch(frame[None], probs=probs, uncertainty=uncertainty)[0]

    def batch(self, frames_bgr: np.ndarray | list[np.ndarray], *, probs: bool = False,
              uncertainty: bool = False) -> list[Segmentation]:
        """Segment several frames of one size at once, (N, H, W, 3) uint8 BGR (a list of equal frames too)."""
        if uncertainty and not self.has_uncertainty:
            raise ValueError(f"{self.card.id} on {self.backend.name} computes no uncertainty: a Bayesian model "
                             "in PyTorch does (backend='torch')")
        if probs and not self.backend.capabilities.probs:
            raise ValueError(f"{self.path.name} gives labels only: class probabilities need a graph exported with "
                             "them (perception-export --outputs labels,probs) or backend='torch'")
        res = self.backend.infer(np.asarray(frames_bgr), probs=probs, uncertainty=uncertainty)
        return [Segmentation(labels=res.labels[i], classes=self.classes, palette=self.palette,
                             probs=None if res.probs is None else res.probs[i],
                             uncertainty=None if res.uncertainty is None else res.uncertainty[i])
                for i in range(len(res.labels))]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Segmenter({self.card.id!r}, backend={self.backend.name!r}, path={str(self.path)!r})"
