"""Structured channel pruning of SegNet: whole output channels removed consistently through every layer
that reads or writes them, giving the same network with narrower layers (its widths recorded in the card,
so it loads, exports, quantises and runs like any other model).

SegNet ties channels across its two halves: the map encoder stage ``i`` pools has ``w`` channels, and its
switches have ``w`` planes, so the decoder stage that unpools with them receives ``w`` channels and the
decoder stage before it (``i + 1``) must produce exactly those channels, in that order (decoder channel
``c`` is placed by the switch of encoder channel ``c``). Such a tie is one :class:`ChannelGroup` (named
``pool<i>``): its kept channels are cut from encoder ``i``'s last conv and batch norm, encoder ``i + 1``'s
first conv's inputs, decoder ``i + 1``'s last conv and batch norm, and decoder ``i``'s first conv's inputs.
Every other conv is a group of its own (``enc<i>.<j>``, ``dec<i>.<j>``). The pooling indices need no change:
they are per plane (``h * W + w``), computed on whatever channels remain.

    groups = channel_groups(model)                      # name -> ChannelGroup (width, who reads and writes it)
    pruned = prune(model, keep_ratio=0.5)               # by batch-norm |gamma|, widths rounded to multiples of 8
    pruned = prune_channels(model, {"pool3": kept})     # or exactly these channels (sorted indices) per group
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from perception.models.registry import get_model, model_config
from perception.models.segnet import SegNet

__all__ = ["ChannelGroup", "channel_groups", "bn_importance", "random_importance", "IMPORTANCES", "prune",
           "prune_channels"]


@dataclass
class _Unit:
    """One conv (+ batch norm) of the network, the group its input channels belong to and its output's."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    in_group: str
    out_group: str


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together: the convs that write them (``writers``, each with its
    batch norm) and those that read them (``readers``)."""

    name: str
    width: int
    writers: list[_Unit] = field(default_factory=list)
    readers: list[_Unit] = field(default_factory=list)


def _units(model: SegNet) -> list[_Unit]:
    """Every conv of ``model`` in order, with the groups of its input and output channels."""
    units: list[_Unit] = []
    n = len(model.encoders)
    group = "input"
    for i, enc in enumerate(model.encoders, start=1):
        for j, block in enumerate(enc.convs):
            out = f"pool{i}" if j == len(enc.convs) - 1 else f"enc{i}.{j}"
            units.append(_Unit(block[0], block[1], group, out))
            group = out
    for k, dec in enumerate(model.decoders):
        i = n - k
        group = f"pool{i}"  # the unpooled map has the channels of encoder i's switches
        for j, block in enumerate(dec.convs):
            last = j == len(dec.convs) - 1
            out = f"pool{i - 1}" if last and i > 1 else f"dec{i}.{j}"
            units.append(_Unit(block[0], block[1], group, out))
            group = out
    units.append(_Unit(model.classifier, None, group, "classes"))
    return units


def channel_groups(model: SegNet) -> dict[str, ChannelGroup]:
    """The prunable channel groups of a SegNet, by name (the network's input and classes are not)."""
    if not isinstance(model, SegNet):
        raise TypeError(f"channel pruning is written for SegNet, not {type(model).__name__}")
    groups: dict[str, ChannelGroup] = {}
    for unit in _units(model):
        if unit.out_group != "classes":
            g = groups.setdefault(unit.out_group, ChannelGroup(unit.out_group, unit.conv.out_channels))
            g.writers.append(unit)
        if unit.in_group != "input":
            groups[unit.in_group].readers.append(unit)
    return groups


def bn_importance(group: ChannelGroup) -> torch.Tensor:
    """Per channel of ``group``: the sum over its writers of the batch norm's ``|gamma|`` (a channel whose
    scales are near zero contributes little after its ReLU)."""
    return sum(unit.bn.weight.detach().abs().float() for unit in group.writers)


def random_importance(seed: int = 0) -> Callable[[ChannelGroup], torch.Tensor]:
    """A ranking by chance, drawn per group from ``seed`` and the group's name (so it reproduces and does
    not depend on the order groups are visited): the control a ranking must beat (Liu et al., "Rethinking the
    value of network pruning", 2019). On issue 42's SegNet twin it keeps more than ``|gamma|`` when cut once
    (batch norms recalibrated) and less after one epoch of fine-tuning (docs/training.md, "A smaller SegNet")."""
    def importance(group: ChannelGroup) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(group.name.encode()))
        return torch.rand(group.width, generator=generator)
    return importance


