"""Evaluation at the data's native resolution with the paper's metrics (shared by training and
``perception-eval``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from perception.data.transforms import normalize
from perception.eval.metrics import SegmentationMetrics
from perception.models.bayesian import mc_dropout_predict
from perception.core.card import InputSpec
from perception.models.precision import autocast_context
from perception.models.tta import TTA_MODES, with_tta

__all__ = ["autocast_context", "predict_labels", "evaluate", "TTA_MODES"]


@torch.no_grad()
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
    each Monte-Carlo sample when ``mc_samples`` is given.
    """
    net = with_tta(model, tta)
    param = next(model.parameters())
    x = normalize(images_u8.to(param.device), spec).to(param.dtype)
    device = param.device
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_context(device, amp):
        if mc_samples:
            pred = mc_dropout_predict(net, x, samples=mc_samples)
            return pred.labels, pred.uncertainty
        model.eval()
        return net(x).argmax(1), None


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
    from tqdm.auto import tqdm

    metrics = SegmentationMetrics(dataset.num_classes, dataset.ignore_index, boundary=boundary)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    # fork_rng restores the caller's random state; only MC dropout draws random numbers here.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=bool(mc_samples)):
        if mc_samples:
            torch.manual_seed(seed)
        try:
            for i in tqdm(range(len(dataset)), desc="eval", unit="img", disable=not progress, leave=False):
                img, lab = dataset[i]
                labels, _ = predict_labels(
                    model, img[None], spec, amp=amp, mc_samples=mc_samples, channels_last=channels_last, tta=tta
                )
                pred = labels[0].cpu().numpy().astype(np.uint8)
                metrics.update(pred, lab.numpy())
                if on_prediction is not None:
                    on_prediction(i, pred)
        finally:
            model.train(was_training)
    return metrics.compute()
