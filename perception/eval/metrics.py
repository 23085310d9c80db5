"""The SegNet paper's metrics: global accuracy (G), class average accuracy (C), mean IoU, boundary F1 (BF).

G, C and mIoU come from one dataset-level confusion matrix (ignored pixels excluded). BF is the
boundary F1 of Csurka et al. (BMVC 2013), computed per image and averaged over images:

* for each class c, the boundary of a binary mask is its pixels with a 4-neighbour outside the mask
  (neighbours beyond the image border do not count); ignored pixels are just another label here;
* a class is skipped when neither prediction nor target has a boundary for it, and scores 0 when only
  one of them has;
* tolerance t = 0.0075 x image diagonal; precision = share of predicted boundary pixels within
  Euclidean distance t of a target boundary pixel, recall the converse; F1 = 2PR/(P+R) (0 if P+R = 0);
* image BF = mean over counted classes; dataset BF = mean over images with at least one counted class.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

__all__ = ["SegmentationMetrics", "ErrorDetection", "mask_boundary", "boundary_f1", "BF_TOLERANCE"]

BF_TOLERANCE = 0.0075  # fraction of the image diagonal


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"expected an integer label array, got dtype {a.dtype}")
    return a


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of boolean ``mask`` with a 4-neighbour (inside the image) that is not in the mask."""
    m = mask.astype(bool)
    edge = np.zeros_like(m)
    edge[1:, :] |= m[1:, :] & ~m[:-1, :]
    edge[:-1, :] |= m[:-1, :] & ~m[1:, :]
    edge[:, 1:] |= m[:, 1:] & ~m[:, :-1]
    edge[:, :-1] |= m[:, :-1] & ~m[:, 1:]
    return edge


def _distance_to(boundary: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of every pixel to the nearest ``True`` pixel of ``boundary``."""
    # distanceTransform measures the distance to the nearest zero pixel; DIST_MASK_PRECISE is exact.
    src = np.where(boundary, 0, 255).astype(np.uint8)
    return cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def boundary_f1(pred: np.ndarray, target: np.ndarray, num_classes: int, tolerance: float = BF_TOLERANCE):
    """Per-class boundary F1 of one image: an array of length ``num_classes``, NaN for skipped classes."""
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must be equal 2-D shapes")
    h, w = target.shape
    t = tolerance * float(np.hypot(h, w))
    scores = np.full(num_classes, np.nan)
    for c in range(num_classes):
        bg = mask_boundary(target == c)
        bp = mask_boundary(pred == c)
        ng, np_ = int(bg.sum()), int(bp.sum())
        if ng == 0 and np_ == 0:
            continue
        if ng == 0 or np_ == 0:
            scores[c] = 0.0
            continue
        # Small tolerance on the comparison: the distance transform works in float32.
        precision = float((_distance_to(bg)[bp] <= t + 1e-4).mean())
        recall = float((_distance_to(bp)[bg] <= t + 1e-4).mean())
        scores[c] = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return scores


class SegmentationMetrics:
    """Accumulates a confusion matrix (and per-image BF) over a dataset.

    ``update(pred, target)`` takes integer numpy arrays or torch tensors, HxW or NxHxW. Target pixels
    equal to ``ignore_index`` (or outside ``0..num_classes-1``) are excluded from G, C and mIoU.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, *, boundary: bool = True) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.boundary = boundary
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._bf_images: list[np.ndarray] = []

    def update(self, pred: Any, target: Any) -> None:
        pred, target = _to_numpy(pred), _to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
        if pred.ndim != 3:
            raise ValueError(f"expected HxW or NxHxW arrays, got {pred.ndim} dims")
        k = self.num_classes
        valid = (target >= 0) & (target < k)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        p, t = pred[valid].astype(np.int64), target[valid].astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"predicted class ids must be in 0..{k - 1}")
        self.confusion += np.bincount(t * k + p, minlength=k * k).reshape(k, k)
        if self.boundary:
            for pi, ti in zip(pred, target):
                self._bf_images.append(boundary_f1(pi, ti, k))

    def compute(self) -> dict[str, Any]:
        conf = self.confusion.astype(np.float64)
        tp = np.diag(conf)
        gt = conf.sum(1)
        pr = conf.sum(0)
        total = conf.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(gt > 0, tp / gt, np.nan)
            union = gt + pr - tp
            iou = np.where(union > 0, tp / union, np.nan)
        out: dict[str, Any] = {
            "global_accuracy": float(tp.sum() / total) if total else float("nan"),
            "class_accuracy": _nanmean(recall),
            "miou": _nanmean(iou),
            "per_class_accuracy": _as_list(recall),
            "per_class_iou": _as_list(iou),
            "confusion": self.confusion.tolist(),
        }
        if self.boundary:
            per_image = np.array(self._bf_images) if self._bf_images else np.empty((0, self.num_classes))
            counted = ~np.isnan(per_image).all(1) if len(per_image) else np.zeros(0, bool)
            image_bf = np.array([np.nanmean(r) for r in per_image[counted]])
            out["bf"] = float(image_bf.mean()) if image_bf.size else float("nan")
            with np.errstate(invalid="ignore"):
                per_class = [
                    float(np.nanmean(per_image[:, c])) if (~np.isnan(per_image[:, c])).any() else float("nan")
                    for c in range(self.num_classes)
                ]
            out["per_class_bf"] = per_class
        return out


