"""The one place where SegNet's pooling / unpooling semantics live.

SegNet's encoder max-pools 2x2/2 and remembers *where* each maximum came from (the "switches");
the decoder puts values back at those positions. Semantics follow the reference Caffe model:

* ceil mode: an odd side keeps its last row/column as a clipped window (45 -> 23, and back to 45);
* the first maximum in row-major window order wins ties (common after ReLU, where zeros tie);
* unpooling restores exactly the size seen before the pool.

Two interchangeable implementations give bit-identical outputs:

``"indices"``
    ``F.max_pool2d(return_indices=True, ceil_mode=True)`` + ``F.max_unpool2d(output_size=...)``.
    Fastest for training in PyTorch.
``"index_free"``
    Only standard tensor ops (pad, reshape, max, equality, multiply): the switches are a first-maximum
    one-hot over each 2x2 window. Any ONNX runtime (and TensorRT) can run this without plugins.

Export code adds further implementations (custom ONNX ops) through :func:`register_unpool_impl`.
A model picks its implementation at run time with :func:`set_unpool_impl`, so one set of weights
serves training and every export form.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Switches",
    "UnpoolImpl",
    "MaxPoolWithSwitches",
    "MaxUnpoolWithSwitches",
    "register_unpool_impl",
    "list_unpool_impls",
    "set_unpool_impl",
    "pool_output_size",
    "first_max_onehot",
    "pad_to_even",
    "static_shapes",
]


class Switches(NamedTuple):
    """What a pool remembers for its unpool: implementation-specific data plus the pre-pool size.

    ``data`` is an int64 index tensor for ``"indices"`` and a float one-hot of shape
    (N, C, H_out, W_out, 4) for ``"index_free"``. ``reference`` is the pre-pool tensor itself
    (the size is read from it so that traced/exported graphs keep dynamic shapes).
    """

    data: Tensor
    reference: Tensor


class UnpoolImpl(NamedTuple):
    """A pair of pool (returning switches) and unpool functions: one interchangeable implementation of
    SegNet's pooling semantics."""

    pool: Callable[[Tensor], tuple[Tensor, Switches]]
    unpool: Callable[[Tensor, Switches], Tensor]


def pool_output_size(size: int) -> int:
    """Output side of a 2x2/2 ceil-mode pool (no padding)."""
    if size < 1:
        raise ValueError(f"cannot pool a side of {size}")
    return (size + 1) // 2


# --- "indices": PyTorch's own ops -------------------------------------------------------------


def _pool_indices(x: Tensor) -> tuple[Tensor, Switches]:
    y, idx = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True, return_indices=True)
    return y, Switches(idx, x)


def _unpool_indices(y: Tensor, sw: Switches) -> Tensor:
    # output_size is mandatory: without it max_unpool2d assumes even sizes (23 -> 46, not 45).
    return F.max_unpool2d(y, sw.data, kernel_size=2, stride=2, output_size=sw.reference.shape[-2:])


# --- "index_free": standard ops only ----------------------------------------------------------


_STATIC_SHAPES = False


@contextmanager
def static_shapes(enabled: bool = True) -> Iterator[None]:
    """While tracing for a fixed-size export: treat sizes as constants, so even sides need no Pad and
    no shape arithmetic ends up in the graph (the default keeps sizes symbolic for dynamic exports)."""
    global _STATIC_SHAPES
    before, _STATIC_SHAPES = _STATIC_SHAPES, enabled
    try:
        yield
    finally:
        _STATIC_SHAPES = before


