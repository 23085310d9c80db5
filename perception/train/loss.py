"""Class-weighted cross entropy with a choice of normalisation.

Caffe's ``SoftmaxWithLoss`` (the paper) sums the weighted per-pixel losses and divides by the number of
non-ignored pixels; PyTorch's weighted ``mean`` divides by the sum of the pixels' weights instead. With
median-frequency weights on CamVid the two differ by about 2x, which matters at the paper's lr 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegmentationLoss", "distillation_loss"]


class SegmentationLoss(nn.Module):
    """Weighted cross-entropy over labelled pixels, normalised as Caffe's SoftmaxWithLoss (by the count of
    non-void pixels) or as PyTorch's weighted mean, with optional label smoothing."""

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        ignore_index: int = -100,
        normalization: str = "valid_pixels",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if normalization not in ("valid_pixels", "weights"):
            raise ValueError(f"normalization must be 'valid_pixels' or 'weights', got {normalization!r}")
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.ignore_index = ignore_index
        self.normalization = normalization
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()  # the loss in fp32 even under autocast
        if self.normalization == "weights":
            return F.cross_entropy(
                logits, target, weight=self.weight, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
            )
        total = F.cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index, reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        valid = (target != self.ignore_index).sum().clamp_min(1)
        return total / valid


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s soft-target term, per pixel: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    averaged over every pixel (void ones too: the teacher has an opinion there). The ``T^2`` keeps its
    gradients on the scale of the cross entropy's whatever the temperature."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(dim=1)
    return kl.mean() * t * t
