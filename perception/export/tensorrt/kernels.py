"""SegNet's pooling kernels in Triton: 2x2/2 ceil-mode max pool with int32 per-plane argmax indices, and
max-unpool to a saved size. Launched on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``); compiled ahead of time to PTX for TensorRT plugins without a GPU.

Kernel parameter order follows TensorRT's AOT plugin convention: input pointers, then int32 scalars,
then output pointers (``launch_args`` gives it; the plugin definitions use the same function).

Triton is imported only when a kernel is first needed: ``import perception`` never needs it.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

__all__ = [
    "BLOCK",
    "pool_output_hw",
    "grid_size",
    "pool_scalar_args",
    "unpool_scalar_args",
    "max_pool_argmax",
    "max_unpool2d",
    "compile_ptx",
    "CompiledKernel",
    "ptx_entry_params",
    "KERNEL_SIGNATURES",
    "strip_unused_trailing_params",
    "emit_ptx",
]

BLOCK = 256  # output elements per program


# --- pure logic (shared by launches, AOT launch parameters and tests) ----------------------------


def pool_output_hw(h: int, w: int) -> tuple[int, int]:
    """Ceil-mode 2x2/2 pooled size: 45 -> 23, 60 -> 30."""
    if h < 1 or w < 1:
        raise ValueError(f"cannot pool a {h}x{w} map")
    return (h + 1) // 2, (w + 1) // 2


def grid_size(total: int, block: int = BLOCK) -> int:
    """Programs needed to cover ``total`` elements (each program handles ``block``)."""
    return max(1, -(-total // block))


def pool_scalar_args(n, c, h, w) -> list:
    """int32 scalars of the pool kernel, in launch order: H, W, Ho, Wo, total outputs.

    Only ``+``, ``*`` and ``//`` are used, so the same function builds plain ints for launches here and
    TensorRT symbolic expressions (``trtp`` SymInt/ShapeExpr) for the AOT plugin.
    """
    ho, wo = (h + 1) // 2, (w + 1) // 2
    return [h, w, ho, wo, n * c * ho * wo]


def unpool_scalar_args(n, c, h, w) -> list:
    """int32 scalars of the unpool kernel, in launch order: H, W, Ho, Wo, total outputs; (h, w) is the
    saved pre-pool size (the ``like`` input's)."""
    ho, wo = (h + 1) // 2, (w + 1) // 2
    return [h, w, ho, wo, n * c * h * w]


# Kernel name -> parameter names in launch order ('*' marks pointers). The PTX entry must list these
# first; Triton >= 3.3 appends two scratch pointers after them (see ``ptx_entry_params``).
KERNEL_SIGNATURES: dict[str, list[str]] = {
    "pool_argmax_kernel": ["*x", "H", "W", "Ho", "Wo", "total", "*y", "*idx"],
    "unpool_kernel": ["*values", "*idx", "*like", "H", "W", "Ho", "Wo", "total", "*out"],
}


# --- the kernels --------------------------------------------------------------------------------


def _kernel_sources():
    import triton.language as tl

    def pool_argmax_kernel(x_ptr, H, W, Ho, Wo, total, y_ptr, idx_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < total
        plane = offs // (Ho * Wo)
        r = offs % (Ho * Wo)
        h0 = (r // Wo) * 2
        w0 = (r % Wo) * 2
        base = plane.to(tl.int64) * H * W
        has_r = (w0 + 1) < W  # ceil mode: the last window may be clipped
        has_b = (h0 + 1) < H
        p00 = h0 * W + w0
        v00 = tl.load(x_ptr + base + p00, mask=live, other=float("-inf")).to(tl.float32)
        v01 = tl.load(x_ptr + base + p00 + 1, mask=live & has_r, other=float("-inf")).to(tl.float32)
        v10 = tl.load(x_ptr + base + p00 + W, mask=live & has_b, other=float("-inf")).to(tl.float32)
        v11 = tl.load(x_ptr + base + p00 + W + 1, mask=live & has_r & has_b, other=float("-inf")).to(tl.float32)
        # Row-major scan with strict '>': the first maximum wins ties (as PyTorch and Caffe).
        best = v00
        arg = p00
        take = v01 > best
        best = tl.where(take, v01, best)
        arg = tl.where(take, p00 + 1, arg)
        take = v10 > best
        best = tl.where(take, v10, best)
        arg = tl.where(take, p00 + W, arg)
        take = v11 > best
        best = tl.where(take, v11, best)
        arg = tl.where(take, p00 + W + 1, arg)
        tl.store(y_ptr + offs, best.to(y_ptr.dtype.element_ty), mask=live)
        tl.store(idx_ptr + offs, arg.to(tl.int32), mask=live)

    def unpool_kernel(values_ptr, idx_ptr, like_ptr, H, W, Ho, Wo, total, out_ptr, BLOCK: tl.constexpr):
        # One program per block of *output* elements: each output reads the pooled value of its window
        # and keeps it only where the saved index points at itself. Every output is written exactly once,
        # so no zero-fill pass and no scattered writes are needed. ``like_ptr`` only carries the shape.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < total
        plane = offs // (H * W)
        p = offs % (H * W)
        h = p // W
        w = p % W
        src = plane.to(tl.int64) * Ho * Wo + (h // 2) * Wo + (w // 2)
        v = tl.load(values_ptr + src, mask=live, other=0.0)
        saved = tl.load(idx_ptr + src, mask=live, other=-1)
        out = tl.where(saved == p, v, tl.zeros_like(v))
        tl.store(out_ptr + offs, out, mask=live)

    return {"pool_argmax_kernel": pool_argmax_kernel, "unpool_kernel": unpool_kernel}


@functools.lru_cache(maxsize=None)
def _jitted(interpret: bool):
    """The kernels as JIT functions (``interpret``: Triton's CPU interpreter)."""
    from triton.runtime.jit import JITFunction

    out = {}
    for name, fn in _kernel_sources().items():
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            out[name] = InterpretedFunction(fn)
        else:
            out[name] = JITFunction(fn)
    return out


def _kernels_for(tensor):
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if tensor.device.type != "cuda" and not interpret:
        raise RuntimeError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors")
    return _jitted(interpret)


def max_pool_argmax(x, out=None):
    """(N, C, H, W) float32/float16 -> (values (N, C, Ho, Wo), int32 indices h*W+w per plane).

    ``out``: optional preallocated (values, indices) to write into (TensorRT's buffers)."""
    import torch

    if x.ndim != 4 or x.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"expected a float32/float16 NCHW tensor, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    n, c, h, w = x.shape
    ho, wo = pool_output_hw(h, w)
    if out is None:
        y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
        idx = torch.empty((n, c, ho, wo), dtype=torch.int32, device=x.device)
    else:
        y, idx = out
    scalars = pool_scalar_args(n, c, h, w)
    k = _kernels_for(x)["pool_argmax_kernel"]
    k[(grid_size(scalars[-1]),)](x, *scalars, y, idx, BLOCK=BLOCK)
    return y, idx


def max_unpool2d(values, indices, output_size, out=None):
    """Put ``values`` at per-plane ``indices`` of a zero (N, C, *output_size) tensor (or into ``out``)."""
    import torch

    if values.shape != indices.shape or values.ndim != 4:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must be equal NCHW shapes")
    values, indices = values.contiguous(), indices.to(torch.int32).contiguous()
    n, c, ho, wo = values.shape
    h, w = (int(s) for s in output_size)
    if out is None:
        out = torch.empty((n, c, h, w), dtype=values.dtype, device=values.device)
    if pool_output_hw(h, w) != (ho, wo):
        raise ValueError(f"a {ho}x{wo} pooled map does not unpool to {h}x{w}")
    scalars = unpool_scalar_args(n, c, h, w)
    k = _kernels_for(values)["unpool_kernel"]
    k[(grid_size(scalars[-1]),)](values, indices, out, *scalars, out, BLOCK=BLOCK)
    return out


# --- ahead-of-time compilation --------------------------------------------------------------------


@dataclass
class CompiledKernel:
    """One Triton kernel compiled ahead of time to PTX for a GPU architecture: what ``tensorrt.plugin``'s
    ``aot_impl`` hands TensorRT (entry name, PTX text, warps, shared memory)."""

    name: str  # the PTX entry name
    ptx: str
    num_warps: int
    shared: int
    arch: str
    dtype: str

    @property
    def block_x(self) -> int:
        return self.num_warps * 32


_TRITON_TYPES = {"fp32": "fp32", "fp16": "fp16"}


def _signature(kernel: str, dtype: str) -> dict[str, str]:
    params = KERNEL_SIGNATURES[kernel]
    sig = {}
    for p in params:
        name = p.lstrip("*")
        if p.startswith("*"):
            sig[f"{name}_ptr"] = "*i32" if name == "idx" else f"*{_TRITON_TYPES[dtype]}"
        else:
            sig[name] = "i32"
    sig["BLOCK"] = "constexpr"
    return sig


# PTX ISA 8.0 (CUDA 12.0): what TensorRT 10/11's CUDA 12+ drivers JIT-compile, and what a CUDA 12 or
# 13 ptxas assembles (Triton would otherwise emit the newest ISA its bundled ptxas knows).
DEFAULT_PTX_VERSION = 80
# The oldest PTX ISA that can target an architecture, where 8.0 cannot (LLVM's NVPTX backend, as Triton
# 3.9 reports it: "PTX version 8.0 does not support target 'sm_100a'. Minimum required PTX version is 8.6"
# -- and it aborts the whole process, so the check must come first). Blackwell datacentre (sm_100/101/103)
# needs 8.6 (CUDA 12.8), consumer Blackwell (sm_120/121) 8.7 (CUDA 12.9).
MIN_PTX_VERSION = {100: 86, 101: 86, 103: 86, 120: 87, 121: 87}
NEWEST_KNOWN_SM = 121


def ptx_version_for(arch: str, requested: int | None = None) -> int:
    """The PTX ISA to emit for ``arch`` (``sm_XY``): 8.0 where it suffices, else the oldest ISA that can
    target it. ValueError, one line, for an architecture newer than those known here or a ``requested``
    ISA too old for it (LLVM would abort the process instead)."""
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"arch must look like sm_90, got {arch!r}")
    sm = int(m.group(1))
    if sm > NEWEST_KNOWN_SM:
        raise ValueError(f"{arch} is newer than the architectures this build knows the PTX ISA for (up to "
                         f"sm_{NEWEST_KNOWN_SM}); pass ptx_version explicitly")
    minimum = max(DEFAULT_PTX_VERSION, MIN_PTX_VERSION.get(sm, DEFAULT_PTX_VERSION))
    if requested is not None and requested < minimum:
        raise ValueError(f"PTX ISA {requested / 10:.1f} cannot target {arch}: it needs {minimum / 10:.1f} or newer")
    return requested if requested is not None else minimum


def compile_ptx(
    kernel: str, *, dtype: str = "fp32", arch: str = "sm_90", block: int = BLOCK, ptx_version: int | None = None,
) -> CompiledKernel:
    """Compile ``kernel`` to PTX for ``arch`` (e.g. sm_80, sm_86, sm_89, sm_90, sm_100, sm_120) without a GPU,
    in the PTX ISA :func:`ptx_version_for` chooses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.runtime.jit import JITFunction

    if kernel not in KERNEL_SIGNATURES:
        raise ValueError(f"unknown kernel {kernel!r}; kernels: {list(KERNEL_SIGNATURES)}")
    if dtype not in _TRITON_TYPES:
        raise ValueError(f"dtype must be one of {list(_TRITON_TYPES)}")
    ptx_version = ptx_version_for(arch, ptx_version)  # before Triton: an unsupported pair aborts inside LLVM
    m = re.fullmatch(r"sm_(\d+)", arch)
    if not m:
        raise ValueError(f"arch must look like sm_90, got {arch!r}")
    fn = JITFunction(_kernel_sources()[kernel])
    src = ASTSource(fn=fn, signature=_signature(kernel, dtype), constexprs={"BLOCK": block})
    # No line info: it embeds this file's absolute path (.file) in the PTX, and so in every engine.
    previous = os.environ.get("TRITON_DISABLE_LINE_INFO")
    os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
    try:
        compiled = triton_compile(src, target=GPUTarget("cuda", int(m.group(1)), 32),
                                  options={"ptx_version": ptx_version})
    finally:
        if previous is None:
            del os.environ["TRITON_DISABLE_LINE_INFO"]
        else:
            os.environ["TRITON_DISABLE_LINE_INFO"] = previous
    md = compiled.metadata
    return CompiledKernel(name=md.name, ptx=compiled.asm["ptx"], num_warps=md.num_warps, shared=md.shared,
                          arch=arch, dtype=dtype)


def strip_unused_trailing_params(ptx: str, entry: str, keep: int) -> str:
    """Drop entry parameters after the first ``keep`` when the kernel body never reads them.

    Triton >= 3.3 appends two pointer parameters (global and profile scratch) to every kernel. A
    TensorRT AOT plugin launch passes exactly inputs, scalars and outputs, so a kernel that declares
    more would read argument slots that were never filled. Our kernels use no scratch memory; this
    removes those declarations and refuses (ValueError) if any of them is actually used.
    """
    m = re.search(r"(\.entry\s+" + re.escape(entry) + r"\s*\()(.*?)(\))", ptx, re.S)
    if not m:
        raise ValueError(f"entry {entry} not found in PTX")
    decls = [d.strip() for d in m.group(2).split(",") if d.strip()]
    if len(decls) <= keep:
        return ptx
    body = ptx[m.end():]
    for d in decls[keep:]:
        name = d.split()[-1]
        if re.search(r"\[" + re.escape(name) + r"(\+\d+)?\]", body):
            raise ValueError(f"{entry} uses its trailing parameter {name}: it needs Triton scratch memory")
    new_params = "\n\t" + ",\n\t".join(decls[:keep]) + "\n"
    return ptx[: m.start(2)] + new_params + ptx[m.end(2):]


def ptx_entry_params(ptx: str, entry: str) -> list[str]:
    """Parameter types of ``entry`` in ``ptx`` (e.g. ['.u64', '.u32', ...]) in declaration order."""
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise ValueError(f"entry {entry} not found in PTX")
    return re.findall(r"\.param\s+(\.\w+)", m.group(1))


def emit_ptx(out_dir, *, arch: str = "sm_90", dtypes=("fp32", "fp16")) -> list:
    """Write each kernel's PTX (trailing scratch parameters stripped, as the plugins load them) to
    ``out_dir/<kernel>_<dtype>_<arch>.ptx``; returns the paths."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kernel, params in KERNEL_SIGNATURES.items():
        for dtype in dtypes:
            ck = compile_ptx(kernel, dtype=dtype, arch=arch)
            ptx = strip_unused_trailing_params(ck.ptx, ck.name, len(params))
            path = out_dir / f"{kernel}_{dtype}_{arch}.ptx"
            path.write_text(ptx)
            paths.append(path)
    return paths
