"""The named choices several commands offer, defined once (torch-free): each CLI's ``choices=`` and the
library's checks import them."""

from __future__ import annotations

import re

__all__ = ["TTA_MODES", "UNCERTAINTY_MEASURES", "PRECISIONS", "TORCH_PRECISIONS", "AMP_CHOICES",
           "CHANNELS_LAST_CHOICES", "DEVICE_HELP", "parse_device"]

TTA_MODES = ("none", "flip")  # test-time augmentation: flip averages the logits of the frame and its mirror
PRECISIONS = ("auto", "fp32", "int8", "bf16", "fp16")  # what a deployed model runs in (inference.resolve)
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")  # what the PyTorch backend runs in
AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # autocast while training and evaluating
CHANNELS_LAST_CHOICES = ("auto", "on", "off")
# A Bayesian model's uncertainty map: the predictive entropy of the MC samples' mean probabilities (nats, 0..ln K),
# the default because it ranks the held-out twin's errors better at every sample count (tools/mc_gains.py,
# docs/training.md), or the Bayesian SegNet paper's mean class variance (0..0.25).
UNCERTAINTY_MEASURES = ("entropy", "variance")

DEVICE_HELP = ("auto (a CUDA GPU where PyTorch sees one, else the CPU), cpu, cuda or cuda:N; on CUDA a model "
               "folder runs in PyTorch (fp16, CUDA graphs) unless a TensorRT engine for this GPU is beside it")


def parse_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (normalised to lower case); ValueError otherwise."""
    device = value.strip().lower()
    if device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device):
        return device
    raise ValueError(f"a device is auto, cpu, cuda or cuda:N, got {value!r}")
