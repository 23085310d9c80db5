"""Turning class ids into pictures: colour masks, alpha overlays and a class legend (BGR, OpenCV)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["palette_lut", "colorize", "overlay", "draw_legend", "uncertainty_to_bgr", "classes_present"]


def class_pixels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class id 0..num_classes-1 in ``labels`` (one histogram pass; ids beyond are not counted)."""
    return np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]


def classes_present(labels: np.ndarray, num_classes: int, counts: np.ndarray | None = None) -> np.ndarray:
    """Class ids that occur in ``labels`` (a histogram: much cheaper than np.unique's sort per frame);
    pass ``counts`` from :func:`class_pixels` when the frame's histogram is already at hand."""
    return np.flatnonzero(class_pixels(labels, num_classes) if counts is None else counts)


def palette_lut(palette_rgb: Sequence[Sequence[int]]) -> np.ndarray:
    """(256, 3) uint8 BGR lookup table; ids beyond the palette (e.g. void) map to black."""
    lut = np.zeros((256, 3), np.uint8)
    for i, (r, g, b) in enumerate(palette_rgb):
        lut[i] = (b, g, r)
    return lut


def colorize(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) BGR colour mask."""
    return lut[labels]


def overlay(frame_bgr: np.ndarray, color_mask_bgr: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Alpha blend of the frame and its colour mask (same size)."""
    if frame_bgr.shape != color_mask_bgr.shape:
        raise ValueError(f"frame {frame_bgr.shape} and mask {color_mask_bgr.shape} differ in shape")
    return cv2.addWeighted(color_mask_bgr, alpha, frame_bgr, 1.0 - alpha, 0.0)


def draw_legend(
    image_bgr: np.ndarray, classes: Sequence[str], palette_rgb: Sequence[Sequence[int]], *,
    present: Sequence[int] | None = None, in_place: bool = False,
) -> np.ndarray:
    """A boxed legend (swatch + name) in the top-left corner; ``present`` limits it to those class ids."""
    img = image_bgr if in_place else image_bgr.copy()
    ids = list(range(len(classes))) if present is None else [int(i) for i in present if 0 <= i < len(classes)]
    if not ids:
        return img
    scale = max(0.35, min(img.shape[0], img.shape[1]) / 900)
    th = max(1, int(round(scale * 2)))
    line_h = int(22 * scale / 0.5)
    sw = line_h - 4
    text_w = max(cv2.getTextSize(classes[i], cv2.FONT_HERSHEY_SIMPLEX, scale, th)[0][0] for i in ids)
    box_w, box_h = min(img.shape[1], sw + text_w + 18), min(img.shape[0], line_h * len(ids) + 8)
    roi = img[:box_h, :box_w]
    roi[:] = (roi.astype(np.uint16) * 2 // 5).astype(np.uint8)  # darken behind the legend
    for row, i in enumerate(ids):
        y = 4 + row * line_h
        if y + sw > box_h:
            break
        r, g, b = palette_rgb[i]
        cv2.rectangle(img, (4, y), (4 + sw, y + sw), (int(b), int(g), int(r)), -1)
        cv2.putText(img, classes[i], (10 + sw, y + sw - 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), th,
                    cv2.LINE_AA)
    return img


def uncertainty_to_bgr(unc: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Per-pixel uncertainty -> BGR heat map (brighter = less certain)."""
    vmax = float(unc.max()) if vmax is None else vmax
    u8 = np.clip(unc / max(vmax, 1e-12) * 255, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_INFERNO)
