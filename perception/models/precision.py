"""Mixed precision for the models: one context for training, evaluation and the PyTorch backend."""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["autocast_context", "native_bf16", "nhwc_fp32_native", "resolve_amp", "resolve_channels_last",
           "AMP_CHOICES", "CHANNELS_LAST_CHOICES"]

from perception.core.choices import AMP_CHOICES, CHANNELS_LAST_CHOICES  # noqa: E402  (re-exported)


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 convolutions run natively here: on a CUDA GPU that supports bf16; on a CPU with
    AVX512_BF16 or AMX (oneDNN's bf16 kernels). Elsewhere bf16 autocast is emulated: measured 9x
    *slower* than fp32 for a SegNet-Basic training step on a Zen 3 (AVX2), where the AVX-512 BF16 Zen 5
    it was chosen on ran it about 2x faster."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_amp(amp: str, device: torch.device | str) -> tuple[str, str | None]:
    """The precision ``amp`` means on ``device``, and a line to tell the user (None: nothing to say).
    ``auto``: bf16 where it is native, else off. An explicit bf16 where it is emulated runs as asked,
    with a warning."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    native = native_bf16(device)
    if amp == "auto":
        if native:
            return "bf16", None
        return "off", f"amp auto: fp32 on this {torch.device(device).type} (no native bf16: AVX512_BF16 or AMX)"
    if amp == "bf16" and not native:
        return "bf16", (f"warning: --amp bf16 on a {torch.device(device).type} without native bf16 (AVX512_BF16 or "
                        "AMX) is emulated and can be several times slower than fp32: --amp auto or off")
    return amp, None


def nhwc_fp32_native(device: torch.device | str) -> bool:
    """Whether fp32 training runs faster in channels_last here: on a CUDA GPU, and on a CPU that
    PyTorch dispatches at AVX-512 (oneDNN's NHWC kernels): SegNet 1.22x and SegNet-Basic 1.17x NCHW's
    images/s on a 2-core Zen 4. On an AVX2 CPU it was the slower layout (a Zen 3: Bayesian SegNet 0.18
    against 0.25 img/s NCHW). ``tools/bench_train_step.py --forms eager-fp32-nchw,eager-fp32-nhwc``."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512"


def resolve_channels_last(value: str | bool, device: torch.device | str, amp: str) -> tuple[bool, str | None]:
    """Whether to train in channels_last for ``value`` ("auto", "on", "off"; a bool from an older
    config.yaml) on ``device`` under ``amp``, and a line to tell the user (None: nothing to say).

    ``auto``: channels_last under bf16/fp16 autocast, on CUDA, and for fp32 on a CPU with AVX-512
    (:func:`nhwc_fp32_native`); NCHW for fp32 elsewhere, where channels_last is the slower layout.
    """
    if isinstance(value, bool):
        value = "on" if value else "off"
    if value not in CHANNELS_LAST_CHOICES:
        raise ValueError(f"channels_last must be one of {CHANNELS_LAST_CHOICES}, got {value!r}")
    if value != "auto":
        return value == "on", None
    device = torch.device(device)
    if resolve_amp(amp, device)[0] in ("bf16", "fp16") or nhwc_fp32_native(device):
        return True, None
    return False, f"channels-last auto: NCHW for fp32 training on this {device.type} (no AVX-512: channels_last is slower)"


def autocast_context(device: torch.device | str, amp: str):
    device = torch.device(device)
    if amp == "auto":
        amp = resolve_amp(amp, device)[0]
    if amp == "off":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)
