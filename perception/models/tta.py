"""Test-time augmentation as a module, so that evaluation, the PyTorch backend and exported graphs
share one definition."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TTA_MODES", "FlipTTA", "with_tta"]

from perception.core.choices import TTA_MODES  # noqa: E402  (re-exported)


class FlipTTA(nn.Module):
    """Logits of ``model`` averaged over the image and its left-right mirror (mirrored back).

    Both views run as one batch of 2N. Under MC dropout each view draws its own dropout masks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        logits = self.model(torch.cat([x, x.flip(-1)]))
        return (logits[:n] + logits[n:].flip(-1)) / 2


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """``model`` itself for ``"none"``, wrapped in :class:`FlipTTA` for ``"flip"``."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    return FlipTTA(model) if tta == "flip" else model
