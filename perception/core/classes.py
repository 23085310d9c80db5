"""Class names and colours: CamVid's (the shipped models' classes) and distinct colours for classes
without a palette. Torch-free."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["CAMVID_CLASSES", "CAMVID_PALETTE", "CAMVID_VOID", "CAMVID_REFERENCE_WEIGHTS", "default_palette"]

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
# The usual CamVid colours (RGB), as in the SegNet tutorial's colour map.
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),  # Sky
    (128, 0, 0),  # Building
    (192, 192, 128),  # Pole
    (128, 64, 128),  # Road
    (60, 40, 222),  # Pavement
    (128, 128, 0),  # Tree
    (192, 128, 128),  # SignSymbol
    (64, 64, 128),  # Fence
    (64, 0, 128),  # Car
    (64, 64, 0),  # Pedestrian
    (0, 128, 192),  # Bicyclist
)
CAMVID_VOID = 11
# Median-frequency weights shipped with the reference SegNet CamVid model. They cannot be recomputed
# from the released labels (see ``class_weights.median_frequency_weights`` for the recomputed ones).
CAMVID_REFERENCE_WEIGHTS: tuple[float, ...] = (
    0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614,
)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours for classes without a palette (golden-ratio hues)."""
    out = []
    for i in range(num_classes):
        hue = int((i * 0.618033988749895 % 1.0) * 180)
        hsv = np.uint8([[[hue, 200, 230]]])
        out.append(tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]))
    return out
