"""Open a dataset by folder and split name, whatever its layout (CamVid list files or image folders),
joining splits and selecting drives."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from perception.core.classes import default_palette
from perception.data.camvid import CamVid
from perception.data.folder import FolderDataset, SegmentationListDataset, Transform, parse_list_file, read_class_file
from perception.data.splits import DEFAULT_GROUP_PATTERN, split_pairs_by_group

__all__ = ["open_dataset"]


def open_dataset(
    root: str | Path,
    split: str,
    *,
    transform: Transform | None = None,
    cache: bool = False,
    groups: Sequence[str] | None = None,
    exclude_groups: Sequence[str] | None = None,
    group_pattern: str | None = None,
):
    """CamVid-layout (``root/<split>.txt``) or folder-layout (``root/<split>/images``) dataset.

    ``split`` may join several splits with ``+`` (``train+val``). ``groups`` keeps only the frames of
    those groups (drives), ``exclude_groups`` drops them (see :mod:`perception.data.splits`).
    """
    parts = [p for p in str(split).split("+") if p]
    if not parts:
        raise ValueError(f"empty split name {split!r}")
    sets = [_open_one(root, p, transform=transform, cache=cache) for p in parts]
    dataset = sets[0]
    if len(sets) > 1:
        for other, name in zip(sets[1:], parts[1:]):
            if other.classes != dataset.classes or other.ignore_index != dataset.ignore_index:
                raise ValueError(f"split {name!r} has other classes than {parts[0]!r}")
        dataset = dataset.with_pairs([pair for s in sets for pair in s.pairs])
        dataset.split = "+".join(parts)
    pattern = group_pattern or DEFAULT_GROUP_PATTERN
    if groups:
        dataset = dataset.with_pairs(split_pairs_by_group(dataset.pairs, holdout=list(groups), pattern=pattern)[1])
    if exclude_groups:
        dataset = dataset.with_pairs(split_pairs_by_group(dataset.pairs, holdout=list(exclude_groups), pattern=pattern)[0])
    return dataset


def _open_one(root: str | Path, split: str, *, transform: Transform | None, cache: bool):
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if (root / f"{split}.txt").is_file():
        if (root / "classes.txt").is_file():
            classes, palette = read_class_file(root / "classes.txt")
            return SegmentationListDataset(
                parse_list_file(root / f"{split}.txt", root), num_classes=len(classes), ignore_index=255, transform=transform,
                cache=cache, classes=classes, palette=palette or default_palette(len(classes)),
            )
        return CamVid(root, split, transform=transform, cache=cache)
    if (root / split / "images").is_dir():
        return FolderDataset(root, split, transform=transform, cache=cache)
    raise FileNotFoundError(
        f"no split {split!r} in {root}: expected {root / (split + '.txt')} (CamVid layout) "
        f"or {root / split / 'images'} (folder layout)"
    )