class ErrorDetection:
    """How well a per-pixel uncertainty ranks a prediction's errors: the AUROC of the uncertainty as a
    detector of misclassified pixels (1.0: every error more uncertain than every correct pixel; 0.5: chance).

    ``update(uncertainty, pred, target)`` takes HxW or NxHxW arrays; pixels whose target is ``ignore_index``
    (or outside ``0..num_classes-1``) do not count. Values are accumulated in bins of equal width on a log
    scale (``bins_per_decade`` from 1e-12 to 10; smaller values, zero included, share the first bin), so memory
    does not grow with the frames; values in one bin count as ties, half a pair each, as in the Mann-Whitney U
    statistic the AUROC equals.
    """

    LOW, HIGH = -12.0, 1.0  # log10 range of the bins

    def __init__(self, num_classes: int, ignore_index: int | None = None, *, bins_per_decade: int = 2000) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.bins_per_decade = bins_per_decade
        self.nbins = int((self.HIGH - self.LOW) * bins_per_decade) + 1
        self.errors = np.zeros(self.nbins, dtype=np.int64)
        self.correct = np.zeros(self.nbins, dtype=np.int64)

    def update(self, uncertainty: Any, pred: Any, target: Any) -> None:
        if hasattr(uncertainty, "detach"):
            uncertainty = uncertainty.detach().float().cpu().numpy()
        u, pred, target = np.asarray(uncertainty, dtype=np.float64), _to_numpy(pred), _to_numpy(target)
        if not u.shape == pred.shape == target.shape:
            raise ValueError(f"uncertainty {u.shape}, pred {pred.shape} and target {target.shape} differ in shape")
        valid = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        with np.errstate(divide="ignore"):
            scaled = (np.log10(np.maximum(u[valid], 0.0)) - self.LOW) * self.bins_per_decade
        idx = np.clip(np.floor(np.nan_to_num(scaled, neginf=0.0)), 0, self.nbins - 1).astype(np.int64)
        wrong = pred[valid] != target[valid]
        self.errors += np.bincount(idx[wrong], minlength=self.nbins)
        self.correct += np.bincount(idx[~wrong], minlength=self.nbins)

    def compute(self) -> dict[str, float]:
        """``auroc`` (NaN when no pixel or no error was seen) and ``error_rate`` over the counted pixels."""
        n_err, n_ok = int(self.errors.sum()), int(self.correct.sum())
        below = np.cumsum(self.correct) - self.correct  # correct pixels in lower bins
        pairs = float((self.errors * (below + 0.5 * self.correct)).sum())
        auroc = pairs / (n_err * n_ok) if n_err and n_ok else float("nan")
        total = n_err + n_ok
        return {"auroc": auroc, "error_rate": n_err / total if total else float("nan")}


def _nanmean(a: np.ndarray) -> float:
    return float(np.nanmean(a)) if (~np.isnan(a)).any() else float("nan")


def _as_list(a: np.ndarray) -> list[float]:
    return [float(v) for v in a]
