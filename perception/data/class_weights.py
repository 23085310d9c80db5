"""Class balancing weights (SegNet paper, section 4: median frequency balancing, Eigen & Fergus 2015)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["class_frequencies", "median_frequency_weights"]


def class_frequencies(labels: Iterable[np.ndarray], num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """freq(c) = (pixels of class c) / (total pixels of the images in which c appears).

    Ignored pixels count in neither numerator nor denominator. A class that never appears gets NaN.
    """
    class_pixels = np.zeros(num_classes, dtype=np.float64)
    image_pixels = np.zeros(num_classes, dtype=np.float64)
    for lab in labels:
        lab = np.asarray(lab).ravel()
        if ignore_index is not None:
            lab = lab[lab != ignore_index]
        if lab.size and lab.max() >= num_classes:
            bad = np.unique(lab[lab >= num_classes])
            raise ValueError(f"label values {bad.tolist()} out of range 0..{num_classes - 1}")
        counts = np.bincount(lab, minlength=num_classes).astype(np.float64)
        class_pixels += counts
        image_pixels[counts > 0] += counts.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(image_pixels > 0, class_pixels / image_pixels, np.nan)


def median_frequency_weights(
    labels: Iterable[np.ndarray], num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """w(c) = median(freq) / freq(c); classes absent from the data get weight 0."""
    freq = class_frequencies(labels, num_classes, ignore_index)
    med = np.nanmedian(freq)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = med / freq
    return np.nan_to_num(w, nan=0.0, posinf=0.0)