# The rankings tools/prune_model.py offers, by name: a seed -> an importance function.
IMPORTANCES: dict[str, Callable[[int], Callable[[ChannelGroup], torch.Tensor]]] = {
    "bn": lambda seed: bn_importance,
    "random": random_importance,
}


def prune(model: SegNet, *, keep_ratio: float | dict[str, float], multiple_of: int = 8,
          importance=bn_importance) -> SegNet:
    """``model`` with each group cut to ``keep_ratio`` of its width (one ratio, or one per group name; a group
    not named keeps all), rounded up to a multiple of ``multiple_of`` (vector units fill better), keeping
    the channels ``importance`` ranks highest."""
    keep: dict[str, torch.Tensor] = {}
    for name, group in channel_groups(model).items():
        ratio = keep_ratio.get(name, 1.0) if isinstance(keep_ratio, dict) else keep_ratio
        if not 0 < ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {ratio} for {name}")
        k = min(group.width, max(1, -(-round(group.width * ratio) // multiple_of) * multiple_of))
        if k < group.width:
            keep[name] = torch.sort(torch.topk(importance(group), k).indices).values
    return prune_channels(model, keep)


def prune_channels(model: SegNet, keep: dict[str, torch.Tensor]) -> SegNet:
    """A new SegNet (built through the registry, its widths in its config) holding ``model``'s weights for
    the channels ``keep`` names per group (sorted, unique indices; groups not named keep every channel)."""
    groups = channel_groups(model)
    unknown = set(keep) - set(groups)
    if unknown:
        raise ValueError(f"no channel groups {sorted(unknown)}; groups: {', '.join(groups)}")
    index = {name: torch.arange(g.width) for name, g in groups.items()}
    for name, kept in keep.items():
        kept = torch.as_tensor(kept, dtype=torch.long)
        if kept.numel() < 1 or not torch.equal(kept, torch.unique(kept)) or kept.max() >= groups[name].width:
            raise ValueError(f"{name}: keep sorted unique channel indices below {groups[name].width}")
        index[name] = kept
    config = model_config(model)
    kwargs = dict(config["kwargs"])
    kwargs["stages"] = [[len(index[f"pool{i}" if j == len(s) - 1 else f"enc{i}.{j}"]) for j in range(len(s))]
                        for i, s in enumerate(model.stage_widths, start=1)]
    n = len(model.stage_widths)
    kwargs["decoder_stages"] = [
        [len(index[f"pool{i - 1}" if (j == len(s) - 1 and i > 1) else f"dec{i}.{j}"]) for j in range(len(s))]
        for i, s in zip(range(n, 0, -1), model.decoder_widths)]
    pruned = get_model(config["name"], num_classes=config["num_classes"], **kwargs)
    with torch.no_grad():
        for old, new in zip(_units(model), _units(pruned)):
            rows = index.get(old.out_group, slice(None))
            cols = index.get(old.in_group, slice(None))
            new.conv.weight.copy_(old.conv.weight[rows][:, cols])
            if old.conv.bias is not None:
                new.conv.bias.copy_(old.conv.bias[rows])
            if old.bn is not None:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new.bn, name).copy_(getattr(old.bn, name)[rows])
                new.bn.num_batches_tracked.copy_(old.bn.num_batches_tracked)
    return pruned.train(model.training)
