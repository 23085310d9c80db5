"""PyTorch backend: a model folder run eagerly on CPU or CUDA, in fp32, bf16 or fp16."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from perception.core.card import InputSpec
from perception.core.choices import UNCERTAINTY_MEASURES
from perception.data.transforms import normalization_stats, normalize
from perception.models.precision import autocast_context
from perception.models.bayesian import has_dropout, mc_dropout_predict
from perception.models.io import load
from perception.models.tta import with_tta
from perception.inference.base import Backend, Capabilities, InferenceResult
from perception.inference.cuda_graphs import GraphApi, GraphedStep, TorchCudaGraphs

__all__ = ["TorchBackend", "TorchPrediction", "predict_batch"]

_AMP = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchBackend(Backend):
    """PyTorch on a model folder's weights: fp32, bf16 or fp16, flip TTA, and Monte-Carlo dropout uncertainty for
    Bayesian models (the only backend that samples dropout).

    On a CUDA device it is the GPU path for machines without TensorRT: the weights themselves are cast to
    fp16/bf16 (no autocast casts between kernels), channels_last by default (cuDNN's tensor-core layout),
    frames uploaded from a pinned staging buffer, the BGR->RGB swap and normalisation done on the GPU, and the
    whole step (preprocessing, network, argmax) replayed from a CUDA graph per input size
    (:class:`~perception.inference.cuda_graphs.GraphedStep`; MC-dropout sampling runs eagerly).
    """

    name = "torch"

    def __init__(
        self, model_dir: str | Path, *, device: str = "cpu", precision: str = "fp32", mc_samples: int = 8,
        threads: int | None = None, channels_last: bool | None = None, tta: str = "none",
        cuda_graphs: bool | None = None, graph_api: GraphApi | None = None, uncertainty_measure: str = "entropy",
    ) -> None:
        if precision not in _AMP:
            raise ValueError(f"precision must be one of {sorted(_AMP)}, got {precision!r}")
        if uncertainty_measure not in UNCERTAINTY_MEASURES:
            raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {uncertainty_measure!r}")
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and not torch.cuda.is_available():
            raise RuntimeError("device cuda requested but CUDA is not available")
        if threads:
            torch.set_num_threads(threads)
        self.model = load(model_dir, map_location=self.device)
        super().__init__(self.model.card)
        self.precision = precision
        self.mc_samples = mc_samples
        self.uncertainty_measure = uncertainty_measure
        self.bayesian = has_dropout(self.model)
        self._amp = _AMP[precision]
        if on_cuda and precision != "fp32":  # the weights in fp16/bf16: no per-op autocast casts on the GPU
            self.model = self.model.to(_DTYPES[precision])
            self._amp = "off"
        # channels_last helps bf16 *training* on CPU, but measured slower for bf16 inference here
        # (tools/benchmark.py): off by default on CPU; on CUDA it is cuDNN's fast layout for fp16.
        self.channels_last = on_cuda if channels_last is None else channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.tta = tta
        self.net = with_tta(self.model, tta)  # the model itself, or the mirror-averaging wrapper
        use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.graphed = GraphedStep(self._step, graph_api or TorchCudaGraphs(self.device)) if use_graphs else None
        self._pinned: dict[tuple[int, ...], torch.Tensor] = {}
        self._stats = normalization_stats(self.card.input, self.device)  # on the device once: graphs copy nothing in

    @property
    def capabilities(self) -> Capabilities:
        """Probabilities always; uncertainty for models that sample dropout (Bayesian SegNet)."""
        return Capabilities(uncertainty=self.bayesian)

    def close(self) -> None:
        """Drop the captured graphs (each holds its activations' memory) and the pinned buffers."""
        self.graphed = None
        self._pinned.clear()

    def _upload(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 BGR frames (N, H, W, 3) on the model's device; to a GPU through a pinned buffer per shape
        (reused: each call has copied its results back before the next upload)."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.ascontiguousarray(frames))
        pinned = self._pinned.get(frames.shape)
        if pinned is None:
            pinned = self._pinned[frames.shape] = torch.empty(frames.shape, dtype=torch.uint8).pin_memory()
        np.copyto(pinned.numpy(), frames)
        return pinned.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def _step(self, frames_bgr: torch.Tensor, *, probs: bool, mc_samples: int | None = None) -> tuple:
        """uint8 BGR (N, H, W, 3) on the device -> (uint8 labels, probabilities or an empty tensor, uncertainty
        or an empty tensor): what one call computes, and what a CUDA graph records."""
        x = frames_bgr.permute(0, 3, 1, 2).flip(1)  # RGB-ordered NCHW; normalize() applies the card's order
        out = predict_batch(self.net, x, self.card.input, amp=self._amp, channels_last=self.channels_last,
                            probs=probs, mc_samples=mc_samples, stats=self._stats,
                            uncertainty_measure=self.uncertainty_measure)
        empty = x.new_empty(0)
        return (out.labels.to(torch.uint8), out.probs.float() if out.probs is not None else empty,
                out.uncertainty.float() if out.uncertainty is not None else empty)

    @torch.inference_mode()
    def _infer(self, frames: np.ndarray, *, probs: bool, uncertainty: bool) -> InferenceResult:
        x = self._upload(frames)
        mc = self.mc_samples if uncertainty and self.bayesian else None
        if self.graphed is not None and mc is None:
            labels, p, u = self.graphed(x, probs=probs)
        else:
            labels, p, u = self._step(x, probs=probs, mc_samples=mc)
        return InferenceResult(labels.cpu().numpy(), p.cpu().numpy() if probs else None,
                               u.cpu().numpy() if mc else None)


@dataclass
class TorchPrediction:
    """What :func:`predict_batch` returns: labels (N, H, W) int64, and on request class probabilities
    (N, C, H, W) and the MC-dropout uncertainty map (N, H, W)."""

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
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    uncertainty_measure: str = "entropy",
) -> TorchPrediction:
    """The one PyTorch inference step (the node's TorchBackend and evaluation both run it): a uint8
    RGB batch (N, 3, H, W) on the model's device -> labels, with the card's preprocessing
    (:func:`~perception.data.transforms.normalize`) and autocast ``amp`` ("off", "bf16", "fp16").

    ``mc_samples`` runs Monte-Carlo dropout (labels: the argmax of the samples' mean probabilities,
    plus the uncertainty map ``uncertainty_measure`` names: :data:`~perception.core.choices.UNCERTAINTY_MEASURES`);
    otherwise the network runs in eval mode and labels are the logits' argmax.
    ``net`` may be a wrapper of the model (e.g. :func:`~perception.models.tta.with_tta`'s).
    """
    param = next(net.parameters())
    x = normalize(images_u8.to(param.device), spec, stats=stats).to(param.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_context(param.device, amp):
        if mc_samples:
            pred = mc_dropout_predict(net, x, samples=mc_samples)
            return TorchPrediction(pred.labels, pred.probs if probs else None, pred.uncertainty_map(uncertainty_measure))
        net.eval()
        logits = net(x)
        return TorchPrediction(logits.argmax(1), torch.softmax(logits.float(), dim=1) if probs else None)
