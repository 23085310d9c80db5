"""The named choices several commands offer, defined once (torch-free): each CLI's ``choices=`` and the
library's checks import them."""

from __future__ import annotations

__all__ = ["TTA_MODES", "PRECISIONS", "TORCH_PRECISIONS", "AMP_CHOICES", "CHANNELS_LAST_CHOICES"]

TTA_MODES = ("none", "flip")  # test-time augmentation: flip averages the logits of the frame and its mirror
PRECISIONS = ("auto", "fp32", "int8", "bf16", "fp16")  # what a deployed model runs in (inference.resolve)
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")  # what the PyTorch backend runs in
AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # autocast while training and evaluating
CHANNELS_LAST_CHOICES = ("auto", "on", "off")
