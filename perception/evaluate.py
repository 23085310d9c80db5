"""Evaluation at the data's native resolution with the paper's metrics (shared by training and
``perception-eval``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.transforms import normalize
from .metrics import SegmentationMetrics
from .models.bayesian import mc_dropout_predict
from .models.io import InputSpec

__all__ = ["autocast_context", "predict_labels", "evaluate", "TTA_MODES"]

TTA_MODES = ("none", "flip")


def autocast_context(device: torch.device | str, amp: str):
    device = torch.device(device)
    if amp == "off":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


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

    ``tta="flip"`` averages the logits of each image and its mirror image (mirrored back); with MC
    dropout, the mean probabilities of the two are averaged.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    device = next(model.parameters()).device
    x = normalize(images_u8.to(device), spec)
    if tta == "flip":
        x = torch.cat([x, x.flip(-1)])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n = images_u8.shape[0]
    with autocast_context(device, amp):
        if mc_samples:
            pred = mc_dropout_predict(model, x, samples=mc_samples)
            if tta != "flip":
                return pred.labels, pred.uncertainty
            probs = (pred.probs[:n] + pred.probs[n:].flip(-1)) / 2
            return probs.argmax(1), (pred.uncertainty[:n] + pred.uncertainty[n:].flip(-1)) / 2
        model.eval()
        logits = model(x).float()
        if tta == "flip":
            logits = (logits[:n] + logits[n:].flip(-1)) / 2
        return logits.argmax(1), None


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
