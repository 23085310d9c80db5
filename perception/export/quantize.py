"""int8 static quantization of an exported graph for ONNX Runtime on CPUs (VNNI / AVX-512).

QDQ format, per-channel int8 weights, uint8 activations calibrated on real frames (e.g. a sample of
the training images). The model card metadata is carried over. Accuracy must be measured (the
benchmark reports val mIoU per backend): quantization is a trade, not a free lunch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from perception.core.fileio import atomic_write_bytes
from perception.core.options import at_least, opt

__all__ = ["quantize_int8", "calibration_frames", "Int8Options", "INT8_ACTIVATIONS", "INT8_POOLS"]


def calibration_frames(folder: str | Path, *, count: int = 32, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """``count`` BGR frames spread evenly over the images in ``folder`` (resized to ``size`` = (H, W))."""
    from perception.core.fileio import list_images

    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"no calibration images in {folder}")
    step = max(1, len(paths) // count)
    frames = []
    for p in paths[::step][:count]:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            continue
        if size is not None and img.shape[:2] != tuple(size):
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        frames.append(img)
    return frames


INT8_ACTIVATIONS = ("u8", "s8")
INT8_POOLS = ("quantized", "quantized+unpools", "float")
INT8_WEIGHT_BITS = (7, 8)


@dataclass
class Int8Options:
    """Static int8 quantization after export; ``perception-export``'s int8 flags are these fields."""

    int8: bool = opt(False, help="int8 static quantization for ONNX Runtime CPU (needs --calibration-data)")
    int8_activations: str = opt("u8", choices=INT8_ACTIVATIONS,
                                help="u8: uint8 activations, ONNX Runtime's fast path on x86 (default); s8: int8, "
                                     "the only kind TensorRT's parser takes")
    calibration_data: str | None = opt(None, metavar="DIR",
                                       help="folder of frames to calibrate int8 activations (e.g. train images)")
    calibration_count: int = opt(32, check=at_least(1), metavar="N", help="frames to calibrate on")
    int8_pools: str = opt("quantized", choices=INT8_POOLS,
                          help="quantized: max pooling on the uint8 tensors (labels unchanged, "
                               "perception.export.quantized_pools; u8 activations only); quantized+unpools: the "
                               "unpooling too (as ScatterElements: measured slower than float MaxUnpool on 2 cores); "
                               "float: pools as quantization leaves them")
    int8_weight_bits: int | None = opt(None, choices=INT8_WEIGHT_BITS, metavar="BITS",
                                       help="7: weights in [-64, 64], so ONNX Runtime's u8 x s8 products cannot "
                                            "saturate on x86 CPUs without VNNI and every CPU computes the same "
                                            "integers; 8: full range (its sums saturate on x86 CPUs without VNNI; "
                                            "VNNI CPUs and TensorRT sum exactly). "
                                            "Default: 7 with u8 activations (CPUs), 8 with s8 (TensorRT)")


def quantize_int8(onnx_in: str | Path, onnx_out: str | Path, frames: Sequence[np.ndarray], *,
                  method: str = "minmax", activations: str = "u8", pools: str = "quantized",
                  weight_bits: int | None = None) -> Path:
    """Static int8 quantization (QDQ, per-channel int8 weights). ``activations``: ``u8`` (uint8, ONNX
    Runtime's fast path on x86: VNNI multiplies u8 x s8) or ``s8`` (int8: the only activation type
    TensorRT's explicit quantization takes, as UINT8 may not be an intermediate tensor there).
    ``pools="quantized"`` then moves the pools onto the uint8 tensors, ``"quantized+unpools"`` the
    unpooling too (u8 only: TensorRT places its own Q/DQ); the graph's ``segnet.int8_pools`` says which.
    ``weight_bits`` (default 7 for u8, 8 for s8): 7-bit weights keep ONNX Runtime's u8 x s8 pair sums
    inside int16 on x86 CPUs without VNNI (:mod:`perception.core.cpu`), so the graph's accuracy measured
    on one CPU holds on every one; ``segnet.int8_weight_bits`` records it."""
    if pools not in INT8_POOLS:
        raise ValueError(f"pools must be one of {INT8_POOLS}, got {pools!r}")
    if activations not in INT8_ACTIVATIONS:
        raise ValueError(f"activations must be one of {INT8_ACTIVATIONS}, got {activations!r}")
    if weight_bits is None:
        weight_bits = 7 if activations == "u8" else 8
    if weight_bits not in INT8_WEIGHT_BITS:
        raise ValueError(f"weight_bits must be one of {INT8_WEIGHT_BITS}, got {weight_bits!r}")
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not frames:
        raise ValueError("quantization needs calibration frames")
    src = onnx.load(str(onnx_in))
    meta = {p.key: p.value for p in src.metadata_props}
    dims = src.graph.input[0].type.tensor_type.shape.dim
    static_batch = dims[0].dim_value or None

    class Reader(CalibrationDataReader):
        """ONNX Runtime's calibration reader over ``frames``, one input batch per call."""

        def __init__(self) -> None:
            self._it = iter(frames)

        def get_next(self):
            f = next(self._it, None)
            if f is None:
                return None
            batch = f[None] if static_batch in (None, 1) else np.repeat(f[None], static_batch, 0)
            return {"image": np.ascontiguousarray(batch)}

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    onnx_out = Path(onnx_out)
    with tempfile.TemporaryDirectory() as tmpd:
        pre = Path(tmpd) / "pre.onnx"
        quant_pre_process(str(onnx_in), str(pre), skip_symbolic_shape=True)
        q = Path(tmpd) / "q.onnx"
        quantize_static(
            str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=calib,
            reduce_range=weight_bits == 7,  # weights only, in [-64, 64]; activations keep all 8 bits
            # Conv and the ReLU after it (ONNX Runtime fuses them into one QLinearConv). Pooling and
            # unpooling stay float: quantizing the -inf padding of odd-sized pools destroys them.
            op_types_to_quantize=["Conv", "Relu"],
            # TensorRT (what s8 graphs are for) takes symmetric quantization only and int8 DequantizeLinear:
            # zero points 0, biases left in float (no INT32 bias DequantizeLinear).
            extra_options={} if activations == "u8" else {"ActivationSymmetric": True, "QuantizeBias": False},
        )
        model = onnx.load(str(q))
        if activations != "u8":
            pools = "float"
        if pools != "float":
            from perception.export.quantized_pools import pools_on_quantized

            model, _ = pools_on_quantized(model, unpools=pools == "quantized+unpools")
        del model.metadata_props[:]
        for k, v in {**meta, "segnet.precision": "int8", "segnet.int8_activations": activations,
                     "segnet.int8_pools": pools, "segnet.int8_weight_bits": str(weight_bits)}.items():
            e = model.metadata_props.add()
            e.key, e.value = k, v
        atomic_write_bytes(onnx_out, model.SerializeToString())
    return onnx_out
