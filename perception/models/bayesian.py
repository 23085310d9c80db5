"""Monte-Carlo dropout prediction for Bayesian SegNet (Kendall, Badrinarayanan, Cipolla; BMVC 2017)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn

from perception.core.choices import UNCERTAINTY_MEASURES

__all__ = ["MCPrediction", "mc_dropout_predict", "has_dropout", "mc_dropout_mode", "predictive_entropy"]


class MCPrediction(NamedTuple):
    """What Monte-Carlo dropout gives per frame: mean probabilities, their labels, the paper's uncertainty and
    the predictive entropy."""

    probs: Tensor  # (N, K, H, W) mean softmax over samples
    labels: Tensor  # (N, H, W) argmax of ``probs``
    uncertainty: Tensor  # (N, H, W) mean over classes of the per-class softmax variance (the paper's)
    entropy: Tensor  # (N, H, W) entropy of ``probs`` in nats

    def uncertainty_map(self, measure: str = "entropy") -> Tensor:
        """The per-pixel map ``measure`` (one of :data:`UNCERTAINTY_MEASURES`) names."""
        if measure not in UNCERTAINTY_MEASURES:
            raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")
        return self.entropy if measure == "entropy" else self.uncertainty


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy in nats over dim 1 of class probabilities (N, K, H, W) -> (N, H, W)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


@contextmanager
def mc_dropout_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (batch norm uses running statistics) with dropout layers sampling; restores modes after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@torch.no_grad()
def mc_dropout_predict(
    model: nn.Module, x: Tensor, *, samples: int = 8, generator_seed: int | None = None, reuse_prefix: bool = True
) -> MCPrediction:
    """Run ``samples`` stochastic forward passes and summarise them.

    The mean and variance are accumulated in float64 one sample at a time, so memory does not grow
    with ``samples``. A model with ``forward_to_dropout``/``forward_from_dropout`` (SegNet, SegNet-Basic)
    computes the layers before its first dropout once per frame: they draw no random numbers and are
    the same in every sample, so the samples are exactly those of whole passes, at a lower cost
    (``reuse_prefix=False`` runs whole passes: the baseline of ``tools/bench_mc.py``).
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    if not has_dropout(model):
        raise ValueError("model has no dropout layers: MC sampling would return the same prediction every time")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    mean = sq = None
    with mc_dropout_mode(model):
        to_dropout = getattr(model, "forward_to_dropout", None)
        from_dropout = getattr(model, "forward_from_dropout", None)
        if reuse_prefix and to_dropout is not None and from_dropout is not None:
            prefix = to_dropout(x)

            def sample() -> Tensor:
                return from_dropout(prefix)
        else:
            def sample() -> Tensor:
                return model(x)
        for _ in range(samples):
            p = torch.softmax(sample().double(), dim=1)
            mean = p if mean is None else mean + p
            sq = p * p if sq is None else sq + p * p
    assert mean is not None and sq is not None
    mean = mean / samples
    var = (sq / samples - mean * mean).clamp_min(0)
    entropy = predictive_entropy(mean)
    return MCPrediction(mean.float(), mean.argmax(1), var.mean(1).float(), entropy.float())
