"""What a model card records of an evaluation, and under which name: shared by training (the card
written with best/ and final/) and tools/ship_model.py (the card of a shipped model), so both write
the same keys that perception-eval prints."""

from __future__ import annotations

from typing import Any

__all__ = ["CARD_METRIC_KEYS", "card_metrics", "metrics_key"]

CARD_METRIC_KEYS = ("global_accuracy", "class_accuracy", "miou", "bf", "per_class_accuracy", "per_class_iou",
                    "per_class_bf")


def card_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The card's record of one evaluation (``evaluate``'s result)."""
    return {k: m[k] for k in CARD_METRIC_KEYS if k in m}


def metrics_key(split: str, groups: list[str] | None = None) -> str:
    """``holdout_0006R0`` for drives held out of a split, else the split's name."""
    return "holdout_" + "+".join(groups) if groups else str(split)
