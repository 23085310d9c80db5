"""An explicit model registry: names map to keyword-only builder functions."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from torch import nn

__all__ = ["register_model", "get_model", "list_models", "model_config"]

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_BUILDERS: dict[str, Builder] = {}

# Builder arguments that only initialise weights (e.g. a path to pretrained encoder weights): they are
# not part of the architecture, so they are not recorded in the config saved with the weights.
INIT_ONLY_KWARGS = frozenset({"encoder_weights"})


def register_model(name: str) -> Callable[[B], B]:
    """Decorator: register ``builder`` under ``name``. Duplicate names are an error, not an override."""

    def decorate(builder: B) -> B:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered (by {_BUILDERS[name].__module__})")
        params = inspect.signature(builder).parameters
        if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params.values()):
            raise TypeError(f"builder for {name!r} must take keyword-only arguments")
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def get_model(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build model ``name``. The result carries ``model_config(model)`` so it can be rebuilt from disk."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = builder(num_classes=num_classes, **kwargs)
    arch_kwargs = {k: v for k, v in kwargs.items() if k not in INIT_ONLY_KWARGS}
    model.segnet_config = {"name": name, "num_classes": num_classes, "kwargs": arch_kwargs}
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """``{"name", "num_classes", "kwargs"}`` of a model built by :func:`get_model`."""
    model = getattr(model, "module", model)  # unwrap DDP
    try:
        return dict(model.segnet_config)
    except AttributeError:
        raise ValueError("model was not built by perception.models.get_model") from None
