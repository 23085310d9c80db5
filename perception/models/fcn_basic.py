"""FCN-Basic and its Table 1 ablations: SegNet-Basic's encoder with an FCN decoder (paper section 3.1).

Decoder: encoder maps are reduced to K channels by 1x1 convs (unless NoDimReduction), upsampled by
8x8 stride-2 learned deconvolutions initialised to bilinear interpolation, and the reduced skip map of
the next-shallower encoder is added element-wise (unless NoAddition).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from perception.models.registry import register_model
from perception.models.segnet_basic import WIDTH, BasicEncoder

__all__ = ["FCNBasic", "bilinear_deconv_weight"]

DECONV_KERNEL = 8
DECONV_STRIDE = 2


def bilinear_deconv_weight(channels: int, kernel: int = DECONV_KERNEL, stride: int = DECONV_STRIDE) -> Tensor:
    """Channel-diagonal bilinear kernel for ``ConvTranspose2d(channels, channels, kernel, stride)``.

    The FCN bilinear filter of this size sums to ``kernel/2`` per axis; scaled by ``stride/(kernel/2)``
    per axis, each output pixel's taps sum to 1, so a constant map stays constant.
    """
    factor = (kernel + 1) // 2
    center = factor - 1 if kernel % 2 == 1 else factor - 0.5
    og = torch.arange(kernel, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    filt = torch.outer(filt1d, filt1d) * (stride / factor) ** 2
    w = torch.zeros(channels, channels, kernel, kernel, dtype=torch.float64)
    idx = torch.arange(channels)
    w[idx, idx] = filt
    return w.float()


class _Upsample2x(nn.ConvTranspose2d):
    """8x8 stride-2 deconvolution (exactly 2x: padding 3), cropped to the target size (odd sides)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, DECONV_KERNEL, stride=DECONV_STRIDE, padding=3, bias=False)
        with torch.no_grad():
            self.weight.copy_(bilinear_deconv_weight(channels))

    def forward(self, x: Tensor, like: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[..., : like.shape[-2], : like.shape[-1]]


class FCNBasic(nn.Module):
    """FCN-Basic, the paper's decoder comparison (Table 1): SegNet-Basic's encoder with an FCN decoder that
    upsamples by learnt deconvolution and adds the encoder's reduced feature maps (the module docstring)."""

    def __init__(
        self, *, num_classes: int, in_channels: int = 3, lrn: bool = False, addition: bool = True,
        dim_reduction: bool = True,
    ) -> None:
        super().__init__()
        depth = 4
        self.addition = addition
        self.dim_reduction = dim_reduction
        self.encoder = BasicEncoder(in_channels=in_channels, depth=depth, lrn=lrn)
        ch = num_classes if dim_reduction else WIDTH
        # Reductions for the deepest map and, when adding, for each skip map.
        n_reduce = (depth if addition else 1) if dim_reduction else 0
        self.reduce = nn.ModuleList(nn.Conv2d(WIDTH, num_classes, 1) for _ in range(n_reduce))
        self.upsample = nn.ModuleList(_Upsample2x(ch) for _ in range(depth))
        self.classifier = nn.Conv2d(WIDTH, num_classes, 1) if not dim_reduction else nn.Identity()

    def _reduced(self, i: int, x: Tensor) -> Tensor:
        return self.reduce[i](x) if self.dim_reduction else x

    def forward(self, image: Tensor) -> Tensor:
        feats = self.encoder(image)
        pooled = [p for _, p, _ in feats]  # 1/2, 1/4, 1/8, 1/16
        x = self._reduced(0, pooled[-1])
        for step, skip in enumerate(reversed(pooled[:-1]), start=1):
            x = self.upsample[step - 1](x, skip)
            if self.addition:
                x = x + self._reduced(step, skip)
        x = self.upsample[-1](x, image)
        return self.classifier(x)


def _fcn(name: str, doc: str, *, addition: bool, dim_reduction: bool) -> None:
    def build(*, num_classes: int, in_channels: int = 3, lrn: bool = False) -> FCNBasic:
        return FCNBasic(
            num_classes=num_classes, in_channels=in_channels, lrn=lrn, addition=addition, dim_reduction=dim_reduction
        )

    build.__name__ = name
    build.__doc__ = doc
    register_model(name)(build)


_fcn("fcn_basic", "FCN-Basic (paper: 0.65M parameters).", addition=True, dim_reduction=True)
_fcn("fcn_basic_no_addition", "FCN-Basic-NoAddition (paper: 0.65M).", addition=False, dim_reduction=True)
_fcn("fcn_basic_no_dim_reduction", "FCN-Basic-NoDimReduction (paper: 1.625M).", addition=True, dim_reduction=False)
_fcn(
    "fcn_basic_no_addition_no_dim_reduction",
    "FCN-Basic-NoAddition-NoDimReduction (paper: 1.625M).",
    addition=False,
    dim_reduction=False,
)
