"""What this CPU can do fast, read without PyTorch (the runtime install has none).

Two decisions depend on it, and both were measured to matter by an order of magnitude:

* **int8 on x86 without VNNI.** ONNX Runtime multiplies uint8 activations by int8 weights with
  ``VPMADDUBSW`` on AVX2 and AVX-512 CPUs that lack VNNI; it adds pairs of products into int16 *with
  saturation*, so a graph with full 8-bit weights (|w| up to 127: 2 x 255 x 127 > 32767) computes
  different sums there than on a VNNI CPU (``VPDPBUSD`` accumulates in int32). Measured: SegNet-Basic's
  held-out twin scored 37.3 mIoU on 0006R0 in int8 on a Zen 5 (AVX-512 VNNI) and 30.4 with the same
  graph on a Zen 3 (AVX2). Weights of 7 bits (|w| <= 64: 2 x 255 x 64 = 32640) cannot saturate, so
  such a graph computes the same integers on every x86 CPU.
* **bf16 autocast in training.** Without AVX512_BF16 or AMX the bf16 convolutions are emulated.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["cpu_flags", "is_x86", "has_vnni", "u8s8_may_saturate", "isa_summary"]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The kernel's CPU flags (Linux ``/proc/cpuinfo``), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return None


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def has_vnni(flags: frozenset[str] | None = None) -> bool | None:
    """Whether the CPU has AVX512-VNNI or AVX-VNNI (None: unknown, flags unreadable)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return bool({"avx512_vnni", "avx_vnni"} & flags)


def u8s8_may_saturate(flags: frozenset[str] | None = None, *, x86: bool | None = None) -> bool:
    """Whether ONNX Runtime's u8 x s8 convolutions may saturate here (x86 without VNNI, or an x86 CPU
    whose flags cannot be read: assume the worst). ARM's kernels widen before they add."""
    if not (is_x86() if x86 is None else x86):
        return False
    return has_vnni(flags) is not True


def isa_summary(flags: frozenset[str] | None = None) -> str:
    """A few words for records and startup lines, e.g. ``AVX-512 VNNI BF16`` or ``AVX2``."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return platform.machine() or "unknown"
    if "avx512f" in flags:
        parts = ["AVX-512"] + [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"),
                                                        ("amx_tile", "AMX")) if flag in flags]
        return " ".join(parts)
    if "avx2" in flags:
        return "AVX2" + (" AVX-VNNI" if "avx_vnni" in flags else "")
    if "asimd" in flags:
        return "NEON" + (" dotprod" if "asimddp" in flags else "")
    return platform.machine() or "unknown"
