"""Per-plane index forms of SegNet's pool/unpool, and the custom ops export emits for them.

Plugins and ONNX's MaxPool use *indices*, not one-hot switches. Here indices are int32 and per plane
(h * W + w, as PyTorch and Caffe store them), so a plugin never needs N or C to decode one.

``pool_argmax_native`` / ``unpool_native`` compute them from standard ops only (window reshape,
ArgMax, which keeps the first maximum; ScatterElements); export traces them to build the ONNX
model-local function bodies of the custom ops, so ONNX Runtime runs plugin graphs exactly.

Two more unpool implementations are registered for export:

``"plugin"``: custom ops ``segnet::MaxPoolArgmax`` (x -> values, int32 indices) and
    ``segnet::MaxUnpool2d`` (values, indices, like -> output shaped like ``like``), with the
    ``plugin_version`` / ``plugin_namespace`` attributes TensorRT's ONNX parser uses to find plugins.
``"onnx"``: ONNX's own ``MaxPool`` (with its Indices output, flattened over N*C*H*W) and
    ``MaxUnpool``; ONNX Runtime only (TensorRT's parser rejects both).

In eager PyTorch both compute with PyTorch's pooling ops; the custom ops appear only when traced
by the (TorchScript-based) ONNX exporter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from perception.models.unpool import Switches, UnpoolImpl, _windows, pad_to_even, register_unpool_impl

__all__ = ["pool_argmax_native", "unpool_native", "PLUGIN_DOMAIN", "PLUGIN_VERSION", "POOL_OP", "UNPOOL_OP"]

PLUGIN_DOMAIN = "segnet"
PLUGIN_VERSION = "1"
POOL_OP = "MaxPoolArgmax"
UNPOOL_OP = "MaxUnpool2d"


def pool_argmax_native(x: Tensor) -> tuple[Tensor, Tensor]:
    """2x2/2 ceil-mode max pool -> (values, int32 per-plane indices h*W+w); first maximum wins."""
    w = x.shape[-1]
    win = _windows(x)  # (N, C, Ho, Wo, 4)
    k = win.argmax(dim=-1)  # first maximum in row-major window order
    y = win.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    ho, wo = win.shape[2], win.shape[3]
    rows = torch.arange(ho, device=x.device).view(ho, 1) * 2 + torch.div(k, 2, rounding_mode="floor")
    cols = torch.arange(wo, device=x.device).view(1, wo) * 2 + k % 2
    idx = rows * w + cols
    return y, idx.to(torch.int32)


def unpool_native(y: Tensor, idx: Tensor, like: Tensor) -> Tensor:
    """Scatter ``y`` to per-plane positions ``idx`` of a zero tensor shaped like ``like``."""
    n, c = y.shape[0], y.shape[1]
    h, w = like.shape[-2], like.shape[-1]
    out = torch.zeros((n, c, h * w), dtype=y.dtype, device=y.device)
    out = out.scatter(2, idx.reshape(n, c, -1).to(torch.int64), y.reshape(n, c, -1))
    return out.reshape(n, c, h, w)


# --- "plugin": custom ops -------------------------------------------------------------------------


class _PoolArgmaxOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        y, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
        return y, idx.to(torch.int32)

    @staticmethod
    def symbolic(g, x):  # pragma: no cover - exercised through torch.onnx.export
        y, idx = g.op(
            f"{PLUGIN_DOMAIN}::{POOL_OP}", x, plugin_version_s=PLUGIN_VERSION, plugin_namespace_s=PLUGIN_DOMAIN,
            outputs=2,
        )
        # Declare output types so the exporter's shape inference knows them (custom ops have none).
        sizes = x.type().varyingSizes()
        if sizes is not None:
            pooled = list(sizes[:2]) + [None if s is None else (s + 1) // 2 for s in sizes[2:]]
            y.setType(x.type().with_sizes(pooled))
            idx.setType(x.type().with_dtype(torch.int32).with_sizes(pooled))
        return y, idx


class _UnpoolOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, idx: Tensor, like: Tensor) -> Tensor:  # type: ignore[override]
        return unpool_native(y, idx, like)

    @staticmethod
    def symbolic(g, y, idx, like):  # pragma: no cover
        out = g.op(
            f"{PLUGIN_DOMAIN}::{UNPOOL_OP}", y, idx, like, plugin_version_s=PLUGIN_VERSION,
            plugin_namespace_s=PLUGIN_DOMAIN,
        )
        sizes = like.type().varyingSizes()
        if sizes is not None:
            out.setType(y.type().with_sizes(list(sizes)))
        return out


def _pool_plugin(x: Tensor) -> tuple[Tensor, Switches]:
    y, idx = _PoolArgmaxOp.apply(x)
    return y, Switches(idx, x)


def _unpool_plugin(y: Tensor, sw: Switches) -> Tensor:
    return _UnpoolOp.apply(y, sw.data, sw.reference)


# --- "onnx": ONNX MaxPool(Indices) + MaxUnpool ------------------------------------------------------


class _OnnxPoolOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return F.max_pool2d(x, 2, 2, return_indices=True)

    @staticmethod
    def symbolic(g, x):  # pragma: no cover
        return g.op("MaxPool", x, kernel_shape_i=[2, 2], strides_i=[2, 2], outputs=2)


class _OnnxUnpoolOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, idx: Tensor) -> Tensor:  # type: ignore[override]
        # aten directly: F.max_unpool2d's Python size check fails under the tracing exporter.
        return torch.ops.aten.max_unpool2d(y, idx, [int(y.shape[-2]) * 2, int(y.shape[-1]) * 2])

    @staticmethod
    def symbolic(g, y, idx):  # pragma: no cover
        # ONNX indices are flattened over N*C*H*W (MaxPool's and MaxUnpool's alike), so they pair up.
        return g.op("MaxUnpool", y, idx, kernel_shape_i=[2, 2], strides_i=[2, 2])


# ONNX Runtime's MaxUnpool refuses an output smaller than 2x its input (ceil mode's odd sizes), so odd
# sides are padded with -inf before the pool and the unpooled map is cropped back afterwards.
def _pool_onnx(x: Tensor) -> tuple[Tensor, Switches]:
    y, idx = _OnnxPoolOp.apply(pad_to_even(x))
    return y, Switches(idx, x)


def _unpool_onnx(y: Tensor, sw: Switches) -> Tensor:
    out = _OnnxUnpoolOp.apply(y, sw.data)
    return out[..., : sw.reference.shape[-2], : sw.reference.shape[-1]]


register_unpool_impl("plugin", UnpoolImpl(_pool_plugin, _unpool_plugin))
register_unpool_impl("onnx", UnpoolImpl(_pool_onnx, _unpool_onnx))
