"""Segmentation datasets from files: a list file of ``image label`` pairs, or a plain folder of
``images/`` + ``labels/`` (label PNGs hold class ids) + ``classes.txt``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np


from perception.core.classes import default_palette
from perception.core.fileio import IMAGE_SUFFIXES, list_images  # IMAGE_SUFFIXES re-exported

__all__ = [
    "read_image_rgb",
    "read_label",
    "SegmentationListDataset",
    "parse_list_file",
    "FolderDataset",
    "read_class_file",
    "IMAGE_SUFFIXES",
]



def read_image_rgb(path: str | Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path} (missing, or not an image file)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path) -> np.ndarray:
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise OSError(f"cannot read label {path} (missing, or not an image file)")
    if lab.ndim != 2:
        raise ValueError(f"label {path} has {lab.shape[2]} channels; expected a single-channel PNG of class ids")
    if lab.dtype != np.uint8:
        if lab.max() > 255:
            raise ValueError(f"label {path} has class ids above 255")
        lab = lab.astype(np.uint8)
    return lab


Transform = Callable[[np.ndarray, np.ndarray], Any]


def parse_list_file(list_file: str | Path, root: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Pairs from a list file, one ``image_path label_path`` per line, relative to ``root``.

    Absolute paths from other machines (the SegNet tutorial ships ``/SegNet/CamVid/train/x.png``) are
    resolved by their last two components under ``root``.
    """
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent

    def resolve(p: str) -> Path:
        path = Path(p)
        if path.is_absolute():
            return path if path.is_file() else base / Path(*path.parts[-2:])
        return base / path

    pairs = []
    for n, line in enumerate(list_file.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{list_file}:{n}: expected 'image label', got {line!r}")
        pairs.append((resolve(parts[0]), resolve(parts[1])))
    if not pairs:
        raise ValueError(f"{list_file} lists no images")
    return pairs


class SegmentationListDataset:  # a map-style dataset (DataLoader needs only __len__ and __getitem__)
    """(image, label) file pairs; items are (HxWx3 uint8 RGB, HxW uint8 labels) before ``transform``."""

    classes: tuple[str, ...] = ()
    palette: tuple[tuple[int, ...], ...] = ()

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        *,
        num_classes: int,
        ignore_index: int | None,
        transform: Transform | None = None,
        cache: bool = False,
        classes: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        if not self.pairs:
            raise ValueError("dataset has no images")
        missing = [str(p) for pair in self.pairs for p in pair if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} dataset files are missing, e.g. {missing[0]}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        if classes is not None:
            self.classes = tuple(classes)
        if palette is not None:
            self.palette = tuple(tuple(c) for c in palette)
        if len(self.classes) != num_classes:
            raise ValueError(f"{len(self.classes)} class names for {num_classes} classes")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw pair: RGB uint8 image (H, W, 3) and uint8 labels (H, W)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img_path, lab_path = self.pairs[index]
        img, lab = read_image_rgb(img_path), read_label(lab_path)
        if img.shape[:2] != lab.shape:
            raise ValueError(f"{img_path} is {img.shape[:2]} but its label {lab_path} is {lab.shape}")
        if self._cache is not None:
            self._cache[index] = (img, lab)
        return img, lab

    def __getitem__(self, index: int) -> Any:
        img, lab = self.load(index)
        return self.transform(img, lab) if self.transform is not None else (img, lab)

    def labels(self):
        """Iterate label maps only (for class statistics), without augmentation."""
        for i in range(len(self)):
            if self._cache is not None and i in self._cache:
                yield self._cache[i][1]
            else:
                yield read_label(self.pairs[i][1])

    def names(self) -> list[str]:
        return [p[0].name for p in self.pairs]

    def with_pairs(self, pairs: Sequence[tuple[Path, Path]], *, transform: Transform | None | str = "same"):
        """The same dataset (classes, palette, ignore index, caching) over other file pairs."""
        other = copy.copy(self)
        other.pairs = [(Path(a), Path(b)) for a, b in pairs]
        if not other.pairs:
            raise ValueError("dataset has no images")
        if transform != "same":
            other.transform = transform
        other._cache = {} if self._cache is not None else None
        return other

    def preload(self) -> None:
        """Decode every pair into the cache now (before a DataLoader forks its workers)."""
        if self._cache is not None:
            for i in range(len(self)):
                self.load(i)


def read_class_file(path: str | Path) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    """``classes.txt``: one class per line in label order, ``Name`` or ``Name R G B``; '#' comments."""
    names, colours = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 4:
            try:
                colours.append(tuple(int(v) for v in parts[1:]))
            except ValueError:
                raise ValueError(f"{path}:{n}: colour must be three integers, got {parts[1:]}") from None
            names.append(parts[0])
        elif len(parts) == 1:
            names.append(parts[0])
        else:
            raise ValueError(f"{path}:{n}: expected 'Name' or 'Name R G B', got {line!r}")
    if not names:
        raise ValueError(f"{path} lists no classes")
    if colours and len(colours) != len(names):
        raise ValueError(f"{path}: give a colour for every class or for none")
    return names, (colours or None)


class FolderDataset(SegmentationListDataset):
    """A user dataset: ``root/<split>/images/*`` with ``root/<split>/labels/<stem>.png`` and
    ``root/classes.txt``. Label value ``ignore_index`` (default 255) is ignored."""

    def __init__(
        self, root: str | Path, split: str = "train", *, transform: Transform | None = None, cache: bool = False,
        ignore_index: int = 255,
    ) -> None:
        root = Path(root)
        classes, palette = read_class_file(root / "classes.txt")
        img_dir, lab_dir = root / split / "images", root / split / "labels"
        if not img_dir.is_dir() or not lab_dir.is_dir():
            raise FileNotFoundError(f"expected {img_dir} and {lab_dir}")
        images = list_images(img_dir)
        if not images:
            raise ValueError(f"no images in {img_dir}")
        pairs = [(img, lab_dir / f"{img.stem}.png") for img in images]
        super().__init__(
            pairs, num_classes=len(classes), ignore_index=ignore_index, transform=transform, cache=cache,
            classes=classes, palette=palette or default_palette(len(classes)),
        )
        self.split = split
