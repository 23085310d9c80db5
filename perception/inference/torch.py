"""PyTorch backend: a model folder run eagerly on CPU or CUDA, in fp32, bf16 or fp16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from perception.data.transforms import normalize
from perception.models.precision import autocast_context
from perception.models.bayesian import has_dropout, mc_dropout_predict
from perception.models.io import load
from perception.models.tta import with_tta
from perception.inference.base import Backend, Capabilities, InferenceResult

__all__ = ["TorchBackend"]

_AMP = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}


class TorchBackend(Backend):
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
        return Capabilities(uncertainty=self.bayesian)

    @torch.inference_mode()
    def _infer(self, frames: np.ndarray, *, probs: bool, uncertainty: bool) -> InferenceResult:
        # BGR frames -> RGB-ordered uint8 NCHW; normalize() applies the card's colour order and mean/std.
        x = torch.from_numpy(frames[..., ::-1].copy()).permute(0, 3, 1, 2).to(self.device)
        x = normalize(x, self.card.input)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, _AMP[self.precision]):
            if uncertainty and self.bayesian:
                pred = mc_dropout_predict(self.net, x, samples=self.mc_samples)
                p, unc = pred.probs, pred.uncertainty.float().cpu().numpy()
            else:
                p, unc = torch.softmax(self.net(x).float(), dim=1), None
        labels = p.argmax(1).to(torch.uint8).cpu().numpy()
        return InferenceResult(labels, p.float().cpu().numpy() if probs else None, unc)
