"""Triton kernels against PyTorch under Triton's CPU interpreter. Not collected by the suite's own run
(the file name is not test_*): tests/test_plugins.py runs it in a process with TRITON_INTERPRET=1 set
before triton is imported."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_plugins.py with TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")

from perception.export.tensorrt import kernels as K  # noqa: E402

SIZES = [(1, 1), (2, 2), (3, 5), (45, 60), (23, 30), (12, 15), (7, 1)]


def _planted_ties(shape, dtype):
    x = torch.randint(0, 3, shape).to(dtype)  # few values: ties everywhere
    x[..., ::3, ::2] = 2  # every window of some rows has several maxima
    return x


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_pool_argmax_kernel_matches_pytorch(hw, dtype, kind):
    shape = (2, 3, *hw)
    x = torch.randn(shape).to(dtype) if kind == "random" else _planted_ties(shape, dtype)
    ref_y, ref_idx = F.max_pool2d(x.float(), 2, 2, ceil_mode=True, return_indices=True)
    y, idx = K.max_pool_argmax(x)
    assert y.dtype == dtype and idx.dtype == torch.int32
    assert torch.equal(y.float(), ref_y) and torch.equal(idx.long(), ref_idx)


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unpool_kernel_matches_pytorch(hw, dtype):
    x = _planted_ties((2, 3, *hw), torch.float32)
    _, ref_idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    v = torch.randn(ref_idx.shape).to(dtype)
    out = K.max_unpool2d(v, ref_idx.to(torch.int32), hw)
    ref = F.max_unpool2d(v.float(), ref_idx, 2, 2, output_size=hw)
    assert out.dtype == dtype and torch.equal(out.float(), ref)


