"""PyTorch backend: a model folder run eagerly on CPU or CUDA, in fp32, bf16 or fp16."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from perception.core.card import InputSpec
from perception.data.transforms import normalize
from perception.models.precision import autocast_context
from perception.models.bayesian import has_dropout, mc_dropout_predict
from perception.models.io import load
from perception.models.tta import with_tta
from perception.inference.base import Backend, Capabilities, InferenceResult

__all__ = ["TorchBackend", "TorchPrediction", "predict_batch"]

_AMP = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}


class TorchBackend(Backend):
    """PyTorch on a model folder's weights: fp32, bf16 or fp16, flip TTA, and Monte-Carlo dropout uncertainty for
    Bayesian models (the only backend that samples dropout)."""

    name = "torch"

    def __init__(
        self, model_dir: str | Path, *, device: str = "cpu", precision: str = "fp32", mc_samples: int = 8,
        threads: int | None = None, channels_last: bool = False, tta: str = "none",
    ) -> None:
        if precision not in _AMP:
            raise ValueError(f"precision must be one of {sorted(_AMP)}, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device cuda requested but CUDA is not available")
        if threads:
            torch.set_num_threads(threads)
        self.model = load(model_dir, map_location=device)
        super().__init__(self.model.card)
        self.device = torch.device(device)
        self.precision = precision
        self.mc_samples = mc_samples
        self.bayesian = has_dropout(self.model)
        # channels_last helps bf16 *training* on CPU, but measured slower for bf16 inference here
        # (tools/benchmark.py); off by default.
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.tta = tta
        self.net = with_tta(self.model, tta)  # the model itself, or the mirror-averaging wrapper

    @property
    def capabilities(self) -> Capabilities:
        """Probabilities always; uncertainty for models that sample dropout (Bayesian SegNet)."""
        return Capabilities(uncertainty=self.bayesian)

    @torch.inference_mode()
    def _infer(self, frames: np.ndarray, *, probs: bool, uncertainty: bool) -> InferenceResult:
        # BGR frames -> RGB-ordered uint8 NCHW; normalize() (in predict_batch) applies the card's colour order and mean/std.
        x = torch.from_numpy(frames[..., ::-1].copy()).permute(0, 3, 1, 2).to(self.device)
        out = predict_batch(
            self.net, x, self.card.input, amp=_AMP[self.precision], channels_last=self.channels_last, probs=probs,
            mc_samples=self.mc_samples if uncertainty and self.bayesian else None,
        )
        return InferenceResult(
            out.labels.to(torch.uint8).cpu().numpy(),
            out.probs.float().cpu().numpy() if out.probs is not None else None,
            out.uncertainty.float().cpu().numpy() if out.uncertainty is not None else None,
        )


@dataclass
class TorchPrediction:
    """What :func:`predict_batch` returns: labels (N, H, W) int64, and on request class probabilities
    (N, C, H, W) and the MC-dropout uncertainty (N, H, W)."""

    labels: torch.Tensor
    probs: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None


@torch.inference_mode()
def predict_batch(
    net: nn.Module,
    images_u8: torch.Tensor,
    spec: InputSpec,
    *,
    amp: str = "off",
    mc_samples: int | None = None,
    channels_last: bool = False,
    probs: bool = False,
) -> TorchPrediction:
    """The one PyTorch inference step (the node's TorchBackend and evaluation both run it): a uint8
    RGB batch (N, 3, H, W) on the model's device -> labels, with the card's preprocessing
    (:func:`~perception.data.transforms.normalize`) and autocast ``amp`` ("off", "bf16", "fp16").

    ``mc_samples`` runs Monte-Carlo dropout (labels: the argmax of the samples' mean probabilities,
    plus their uncertainty); otherwise the network runs in eval mode and labels are the logits' argmax.
    ``net`` may be a wrapper of the model (e.g. :func:`~perception.models.tta.with_tta`'s).
    """
    param = next(net.parameters())
    x = normalize(images_u8.to(param.device), spec).to(param.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_context(param.device, amp):
        if mc_samples:
            pred = mc_dropout_predict(net, x, samples=mc_samples)
            return TorchPrediction(pred.labels, pred.probs if probs else None, pred.uncertainty)
        net.eval()
        logits = net(x)
        return TorchPrediction(logits.argmax(1), torch.softmax(logits.float(), dim=1) if probs else None)
