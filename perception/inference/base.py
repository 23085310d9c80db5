"""The one interface every inference engine implements (PyTorch, ONNX Runtime, TensorRT).

A backend takes a batch of uint8 BGR frames, N x H x W x 3 (OpenCV's layout), and returns class ids
at the frames' own resolution, plus class probabilities / uncertainty on request. Preprocessing
(colour order, normalisation, resizing to a fixed network input) happens inside the backend, so
callers never need to know how a model was trained.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import cv2
import numpy as np

from perception.core.card import ModelCard

__all__ = ["Backend", "Capabilities", "InferenceResult", "resize_frames", "resize_labels"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared by it (callers ask this instead of probing attributes)."""

    uncertainty: bool = False  # per-pixel MC-dropout uncertainty (Bayesian models in PyTorch)
    probs: bool = True  # class probabilities on request
    batch: int | None = None  # the fixed batch the graph runs (frames are chunked and padded); None: any


@dataclass
class InferenceResult:
    """What a backend returns for a batch: class ids at the frames' own size, and on request class
    probabilities and (Bayesian models in PyTorch) per-pixel uncertainty."""

    labels: np.ndarray  # (N, H, W) uint8 class ids
    probs: np.ndarray | None = None  # (N, K, H, W) float32
    uncertainty: np.ndarray | None = None  # (N, H, W) float32 (Bayesian models)


class Backend(ABC):
    """Base class: subclasses implement :meth:`_infer` on frames already at :meth:`network_size`."""

    name: str = "base"

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    @property
    def capabilities(self) -> Capabilities:
        """What this backend can compute besides labels (callers ask this, never probe attributes)."""
        return Capabilities()

    @property
    def classes(self) -> list[str]:
        """Class names, index = class id (the model card's)."""
        return list(self.card.classes)

    @property
    def palette(self) -> list[list[int]]:
        """RGB colour per class id (the model card's)."""
        return [list(c) for c in self.card.palette]

    def network_size(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The size frames are resized to before the network: the model's input size by default
        (what it was trained and exported for)."""
        return (self.card.input.height, self.card.input.width)

    def infer(self, frames: np.ndarray, *, probs: bool = False, uncertainty: bool = False) -> InferenceResult:
        """Segment uint8 BGR frames (N x H x W x 3, or one H x W x 3): resized to :meth:`network_size`, run,
        and the results resized back to the frames' own size."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames of shape (N, H, W, 3), got {frames.dtype} {frames.shape}")
        src_hw = frames.shape[1:3]
        net_hw = self.network_size(src_hw)
        x = resize_frames(frames, net_hw)
        res = self._infer(x, probs=probs, uncertainty=uncertainty)
        if net_hw != tuple(src_hw):
            res.labels = resize_labels(res.labels, src_hw)
            if res.probs is not None:
                res.probs = np.stack([resize_frames_chw(p, src_hw) for p in res.probs])
            if res.uncertainty is not None:
                res.uncertainty = np.stack(
                    [cv2.resize(u, (src_hw[1], src_hw[0]), interpolation=cv2.INTER_LINEAR) for u in res.uncertainty]
                )
        return res

    @abstractmethod
    def _infer(self, frames: np.ndarray, *, probs: bool, uncertainty: bool) -> InferenceResult: ...

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release what the backend holds (sessions, device memory); ``with`` calls it."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resize_frames(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if tuple(frames.shape[1:3]) == tuple(hw):
        return np.ascontiguousarray(frames)
    return np.stack([cv2.resize(f, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR) for f in frames])


def resize_frames_chw(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.stack([cv2.resize(c, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR) for c in x])


def resize_labels(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.stack([cv2.resize(lab, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST) for lab in labels])
