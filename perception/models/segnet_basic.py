"""SegNet-Basic (the paper's smaller network for analysis) and its Table 1 decoder variants.

Encoder: 4 x [7x7 conv 64, BN, ReLU, 2x2 max pool]. Decoder: 4 x [upsample, 7x7 conv 64, BN] (no ReLU,
as in the reference model), then a 1x1 classifier. The variants change only the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from perception.models.registry import register_model
from perception.models.unpool import MaxPoolWithSwitches, MaxUnpoolWithSwitches, Switches

__all__ = ["BasicEncoder", "BasicDecoderStage", "SegNetBasic", "EncoderFeatures", "BasicDropoutPrefix"]

# Per encoder stage, shallowest first: (pre-pool map, pooled map, switches).
EncoderFeatures = list[tuple[Tensor, Tensor, Switches]]


class BasicDropoutPrefix(NamedTuple):
    """What :meth:`BasicEncoder.forward_to_dropout` computed: the pooled map that enters the first
    dropout layer (the deepest pooled map when there is none), that stage's pre-pool map and switches,
    and the features of the stages before it."""

    x: Tensor
    pre_pool: Tensor
    switches: Switches
    feats: EncoderFeatures

WIDTH = 64
KERNEL = 7


def _conv_bn(in_ch: int, out_ch: int, *, groups: int = 1, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, KERNEL, padding=KERNEL // 2, groups=groups),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicEncoder(nn.Module):
    """Optional input LRN, then ``depth`` x [7x7 conv, BN, ReLU, pool (+ dropout)]."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        depth: int = 4,
        lrn: bool = False,
        dropout: float = 0.0,
        dropout_stages: Sequence[int] = (),
    ) -> None:
        super().__init__()
        # The reference Caffe model normalises raw 0-255 input with an LRN (size 5, alpha 1e-4, beta 0.75,
        # k 1); on mean/std-normalised input it is nearly the identity, hence optional.
        self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0) if lrn else nn.Identity()
        self.stages = nn.ModuleList(
            _conv_bn(in_channels if i == 0 else WIDTH, WIDTH, relu=True) for i in range(depth)
        )
        self.pools = nn.ModuleList(MaxPoolWithSwitches() for _ in range(depth))
        self.dropouts = nn.ModuleList(
            nn.Dropout(dropout) if (i + 1) in dropout_stages and dropout > 0 else nn.Identity()
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> EncoderFeatures:
        return self.forward_from_dropout(self.forward_to_dropout(x))

    def forward_to_dropout(self, x: Tensor) -> BasicDropoutPrefix:
        """Every layer before the first dropout (see :meth:`SegNetBasic.forward_to_dropout`)."""
        first = next((i for i, d in enumerate(self.dropouts) if isinstance(d, nn.Dropout)), len(self.stages) - 1)
        feats: EncoderFeatures = []
        x = self.lrn(x)
        for i in range(first + 1):
            pre = self.stages[i](x)
            x, sw = self.pools[i](pre)
            if i < first:
                feats.append((pre, x, sw))  # no dropout in these stages
        return BasicDropoutPrefix(x, pre, sw, feats)

    def forward_from_dropout(self, prefix: BasicDropoutPrefix) -> EncoderFeatures:
        """The remaining stages from :meth:`forward_to_dropout`'s output (which it does not modify)."""
        first = len(prefix.feats)
        x = self.dropouts[first](prefix.x)
        feats: EncoderFeatures = [*prefix.feats, (prefix.pre_pool, x, prefix.switches)]
        for conv, pool, drop in zip(self.stages[first + 1:], self.pools[first + 1:], self.dropouts[first + 1:]):
            pre = conv(x)
            x, sw = pool(pre)
            x = drop(x)
            feats.append((pre, x, sw))
        return feats


class BasicDecoderStage(nn.Module):
    """Upsample to the matching encoder's pre-pool size, (optionally add that encoder's map), conv, BN."""

    def __init__(
        self,
        *,
        upsample: str = "indices",
        encoder_addition: bool = False,
        single_channel: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if upsample not in ("indices", "bilinear"):
            raise ValueError(f"upsample must be 'indices' or 'bilinear', got {upsample!r}")
        self.upsample = upsample
        self.unpool = MaxUnpoolWithSwitches() if upsample == "indices" else None
        self.encoder_addition = encoder_addition
        self.conv = _conv_bn(WIDTH, WIDTH, groups=WIDTH if single_channel else 1, relu=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_pool: Tensor, switches: Switches) -> Tensor:
        if self.unpool is not None:
            x = self.unpool(x, switches)
        else:
            x = F.interpolate(x, size=pre_pool.shape[-2:], mode="bilinear", align_corners=False)
        if self.encoder_addition:
            x = x + pre_pool
        return self.dropout(self.conv(x))


class SegNetBasic(nn.Module):
    """SegNet-Basic (4 encoders of 64 7x7 filters, the paper's smaller network) and its Table 1 decoder variants:
    how the decoder upsamples (``upsample``), encoder addition, single-channel decoders; dropout for Bayesian
    SegNet-Basic."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        lrn: bool = False,
        upsample: str = "indices",
        encoder_addition: bool = False,
        single_channel_decoder: bool = False,
        dropout: float = 0.0,
        dropout_stages: Sequence[int] = (),
    ) -> None:
        super().__init__()
        depth = 4
        self.encoder = BasicEncoder(
            in_channels=in_channels, depth=depth, lrn=lrn, dropout=dropout, dropout_stages=dropout_stages
        )
        self.decoders = nn.ModuleList(
            BasicDecoderStage(
                upsample=upsample,
                encoder_addition=encoder_addition,
                single_channel=single_channel_decoder,
                dropout=dropout if i in dropout_stages else 0.0,
            )
            for i in range(depth, 0, -1)  # deepest first
        )
        self.classifier = nn.Conv2d(WIDTH, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from_dropout(self.forward_to_dropout(x))

    def forward_to_dropout(self, x: Tensor) -> BasicDropoutPrefix:
        """The deterministic part of the network: every layer before the first dropout.

        Monte-Carlo dropout computes it once per frame and runs only :meth:`forward_from_dropout` per
        sample (:func:`~perception.models.bayesian.mc_dropout_predict`); ``forward`` is the composition
        of the two, so there is one code path.
        """
        return self.encoder.forward_to_dropout(x)

    def forward_from_dropout(self, prefix: BasicDropoutPrefix) -> Tensor:
        """The rest of the network from :meth:`forward_to_dropout`'s output (which it does not modify)."""
        feats = self.encoder.forward_from_dropout(prefix)
        x = feats[-1][1]
        for dec, (pre, _, sw) in zip(self.decoders, reversed(feats)):
            x = dec(x, pre, sw)
        return self.classifier(x)


@register_model("segnet_basic")
def segnet_basic(*, num_classes: int, in_channels: int = 3, lrn: bool = False) -> SegNetBasic:
    """SegNet-Basic (paper: 1.425M parameters)."""
    return SegNetBasic(num_classes=num_classes, in_channels=in_channels, lrn=lrn)


@register_model("segnet_basic_encoder_addition")
def segnet_basic_encoder_addition(*, num_classes: int, in_channels: int = 3, lrn: bool = False) -> SegNetBasic:
    """SegNet-Basic-EncoderAddition: unpooled maps plus the encoder's pre-pool maps (paper: 1.425M)."""
    return SegNetBasic(num_classes=num_classes, in_channels=in_channels, lrn=lrn, encoder_addition=True)


@register_model("segnet_basic_single_channel_decoder")
def segnet_basic_single_channel_decoder(
    *, num_classes: int, in_channels: int = 3, lrn: bool = False
) -> SegNetBasic:
    """SegNet-Basic-SingleChannelDecoder: each decoder filter sees one channel (paper: 0.625M)."""
    return SegNetBasic(num_classes=num_classes, in_channels=in_channels, lrn=lrn, single_channel_decoder=True)


@register_model("bilinear_interpolation")
def bilinear_interpolation(*, num_classes: int, in_channels: int = 3, lrn: bool = False) -> SegNetBasic:
    """Bilinear-Interpolation: fixed bilinear upsampling, single-channel decoder filters (paper: 0.625M)."""
    return SegNetBasic(
        num_classes=num_classes, in_channels=in_channels, lrn=lrn, upsample="bilinear", single_channel_decoder=True
    )


@register_model("bayesian_segnet_basic")
def bayesian_segnet_basic(
    *, num_classes: int, in_channels: int = 3, lrn: bool = False, dropout: float = 0.5
) -> SegNetBasic:
    """Bayesian SegNet-Basic: dropout after pool3/pool4 and after decoders 4/3."""
    return SegNetBasic(
        num_classes=num_classes, in_channels=in_channels, lrn=lrn, dropout=dropout, dropout_stages=(3, 4)
    )
