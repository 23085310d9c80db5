"""Model folders: ``weights.safetensors`` + ``model.json`` (the model card), rebuilt without pickle."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_write_bytes, sha256_file
from .registry import get_model, model_config

__all__ = [
    "ModelCard", "InputSpec", "save", "load", "load_card", "cast_floating", "WEIGHTS_FILE", "CARD_FILE", "weights_sha256",
]

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model.json"
CARD_SCHEMA = 1

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
    id: str
    architecture: dict[str, Any]  # {"name", "num_classes", "kwargs"}: what get_model needs
    classes: list[str]
    palette: list[list[int]]  # RGB per class
    input: InputSpec = field(default_factory=InputSpec)
    ignore_index: int | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
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


def save(model: nn.Module, directory: str | Path, card: ModelCard, *, weights_dtype: torch.dtype | None = None) -> Path:
    """Write ``weights.safetensors`` and ``model.json`` into ``directory`` (each atomically).

    ``weights_dtype`` (e.g. ``torch.float16``) stores floating-point tensors at that precision, halving a
    large model's file; :func:`load` upcasts them into the model's fp32 parameters.
    """
    from safetensors.torch import save as st_save

    model = getattr(model, "module", model)
    cfg = model_config(model)
    if cfg != card.architecture:
        raise ValueError(f"card architecture {card.architecture} does not match the model's {cfg}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if weights_dtype is not None:
        state = cast_floating(state, weights_dtype)
        card.training["weights_dtype"] = str(weights_dtype).removeprefix("torch.")
    atomic_write_bytes(directory / WEIGHTS_FILE, st_save(state, metadata={"format": "pt", "model_id": card.id}))
    atomic_write_bytes(directory / CARD_FILE, (json.dumps(card.to_dict(), indent=2) + "\n").encode())
    return directory


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to ``dtype``; integer tensors (batch-norm counters) unchanged.

    Raises ValueError where a value would not survive the cast (overflow to infinity).
    """
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            cast = v.to(dtype)
            if not torch.isfinite(cast).all() and torch.isfinite(v).all():
                raise ValueError(f"{k} does not fit {dtype} (largest magnitude {v.abs().max().item():.3g})")
            v = cast
        out[k] = v.contiguous()
    return out


def load_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a model folder (no {CARD_FILE}): {directory}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return ModelCard.from_dict(data)


def load(directory: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model described by ``directory/model.json`` and load its safetensors weights.

    Returns the model in eval mode with the card attached as ``model.card``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    card = load_card(directory)
    arch = card.architecture
    model = get_model(arch["name"], num_classes=arch["num_classes"], **arch.get("kwargs", {}))
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"model folder {directory} has no {WEIGHTS_FILE}")
    state = load_file(str(weights), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit architecture {arch['name']!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.card = card
    return model.eval()


def weights_sha256(directory: str | Path) -> str:
    return sha256_file(Path(directory) / WEIGHTS_FILE)
