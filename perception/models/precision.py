"""Mixed precision for the models: one context for training, evaluation and the PyTorch backend."""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["autocast_context"]


def autocast_context(device: torch.device | str, amp: str):
    device = torch.device(device)
    if amp == "off":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)
