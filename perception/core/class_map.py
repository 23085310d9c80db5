"""Class maps: output classes defined as groups of a model's classes ("give me only the road").

A YAML mapping, in output order; each entry is a list of model class names, ``"*"`` (every model
class no other entry names: the catch-all), or a mapping with ``from:`` and an optional ``color:``
(``[R, G, B]``)::

    drivable: {from: [Road], color: [128, 64, 128]}
    walkable: [Pavement]
    obstacle: [Car, Pedestrian, Bicyclist]
    other: "*"

Without a catch-all, pixels of model classes no entry names get the id 255 (:data:`UNLABELED`, black),
vision_msgs' documented value for unlabelled pixels in a mono8 segmentation: they belong to no output
class (``class_pixels`` counts output classes only, so it sums to the image less those pixels). A group's colour defaults
to its first member's. The map relabels the model's decision (the argmax over the model's own
classes); it does not re-decide on merged probabilities, which exported models (labels out) do not
expose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ClassMap", "load_class_map", "parse_class_map", "UNLABELED"]

UNLABELED = 255  # vision_msgs: UNLABELED is the top of the range, 255 for mono8


@dataclass(frozen=True)
class ClassMap:
    """The node's output classes as groups of the model's: names, palette and a lookup table from model class id
    to output id (:data:`UNLABELED` for model classes no group takes)."""

    classes: list[str]  # output class names, index = output id
    palette: list[tuple[int, int, int]]  # RGB per output class
    lut: np.ndarray  # (n_model_classes,) uint8: model class id -> output id, or UNLABELED

    @property
    def unlabeled(self) -> int | None:
        """:data:`UNLABELED` where some model class maps to no output class, else None."""
        return UNLABELED if bool((self.lut == UNLABELED).any()) else None

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Model class ids -> output ids (any array shape)."""
        return self.lut[labels]


def _color(value: Any, where: str) -> tuple[int, int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)):
        raise ValueError(f"{where}: color must be [R, G, B] with integers 0-255, got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


def parse_class_map(spec: Any, model_classes: list[str], model_palette: list[tuple[int, int, int]],
                    *, source: str = "class map") -> ClassMap:
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{source}: expected a mapping of output class -> model classes")
    if len(spec) > UNLABELED:
        raise ValueError(f"{source}: at most {UNLABELED} output classes (id {UNLABELED} marks unlabelled pixels)")
    index = {name: i for i, name in enumerate(model_classes)}
    lut = np.full(len(model_classes), -1, np.int64)
    classes: list[str] = []
    palette: list[tuple[int, int, int]] = []
    catch_all: int | None = None
    for out_id, (name, entry) in enumerate(spec.items()):
        where = f"{source}: {name!r}"
        color = None
        if isinstance(entry, dict):
            unknown_keys = set(entry) - {"from", "color"}
            if unknown_keys or "from" not in entry:
                raise ValueError(f"{where}: use {{from: [...], color: [R, G, B]}}")
            if "color" in entry:
                color = _color(entry["color"], where)
            entry = entry["from"]
        if entry == "*":
            if catch_all is not None:
                raise ValueError(f"{where}: only one catch-all (\"*\") is allowed")
            catch_all = out_id
            members: list[str] = []
        elif isinstance(entry, list) and entry and all(isinstance(m, str) for m in entry):
            members = entry
        else:
            raise ValueError(f"{where}: give a list of model class names or \"*\"")
        unknown = [m for m in members if m not in index]
        if unknown:
            raise ValueError(f"{where}: unknown class {unknown[0]!r}; the model's classes are: "
                             + ", ".join(model_classes))
        for m in members:
            if lut[index[m]] != -1:
                raise ValueError(f"{where}: {m!r} is already in {classes[lut[index[m]]]!r}")
            lut[index[m]] = out_id
        classes.append(str(name))
        default = tuple(model_palette[index[members[0]]]) if members else (64, 64, 64)
        palette.append(color or default)  # type: ignore[arg-type]
    if catch_all is not None:
        lut[lut == -1] = catch_all
    else:
        lut[lut == -1] = UNLABELED
    return ClassMap(classes, palette, lut.astype(np.uint8))


def load_class_map(path: str | Path, model_classes: list[str],
                   model_palette: list[tuple[int, int, int]]) -> ClassMap:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class map not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_class_map(spec, model_classes, model_palette, source=str(path))
