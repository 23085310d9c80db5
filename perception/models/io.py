"""Model folders: ``weights.safetensors`` + ``model.json`` (the model card), rebuilt without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from perception.core.fileio import atomic_write_bytes, sha256_file
from perception.core.card import CARD_FILE, WEIGHTS_FILE, InputSpec, ModelCard, load_card
from perception.models.registry import get_model, model_config

__all__ = [
    "ModelCard", "InputSpec", "save", "load", "load_card", "cast_floating", "WEIGHTS_FILE", "CARD_FILE", "weights_sha256",
]

def save(model: nn.Module, directory: str | Path, card: ModelCard, *, weights_dtype: torch.dtype | None = None) -> Path:
    """Write ``weights.safetensors`` and ``model.json`` into ``directory`` (each atomically).

    ``weights_dtype`` (e.g. ``torch.float16``) stores floating-point tensors at that precision, halving a
    large model's file; :func:`load` upcasts them into the model's fp32 parameters.
    """
    from safetensors.torch import save as st_save

    model = getattr(model, "module", model)
    cfg = model_config(model)
    from perception.models.bayesian import has_dropout

    card.mc_dropout = has_dropout(model)
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
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(f"{weights} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit architecture {arch['name']!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.card = card
    return model.eval()


def weights_sha256(directory: str | Path) -> str:
    return sha256_file(Path(directory) / WEIGHTS_FILE)
