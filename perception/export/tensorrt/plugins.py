"""TensorRT plugins for SegNet's custom ONNX ops, with TensorRT's Python plugin API (``tensorrt.plugin``).

``segnet::MaxPoolArgmax``  x -> (values, int32 per-plane indices), 2x2/2 ceil mode
``segnet::MaxUnpool2d``    (values, indices, like) -> output shaped like ``like``

Each has a shape/type descriptor (``@trtp.register``), type/format combinations (``@trtp.autotune``),
an ahead-of-time implementation returning Triton PTX with its launch parameters (``@trtp.aot_impl``:
the built engine runs without Python, e.g. in trtexec or a C++ runtime), and a Python implementation
(``@trtp.impl``) that launches the same Triton kernels through PyTorch.

Nothing here runs at import: :func:`register_plugins` imports tensorrt and registers (once). The pure
rules it uses (output shapes, scalar argument order, grid size) live in ``kernels`` and are tested on
machines without TensorRT.
"""

# No ``from __future__ import annotations`` here: tensorrt.plugin inspects the decorated functions'
# annotations as live classes (issubclass(annotation, TensorDesc)); strings would break registration.
import os
from typing import Any, Tuple, Union

from perception.export.unpool_ops import PLUGIN_DOMAIN, POOL_OP, UNPOOL_OP
from perception.export.tensorrt import kernels as K

__all__ = ["register_plugins", "POOL_PLUGIN_ID", "UNPOOL_PLUGIN_ID", "current_sm_arch", "AUTOTUNE_TYPES"]

POOL_PLUGIN_ID = f"{PLUGIN_DOMAIN}::{POOL_OP}"
UNPOOL_PLUGIN_ID = f"{PLUGIN_DOMAIN}::{UNPOOL_OP}"

# Type combinations per plugin, positions = inputs then outputs (same-index alternatives pair up).
AUTOTUNE_TYPES = {
    POOL_PLUGIN_ID: "FP32|FP16, FP32|FP16, INT32",  # x, values, indices
    UNPOOL_PLUGIN_ID: "FP32|FP16, INT32, FP32|FP16, FP32|FP16",  # values, indices, like, out
}

_registered = False


def current_sm_arch() -> str:
    """``sm_XY`` of the GPU the engine is built on (override with SEGNET_SM_ARCH)."""
    env = os.environ.get("SEGNET_SM_ARCH")
    if env:
        return env
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}"
    except ImportError:
        pass
    try:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda

        major, minor = cuda.Device(0).compute_capability()
        return f"sm_{major}{minor}"
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"cannot determine the GPU architecture (set SEGNET_SM_ARCH): {e}") from None


def _dtype_name(trt: Any, dtype: Any) -> str:
    if dtype == trt.float32:
        return "fp32"
    if dtype == trt.float16:
        return "fp16"
    raise TypeError(f"unsupported plugin data type {dtype}")


def _ptx_for(kernel: str, dtype: str) -> Tuple[bytes, bytes, K.CompiledKernel]:
    ck = K.compile_ptx(kernel, dtype=dtype, arch=current_sm_arch())
    ptx = K.strip_unused_trailing_params(ck.ptx, ck.name, len(K.KERNEL_SIGNATURES[kernel]))
    return ck.name.encode(), ptx.encode(), ck


def _aot_result(trtp: Any, kernel: str, dtype: str, scalars: list) -> tuple:
    """What an ``aot_impl`` returns: kernel name, PTX, launch parameters (one program per BLOCK
    outputs; ``scalars[-1]`` is the output count) and the int32 scalars in the kernel's order."""
    name, ptx, ck = _ptx_for(kernel, dtype)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(scalars[-1], K.BLOCK)
    launch.block_x = ck.block_x
    launch.shared_mem = ck.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
    return name, ptx, launch, extra


def _register_once(trtp: Any, plugin_id: str):
    """``trtp.register(plugin_id)``, or a no-op where that plugin is already defined: tensorrt.plugin refuses
    a second definition, so a registration that failed after it (a later decorator) could otherwise never be
    completed in this process. The other decorators only set a definition's fields and may be re-applied."""
    namespace, name = plugin_id.split("::")
    if hasattr(getattr(trtp.op, namespace, None), name):
        return lambda fn: fn
    return trtp.register(plugin_id)


def register_plugins() -> None:
    """Register both plugins with TensorRT's plugin registry (idempotent; a failed call may be retried)."""
    global _registered
    if _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    # --- MaxPoolArgmax ------------------------------------------------------------------------

    # Annotations follow tensorrt.plugin's validation: register needs them on every argument and on the
    # return; aot_impl needs a return annotation; elsewhere they are optional and left out.
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    @_register_once(trtp, POOL_PLUGIN_ID)
    def _pool_desc(x: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        values = x.like()
        values.shape_expr[2] = (x.shape_expr[2] + 1) // 2
        values.shape_expr[3] = (x.shape_expr[3] + 1) // 2
        indices = trtp.from_shape_expr(values.shape_expr, dtype=trt.int32)
        return values, indices

    @trtp.autotune(POOL_PLUGIN_ID)
    def _pool_autotune(x, outputs):
        return [trtp.AutoTuneCombination(AUTOTUNE_TYPES[POOL_PLUGIN_ID], "LINEAR")]

    @trtp.aot_impl(POOL_PLUGIN_ID)
    def _pool_aot(x, outputs, tactic) -> AotResult:
        s = x.shape_expr
        return _aot_result(trtp, "pool_argmax_kernel", _dtype_name(trt, x.dtype),
                           K.pool_scalar_args(s[0], s[1], s[2], s[3]))

    @trtp.impl(POOL_PLUGIN_ID)
    def _pool_impl(x, outputs, stream) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt = torch.as_tensor(x, device="cuda")
            K.max_pool_argmax(xt, out=(torch.as_tensor(outputs[0], device="cuda"),
                                       torch.as_tensor(outputs[1], device="cuda")))

    # --- MaxUnpool2d --------------------------------------------------------------------------

    @_register_once(trtp, UNPOOL_PLUGIN_ID)
    def _unpool_desc(values: trtp.TensorDesc, indices: trtp.TensorDesc, like: trtp.TensorDesc) -> trtp.TensorDesc:
        return like.like()

    @trtp.autotune(UNPOOL_PLUGIN_ID)
    def _unpool_autotune(values, indices, like, outputs):
        return [trtp.AutoTuneCombination(AUTOTUNE_TYPES[UNPOOL_PLUGIN_ID], "LINEAR")]

    @trtp.aot_impl(UNPOOL_PLUGIN_ID)
    def _unpool_aot(values, indices, like, outputs, tactic) -> AotResult:
        s = like.shape_expr
        return _aot_result(trtp, "unpool_kernel", _dtype_name(trt, values.dtype),
                           K.unpool_scalar_args(s[0], s[1], s[2], s[3]))

    @trtp.impl(UNPOOL_PLUGIN_ID)
    def _unpool_impl(values, indices, like, outputs, stream) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = torch.as_tensor(outputs[0], device="cuda")
            K.max_unpool2d(torch.as_tensor(values, device="cuda"), torch.as_tensor(indices, device="cuda"),
                           tuple(out.shape[-2:]), out=out)

    _registered = True