def pad_to_even(x: Tensor) -> Tensor:
    """Pad the bottom/right of odd sides with -inf (ceil mode's clipped last window)."""
    h, w = x.shape[-2], x.shape[-1]
    if _STATIC_SHAPES:
        h, w = int(h), int(w)
        if h % 2 == 0 and w % 2 == 0:
            return x
    # (s + 1) // 2 * 2 - s rather than s % 2: traced for export, Mod is not an op TensorRT parses.
    return F.pad(x, (0, (w + 1) // 2 * 2 - w, 0, (h + 1) // 2 * 2 - h), value=float("-inf"))


def _windows(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2), 4), window elements in row-major order.

    Odd sides are padded with -inf, which never wins a max (each window keeps >= 1 real element),
    reproducing ceil mode's clipped last window.
    """
    x = pad_to_even(x)
    n, c, hp, wp = x.shape
    x = x.reshape(n, c, hp // 2, 2, wp // 2, 2).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(n, c, hp // 2, wp // 2, 4)


def first_max_onehot(win: Tensor, win_max: Tensor) -> Tensor:
    """One-hot of the *first* maximum along the last axis (length 4) of ``win``.

    ``x == max`` alone marks every tied element; each element is kept only if no earlier one was
    already a maximum. Written with slices and multiplies so it exports to any ONNX runtime.
    """
    eq = (win == win_max.unsqueeze(-1)).to(win_max.dtype)
    e0, e1, e2, e3 = eq[..., 0:1], eq[..., 1:2], eq[..., 2:3], eq[..., 3:4]
    none0 = 1 - e0
    none01 = none0 * (1 - e1)
    none012 = none01 * (1 - e2)
    return torch.cat([e0, e1 * none0, e2 * none01, e3 * none012], dim=-1)


def _pool_index_free(x: Tensor) -> tuple[Tensor, Switches]:
    win = _windows(x)
    onehot = first_max_onehot(win, win.amax(dim=-1))
    # Select the first maximum rather than return amax directly: equal values, but the gradient then
    # goes to that one element as with PyTorch's indices (amax would split it among ties).
    y = torch.where(onehot > 0, win, torch.zeros_like(win)).sum(dim=-1)
    return y, Switches(onehot, x)


def _unpool_index_free(y: Tensor, sw: Switches) -> Tensor:
    onehot = sw.data
    n, c, ho, wo, _ = onehot.shape
    out = (y.unsqueeze(-1) * onehot).reshape(n, c, ho, wo, 2, 2).permute(0, 1, 2, 4, 3, 5)
    out = out.reshape(n, c, ho * 2, wo * 2)
    ref = sw.reference
    return out[..., : ref.shape[-2], : ref.shape[-1]]


_IMPLS: dict[str, UnpoolImpl] = {}


def register_unpool_impl(name: str, impl: UnpoolImpl, *, replace: bool = False) -> None:
    if name in _IMPLS and not replace:
        raise ValueError(f"unpool implementation {name!r} is already registered")
    _IMPLS[name] = impl


def list_unpool_impls() -> list[str]:
    return sorted(_IMPLS)


def _get_impl(name: str) -> UnpoolImpl:
    try:
        return _IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown unpool implementation {name!r}; known: {list_unpool_impls()}") from None


register_unpool_impl("indices", UnpoolImpl(_pool_indices, _unpool_indices))
register_unpool_impl("index_free", UnpoolImpl(_pool_index_free, _unpool_index_free))


class _UsesUnpoolImpl(nn.Module):
    def __init__(self, impl: str = "indices") -> None:
        super().__init__()
        _get_impl(impl)
        self.impl = impl

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


class MaxPoolWithSwitches(_UsesUnpoolImpl):
    """2x2/2 ceil-mode max pool returning ``(pooled, switches)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Switches]:
        return _get_impl(self.impl).pool(x)


class MaxUnpoolWithSwitches(_UsesUnpoolImpl):
    """Inverse of :class:`MaxPoolWithSwitches`: values to the remembered positions, zeros elsewhere."""

    def forward(self, y: Tensor, switches: Switches) -> Tensor:
        return _get_impl(self.impl).unpool(y, switches)


def set_unpool_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every pool/unpool in ``model`` to ``impl`` (in place; returns the model)."""
    _get_impl(impl)
    for m in model.modules():
        if isinstance(m, _UsesUnpoolImpl):
            m.impl = impl
    return model
