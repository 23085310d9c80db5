"""What a model card records of an evaluation, and under which name: shared by training (the card
written with best/ and final/) and tools/ship_model.py (the card of a shipped model), so both write
the same keys that perception-eval prints."""

from __future__ import annotations

from typing import Any

from perception.core.card import CARD_METRIC_KEYS, metrics_key

__all__ = ["CARD_METRIC_KEYS", "card_metrics", "metrics_key"]


def card_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The card's record of one evaluation (``evaluate``'s result)."""
    return {k: m[k] for k in CARD_METRIC_KEYS if k in m}

