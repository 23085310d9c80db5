"""Pooling/unpooling: both implementations against PyTorch's own ops, ties and odd sizes included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perception.models.unpool import (
    MaxPoolWithSwitches,
    MaxUnpoolWithSwitches,
    first_max_onehot,
    list_unpool_impls,
    pool_output_size,
    register_unpool_impl,
    set_unpool_impl,
)
from perception.models import get_model

SIZES = [(2, 2), (3, 3), (5, 7), (45, 60), (23, 30), (12, 15), (1, 1), (1, 4), (6, 1)]


def _tied(shape, levels=3):
    """Inputs with many ties: few distinct values, ReLU-style zeros."""
    return torch.randint(0, levels, shape).float() - 1.0


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("kind", ["random", "ties", "relu"])
def test_index_free_matches_torch_pool_and_unpool(hw, kind):
    shape = (2, 3, *hw)
    x = {"random": torch.randn(shape), "ties": _tied(shape), "relu": torch.relu(torch.randn(shape))}[kind]
    ref_y, ref_idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)

    pool, unpool = MaxPoolWithSwitches("index_free"), MaxUnpoolWithSwitches("index_free")
    y, sw = pool(x)
    assert y.shape == ref_y.shape == (2, 3, pool_output_size(hw[0]), pool_output_size(hw[1]))
    assert torch.equal(y, ref_y)

    # Unpool a *different* tensor (as the decoder does) and compare with PyTorch's max_unpool2d.
    v = torch.randn_like(y)
    out = unpool(v, sw)
    ref = F.max_unpool2d(v, ref_idx, 2, 2, output_size=hw)
    assert out.shape == ref.shape == x.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("impl", ["indices", "index_free"])
def test_unpool_restores_exact_odd_size(impl):
    x = torch.randn(1, 2, 45, 61)
    y, sw = MaxPoolWithSwitches(impl)(x)
    assert y.shape[-2:] == (23, 31)
    assert MaxUnpoolWithSwitches(impl)(y, sw).shape == x.shape


def test_first_maximum_wins_hand_case():
    # One 2x2 window [[1, 3], [3, 3]]: the maximum 3 appears at window positions 1, 2, 3; position 1 wins.
    x = torch.tensor([[[[1.0, 3.0], [3.0, 3.0]]]])
    y, sw = MaxPoolWithSwitches("index_free")(x)
    assert y.item() == 3.0
    out = MaxUnpoolWithSwitches("index_free")(torch.tensor([[[[7.0]]]]), sw)
    assert out.tolist() == [[[[0.0, 7.0], [0.0, 0.0]]]]
    _, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    assert idx.item() == 1  # PyTorch agrees: flat index h*W+w = 0*2+1


def test_naive_switch_mask_would_be_wrong_on_ties():
    """The reason first_max_onehot exists: x == upsample(max) marks every tie."""
    win = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    naive = (win == win.amax(-1, keepdim=True)).float()
    assert naive.sum() == 4
    assert first_max_onehot(win, win.amax(-1)).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_gradients_match_between_impls():
    x = torch.relu(torch.randn(2, 4, 9, 11))
    grads = {}
    for impl in ("indices", "index_free"):
        xi = x.clone().requires_grad_(True)
        y, sw = MaxPoolWithSwitches(impl)(xi)
        v = (y * 2).requires_grad_(True)
        out = MaxUnpoolWithSwitches(impl)(v, sw)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        grads[impl] = xi.grad
    assert torch.equal(grads["indices"], grads["index_free"])


@pytest.mark.parametrize("name", ["segnet_basic", "segnet", "bayesian_segnet_basic", "segnet_basic_encoder_addition"])
def test_whole_model_identical_under_both_impls(name):
    model = get_model(name, num_classes=5).eval()
    x = torch.relu(torch.randn(1, 3, 37, 53))  # odd sizes; ReLU'd input creates ties in the first pool
    with torch.no_grad():
        a = model(x)
        set_unpool_impl(model, "index_free")
        b = model(x)
        set_unpool_impl(model, "indices")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_impl_registry_rejects_duplicates_and_unknown():
    assert {"indices", "index_free"} <= set(list_unpool_impls())
    with pytest.raises(ValueError, match="already registered"):
        register_unpool_impl("indices", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown unpool implementation"):
        MaxPoolWithSwitches("nope")


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_native_index_form_matches_torch_indices(hw, kind):
    from perception.export.unpool_ops import pool_argmax_native, unpool_native

    shape = (2, 3, *hw)
    x = torch.randn(shape) if kind == "random" else _tied(shape)
    ref_y, ref_idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    y, idx = pool_argmax_native(x)
    assert idx.dtype == torch.int32
    assert torch.equal(y, ref_y) and torch.equal(idx.long(), ref_idx)
    v = torch.randn_like(y)
    assert torch.equal(unpool_native(v, idx, x), F.max_unpool2d(v, ref_idx, 2, 2, output_size=hw))


@pytest.mark.parametrize("impl", ["plugin", "onnx"])
def test_export_impls_compute_the_same_in_eager_mode(impl):
    model = get_model("segnet_basic", num_classes=4).eval()
    x = torch.relu(torch.randn(1, 3, 37, 53))
    with torch.no_grad():
        a = model(x)
        b = set_unpool_impl(model, impl)(x)
    assert torch.equal(a, b)
