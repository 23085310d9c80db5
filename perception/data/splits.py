"""Splits that hold out whole drives (sequences), so that model selection predicts a road never seen.

Frames of one drive are near-duplicates of each other: a validation set interleaved with the training
frames of the same drive (CamVid's ``val``) rewards memorising that drive. Holding out every frame of
one or more drives is the honest proxy for a new road.

A frame's *group* (its drive) is read from its image file name with a regular expression whose first
capture group is the drive: the default takes everything before the first ``_`` (CamVid names its
frames ``0006R0_f02310.png``). A user's data with other names passes its own pattern, or lists the
held-out images in a file instead.

Split specifications, as ``perception-train`` and ``perception-eval`` take them:

* ``train`` / ``val`` / ``train+val``: named splits of the dataset, ``+`` joins several;
* with ``holdout=["0006R0"]`` the held-out groups' frames leave the training images and form the
  selection set.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["DEFAULT_GROUP_PATTERN", "group_of", "group_counts", "split_pairs_by_group", "read_name_list"]

DEFAULT_GROUP_PATTERN = r"^(.+?)_"

Pair = tuple[Path, Path]


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"bad group pattern {pattern!r}: {e}") from None
    if rx.groups < 1:
        raise ValueError(f"group pattern {pattern!r} needs a capture group, e.g. '^(.+?)_'")
    return rx


def group_of(name: str, pattern: str = DEFAULT_GROUP_PATTERN) -> str:
    """The group (drive) of an image file name; raises ValueError where the pattern does not match."""
    m = _compile(pattern).search(Path(name).name)
    if m is None:
        raise ValueError(f"image name {Path(name).name!r} does not match the group pattern {pattern!r}")
    return m.group(1)


def group_counts(pairs: Iterable[Pair], pattern: str = DEFAULT_GROUP_PATTERN) -> dict[str, int]:
    """Frames per group, in order of first appearance."""
    return dict(Counter(group_of(img.name, pattern) for img, _ in pairs))


def read_name_list(path: str | Path) -> set[str]:
    """Image names (or paths: only the file name counts) one per line; blank lines and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out list file not found: {path}")
    names = {Path(line.split("#", 1)[0].split()[0]).name for line in path.read_text().splitlines()
             if line.split("#", 1)[0].strip()}
    if not names:
        raise ValueError(f"{path} lists no images")
    return names


def split_pairs_by_group(
    pairs: Sequence[Pair],
    *,
    holdout: Sequence[str] = (),
    holdout_list: str | Path | None = None,
    pattern: str = DEFAULT_GROUP_PATTERN,
) -> tuple[list[Pair], list[Pair]]:
    """(kept, held_out): the pairs whose group is in ``holdout`` or whose image is named in
    ``holdout_list`` are held out. Unknown groups and list entries missing from the data are errors."""
    if not holdout and holdout_list is None:
        raise ValueError("nothing to hold out: give groups or a list file")
    held: list[Pair] = []
    kept: list[Pair] = []
    if holdout:
        counts = group_counts(pairs, pattern)
        unknown = [g for g in holdout if g not in counts]
        if unknown:
            available = ", ".join(f"{g} ({n})" for g, n in counts.items())
            raise ValueError(f"held-out group(s) {unknown} not in the data; groups (frames): {available}")
    names = read_name_list(holdout_list) if holdout_list is not None else set()
    if names:
        present = {img.name for img, _ in pairs}
        missing = sorted(names - present)
        if missing:
            raise ValueError(f"{len(missing)} image(s) of {holdout_list} are not in the data, e.g. {missing[0]}")
    wanted = set(holdout)
    for img, lab in pairs:
        out = img.name in names or (bool(wanted) and group_of(img.name, pattern) in wanted)
        (held if out else kept).append((img, lab))
    return kept, held
