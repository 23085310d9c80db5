"""The model card (``model.json``): what a model is, how a frame becomes its input, what its outputs
mean, and how it was trained and measured. Torch-free: runtimes that only run ONNX or TensorRT read it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ModelCard", "InputSpec", "load_card", "has_mc_dropout", "WEIGHTS_FILE", "CARD_FILE", "ONNX_FILE", "CARD_SCHEMA",
    "INT8_ONNX_FILE", "ENGINE_SUFFIX", "ENGINE_SIDECAR_SUFFIX", "HELDOUT_PREFIX", "CARD_METRIC_KEYS", "INT8_SUFFIX",
    "metrics_key", "int8_metrics_key", "int8_metric_pairs",
]

# The files of a model folder (perception.core.model_folder.ModelFolder answers which are there and usable).
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"  # the exported graph a torch-free runtime runs (labels out)
INT8_ONNX_FILE = "model_int8.onnx"  # its int8 graph (tools/ship_int8.py)
ENGINE_SUFFIX = ".engine"  # TensorRT engines built into the folder (tools/build_engine.py) ...
ENGINE_SIDECAR_SUFFIX = ".json"  # ... each with <engine>.json beside it
HELDOUT_PREFIX = "heldout_"  # heldout_<drive>/: the card of the recipe's run on a drive it never trained on
CARD_SCHEMA = 1

# The card's metric records: ``metrics[key]`` per evaluation, key = split or ``holdout_<drives>``, and
# ``<key>_int8`` for the folder's int8 graph on the same frames.
CARD_METRIC_KEYS = ("global_accuracy", "class_accuracy", "miou", "bf", "per_class_accuracy", "per_class_iou",
                    "per_class_bf")
INT8_SUFFIX = "_int8"


def metrics_key(split: str, groups: list[str] | None = None) -> str:
    """``holdout_0006R0`` for drives held out of a split, else the split's name."""
    return "holdout_" + "+".join(groups) if groups else str(split)


def int8_metrics_key(key: str) -> str:
    """The key of the int8 graph's record beside the fp32 record ``key``."""
    return key + INT8_SUFFIX


def int8_metric_pairs(metrics: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(key, fp32 mIoU, int8 mIoU)`` for every evaluation the card records in both precisions."""
    pairs = []
    for key, m in metrics.items():
        base = metrics.get(key.removesuffix(INT8_SUFFIX))
        if key.endswith(INT8_SUFFIX) and isinstance(m, dict) and isinstance(base, dict) and "miou" in m and "miou" in base:
            pairs.append((key.removesuffix(INT8_SUFFIX), float(base["miou"]), float(m["miou"])))
    return pairs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InputSpec:
    """How a frame becomes the model's input: ``(pixel[color_order] * scale - mean) / std``, NCHW float."""

    color_order: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    height: int = 360
    width: int = 480

    def __post_init__(self) -> None:
        if self.color_order not in ("RGB", "BGR"):
            raise ValueError(f"color_order must be RGB or BGR, got {self.color_order!r}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)


@dataclass
class ModelCard:
    """What a model is and how to run it (``model.json``): the architecture to rebuild it (``get_model``
    arguments), class names and palette, the input contract (:class:`InputSpec`), whether it samples
    dropout at test time, how it was trained (command, data, machine, resumes) and what it scored
    (``metrics`` by split, e.g. ``holdout_0006R0``). Runtimes without PyTorch read it too."""

    id: str
    architecture: dict[str, Any]  # {"name", "num_classes", "kwargs"}: what get_model needs
    classes: list[str]
    palette: list[list[int]]  # RGB per class
    input: InputSpec = field(default_factory=InputSpec)
    ignore_index: int | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # Whether the model samples dropout at test time (MC dropout: Bayesian SegNet), recorded when the
    # folder is saved (models.io.save), so runtimes know it without building the model.
    mc_dropout: bool = False
    schema: int = CARD_SCHEMA

    def __post_init__(self) -> None:
        if isinstance(self.input, dict):
            self.input = InputSpec(**self.input)
        k = self.architecture.get("num_classes")
        if k != len(self.classes) or k != len(self.palette):
            raise ValueError(
                f"model card is inconsistent: num_classes={k}, {len(self.classes)} class names, "
                f"{len(self.palette)} palette entries"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        if d.get("schema", CARD_SCHEMA) > CARD_SCHEMA:
            raise ValueError(f"model card schema {d['schema']} is newer than this package supports ({CARD_SCHEMA})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            d = {k: v for k, v in d.items() if k in known} | {"extra": {**d.get("extra", {}), **{k: d[k] for k in unknown}}}
        return cls(**d)


def load_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a model folder (no {CARD_FILE}): {directory}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return ModelCard.from_dict(data)



def has_mc_dropout(card: ModelCard) -> bool:
    """Whether the model samples dropout at test time (Bayesian SegNet variants): the card's own
    ``mc_dropout`` (no model is built, and nothing is inferred from names)."""
    return bool(card.mc_dropout)
