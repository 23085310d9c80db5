"""ONNX export of a model folder as a self-contained frame consumer.

Input ``image``: uint8, N x H x W x 3, BGR (OpenCV's frame layout). Inside the graph: layout change,
cast, colour order, normalisation (folded into one multiply-add), the network with batch norm folded
into the convolutions, and the requested outputs: ``labels`` (uint8 N x H x W, argmax), ``probs``
(softmax, N x K x H x W), ``logits``. The model card travels in ``metadata_props``.

Unpooling forms (``unpool``):

``native``  the exact index-free form (standard ops only): any runtime, TensorRT without plugins.
``plugin``  custom ops ``segnet::MaxPoolArgmax`` / ``segnet::MaxUnpool2d`` that TensorRT resolves to our
            plugins; each also has an ONNX model-local function with the exact native body, so ONNX
            Runtime runs the very same file.
``onnx``    ONNX MaxPool (with Indices) + MaxUnpool: ONNX Runtime only.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from perception.core.fileio import atomic_write_bytes
from perception.core.options import opt
from perception.core.sizes import parse_hw
from perception.core.onnx_meta import METADATA_CARD_KEY, read_card_from_onnx, read_onnx_metadata  # noqa: F401 (re-exported)
from perception.models.io import InputSpec, ModelCard, load, weights_sha256
from perception.models.tta import TTA_MODES, with_tta
from perception.models.unpool import set_unpool_impl, static_shapes
from perception.export.unpool_ops import (
    PLUGIN_DOMAIN,
    POOL_OP,
    UNPOOL_OP,
    pool_argmax_native,
    unpool_native,
)

__all__ = [
    "ExportOptions",
    "export_onnx",
    "FrameModel",
    "fold_batch_norm",
    "UNPOOL_FORMS",
    "OUTPUTS",
    "read_card_from_onnx",
    "read_onnx_metadata",
    "METADATA_CARD_KEY",
]

UNPOOL_FORMS = {"native": "index_free", "plugin": "plugin", "onnx": "onnx"}
OUTPUTS = ("labels", "probs", "logits")
DEFAULT_OPSET = 17


def parse_batch(text: str) -> int | str:
    """``--batch``: a positive integer, or ``dynamic``."""
    if text == "dynamic":
        return text
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"must be a positive integer or 'dynamic', got {text!r}") from None
    if n < 1:
        raise ValueError(f"must be >= 1, got {n}")
    return n


def parse_size(text: str) -> tuple[int, int] | str:
    """``--size``: HxW (height x width), or ``dynamic``."""
    return parse_hw(text, option="--size", minimum=32, keep_words=("dynamic",))


def parse_outputs(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


@dataclass
class ExportOptions:
    """What ``export_onnx`` builds; ``perception-export``'s flags are these fields (core.options)."""

    unpool: str = opt("native", choices=tuple(UNPOOL_FORMS),
                      help="native: standard ops only (any runtime); plugin: segnet:: custom ops for TensorRT, with "
                           "ONNX functions for ONNX Runtime; onnx: MaxPool+MaxUnpool (ONNX Runtime only)")
    opset: int = opt(DEFAULT_OPSET, help="ONNX opset")
    # None (or "dynamic" on the command line): a dynamic batch axis.
    batch: int | str | None = opt(1, parse=parse_batch, metavar="N|dynamic", help="N or 'dynamic' (default 1)")
    # None with dynamic_size=False: the card's input size; "dynamic" sets dynamic_size.
    size: tuple[int, int] | str | None = opt(None, parse=parse_size, metavar="HxW|dynamic",
                                             help="HxW or 'dynamic' (default: the model's input size)")
    dynamic_size: bool = opt(False, cli=False)
    outputs: tuple[str, ...] = opt(("labels",), parse=parse_outputs, metavar="LIST",
                                   help=f"comma list of {','.join(OUTPUTS)} (default labels)")
    fp16: bool = opt(False, help="float16 compute graph (TensorRT 11 takes precision from types)")
    tta: str = opt("none", choices=TTA_MODES,
                   help="'flip': the graph averages the logits of each frame and its mirror (about 2x the compute)")
    # plugin form: mark the custom-op nodes ``aot=1`` so TensorRT's parser uses the plugins' ahead-of-time
    # (PTX) implementations and the engine runs without Python.
    plugin_aot: bool = opt(True, cli=False)

    def __post_init__(self) -> None:
        if self.batch == "dynamic":
            self.batch = None
        if self.size == "dynamic":
            self.size, self.dynamic_size = None, True
        if self.unpool not in UNPOOL_FORMS:
            raise ValueError(f"unpool must be one of {sorted(UNPOOL_FORMS)}, got {self.unpool!r}")
        self.outputs = tuple(self.outputs)
        bad = [o for o in self.outputs if o not in OUTPUTS]
        if bad or not self.outputs:
            raise ValueError(f"outputs must be a non-empty subset of {OUTPUTS}, got {self.outputs}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {self.tta!r}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise ValueError(f"batch must be >= 1 (or dynamic), got {self.batch!r}")
        if self.size is not None and min(self.size) < 32:
            raise ValueError(f"size {self.size} is too small: SegNet needs at least 32x32")


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into that conv
    (in place; eval-mode statistics). The BN becomes an Identity."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                module._modules[b] = nn.Identity()
    return model


class FrameModel(nn.Module):
    """uint8 BGR NHWC frames in; labels / probs / logits out."""

    def __init__(self, model: nn.Module, spec: InputSpec, outputs: tuple[str, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs
        # (pixel * scale - mean) / std == pixel * a + b, per channel, in the model's colour order.
        std = torch.tensor(spec.std, dtype=torch.float64)
        mean = torch.tensor(spec.mean, dtype=torch.float64)
        self.register_buffer("a", (spec.scale / std).view(1, 3, 1, 1).to(dtype))
        self.register_buffer("b", (-mean / std).view(1, 3, 1, 1).to(dtype))
        # Frames are BGR; an RGB model needs the channels reversed.
        order = [2, 1, 0] if spec.color_order == "RGB" else [0, 1, 2]
        self.register_buffer("order", torch.tensor(order, dtype=torch.int64))
        self.dtype = dtype

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        # Cast first: TensorRT takes UINT8 only as a network input or output, never as an intermediate
        # tensor (onnx-tensorrt: "UINT8 is only supported as network input or output tensor types"), so
        # the uint8 frame must go straight into a Cast, not through a Transpose first.
        x = image.to(self.dtype).permute(0, 3, 1, 2)
        x = x.index_select(1, self.order) * self.a + self.b
        logits = self.model(x)
        out = []
        for name in self.outputs:
            if name == "labels":
                out.append(logits.argmax(dim=1).to(torch.uint8))
            elif name == "probs":
                out.append(torch.softmax(logits, dim=1))
            else:
                out.append(logits)
        return tuple(out)


def _onnx_export(module: nn.Module, args: tuple, input_names, output_names, dynamic_axes, opset: int):
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buf, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())


class _PoolBody(nn.Module):
    def forward(self, x: Tensor):
        return pool_argmax_native(x)


class _UnpoolBody(nn.Module):
    def forward(self, y: Tensor, idx: Tensor, like: Tensor):
        return unpool_native(y, idx, like)


def _graph_to_function(graph, name: str, opset_imports) -> Any:
    """A traced body graph -> an ONNX FunctionProto in the plugin domain (initializers become Constants)."""
    from onnx import helper

    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    return helper.make_function(
        PLUGIN_DOMAIN, name, [i.name for i in graph.input], [o.name for o in graph.output],
        consts + list(graph.node), opset_imports, attributes=["plugin_version", "plugin_namespace", "aot"],
    )


def plugin_functions(dtype: torch.dtype, opset: int) -> list[Any]:
    """The model-local functions giving the custom ops their exact native meaning."""
    from onnx import helper

    dyn = {0: "n", 1: "c", 2: "h", 3: "w"}
    x = torch.randn(1, 2, 5, 7, dtype=torch.float32).to(dtype)
    pool = _onnx_export(_PoolBody(), (x,), ["X"], ["Y", "Indices"], {"X": dyn}, opset)
    y, idx = pool_argmax_native(x)
    unpool = _onnx_export(
        _UnpoolBody(), (y, idx, x), ["Y", "Indices", "Like"], ["Out"],
        {"Y": dyn, "Indices": dyn, "Like": dyn}, opset,
    )
    imports = [helper.make_opsetid("", opset)]
    return [_graph_to_function(pool.graph, POOL_OP, imports), _graph_to_function(unpool.graph, UNPOOL_OP, imports)]


def _card_metadata(card: ModelCard, source_sha: str, opts: ExportOptions) -> dict[str, str]:
    return {
        METADATA_CARD_KEY: json.dumps(card.to_dict()),
        "segnet.model_id": card.id,
        "segnet.classes": json.dumps(list(card.classes)),
        "segnet.palette": json.dumps([list(c) for c in card.palette]),
        "segnet.source_sha256": source_sha,
        "segnet.unpool": opts.unpool,
        "segnet.precision": "fp16" if opts.fp16 else "fp32",
        "segnet.tta": opts.tta,
        "segnet.input": "image: uint8 NHWC BGR",
    }


def export_onnx(model_dir: str | Path, out: str | Path, options: ExportOptions | None = None) -> Path:
    """Export the model folder ``model_dir`` to ``out`` (written atomically). Returns ``out``."""
    import onnx
    from onnx import helper

    opts = options or ExportOptions()
    model_dir = Path(model_dir)
    model = load(model_dir)
    card: ModelCard = model.card
    net = fold_batch_norm(copy.deepcopy(model).eval())
    set_unpool_impl(net, UNPOOL_FORMS[opts.unpool])
    dtype = torch.float16 if opts.fp16 else torch.float32
    # Tracing runs the network once; fp16 convolutions are very slow on CPUs, so trace those on a GPU
    # when there is one (the exported graph is the same).
    device = "cuda" if opts.fp16 and torch.cuda.is_available() else "cpu"
    wrapper = FrameModel(with_tta(net.to(dtype), opts.tta), card.input, tuple(opts.outputs), dtype).eval().to(device)

    h, w = opts.size or (card.input.height, card.input.width)
    if opts.dynamic_size:
        h, w = 64, 96  # any size traces the same graph; a small one keeps (slow, CPU fp16) tracing quick
    dummy = torch.zeros(opts.batch or 1, h, w, 3, dtype=torch.uint8, device=device)
    in_axes: dict[int, str] = {}
    if opts.batch is None:
        in_axes[0] = "batch"
    if opts.dynamic_size:
        in_axes.update({1: "height", 2: "width"})
    dynamic_axes: dict[str, dict[int, str]] = {}
    if in_axes:
        dynamic_axes["image"] = in_axes
        for name in opts.outputs:
            ax = {0: in_axes[0]} if 0 in in_axes else {}
            if opts.dynamic_size:
                ax.update({1: "height", 2: "width"} if name == "labels" else {2: "height", 3: "width"})
            dynamic_axes[name] = ax

    with torch.no_grad(), static_shapes(not in_axes):
        proto = _onnx_export(wrapper, (dummy,), ["image"], list(opts.outputs), dynamic_axes or None, opts.opset)

    if opts.unpool == "plugin":
        if opts.plugin_aot:
            for node in proto.graph.node:
                if node.domain == PLUGIN_DOMAIN:
                    node.attribute.append(helper.make_attribute("aot", 1))
        proto.functions.extend(plugin_functions(dtype, opts.opset))
        if not any(o.domain == PLUGIN_DOMAIN for o in proto.opset_import):  # torch.onnx adds it for custom ops
            proto.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    for k, v in _card_metadata(card, weights_sha256(model_dir), opts).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "segnet-perception"
    onnx.checker.check_model(proto)

    out = atomic_write_bytes(out, proto.SerializeToString())
    return out
