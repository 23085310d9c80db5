"""Evaluation at the data's native resolution with the paper's metrics (shared by training and
``perception-eval``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from perception.core.card import InputSpec
from perception.eval.scoring import score_predictions
from perception.inference.torch import predict_batch
from perception.models.tta import TTA_MODES, with_tta

__all__ = ["predict_labels", "evaluate", "TTA_MODES"]


def predict_labels(
    model: nn.Module,
    images_u8: torch.Tensor,
    spec: InputSpec,
    *,
    amp: str = "off",
    mc_samples: int | None = None,
    channels_last: bool = False,
    tta: str = "none",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (N, 3, H, W) RGB batch -> (labels (N, H, W) int64, uncertainty (N, H, W) or None).

    ``tta="flip"`` averages the logits of each image and its mirror image (mirrored back), within
    each Monte-Carlo sample when ``mc_samples`` is given. The step itself is the node's:
    :func:`perception.inference.torch.predict_batch`.
    """
    out = predict_batch(with_tta(model, tta), images_u8, spec, amp=amp, mc_samples=mc_samples,
                        channels_last=channels_last)
    return out.labels, out.uncertainty


def evaluate(
    model: nn.Module,
    dataset,
    spec: InputSpec,
    *,
    amp: str = "off",
    mc_samples: int | None = None,
    boundary: bool = True,
    progress: bool = True,
    on_prediction: Callable[[int, np.ndarray], None] | None = None,
    channels_last: bool = False,
    seed: int = 0,
    tta: str = "none",
) -> dict[str, Any]:
    """Predict every image of ``dataset`` (items: uint8 3xHxW tensor, int64 HxW tensor) and score it.

    ``on_prediction(index, labels_uint8)`` is called per image (e.g. to save predictions).
    With ``mc_samples``, the dropout masks are drawn from ``seed`` (the caller's random state is
    restored afterwards), so a Monte-Carlo evaluation reproduces exactly.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()

    def predict(i: int) -> tuple[np.ndarray, np.ndarray]:
        img, lab = dataset[i]
        labels, _ = predict_labels(model, img[None], spec, amp=amp, mc_samples=mc_samples,
                                   channels_last=channels_last, tta=tta)
        return labels[0].cpu().numpy().astype(np.uint8), lab.numpy()

    # fork_rng restores the caller's random state; only MC dropout draws random numbers here.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=bool(mc_samples)):
        if mc_samples:
            torch.manual_seed(seed)
        try:
            return score_predictions(predict, len(dataset), dataset.num_classes, dataset.ignore_index,
                                     boundary=boundary, progress=progress, on_prediction=on_prediction)
        finally:
            model.train(was_training)
