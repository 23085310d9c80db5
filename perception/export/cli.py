"""``perception-export``: a model folder to a self-contained ONNX file (uint8 BGR frames in, labels out)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from perception.core.cli import fail
from perception.core.options import add_arguments, given, merge, validate
from perception.export.onnx import ExportOptions, parse_size
from perception.export.quantize import Int8Options

__all__ = ["build_parser", "main", "parse_size"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-export", description=__doc__)
    p.add_argument("--model", required=True, help="a model by name (perception-models lists them) or a model folder "
                   "(weights.safetensors + model.json)")
    p.add_argument("--out", required=True, help="output .onnx file")
    add_arguments(p, ExportOptions)
    add_arguments(p, Int8Options)
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perception.export.check import op_histogram, tensorrt_problems
    from perception.export.onnx import export_onnx

    try:
        opts = validate(merge(ExportOptions, given(args, ExportOptions)))
        q = validate(merge(Int8Options, given(args, Int8Options)))
        if q.int8 and (opts.fp16 or not q.calibration_data):
            raise ValueError("--int8 needs --calibration-data and cannot be combined with --fp16")
        from perception.core.zoo import find_model

        args.model = str(find_model(args.model))  # a path, or a model's name
        t0 = time.time()
        out = export_onnx(args.model, args.out, opts)
        check_frame = None
        if q.int8:
            from perception.core.card import load_card
            from perception.export.quantize import calibration_frames, quantize_int8

            card = load_card(args.model)
            frames = calibration_frames(q.calibration_data, count=q.calibration_count,
                                        size=None if opts.dynamic_size else (opts.size or (card.input.height, card.input.width)))
            quantize_int8(out, out, frames, activations=q.int8_activations, pools=q.int8_pools,
                          weight_bits=q.int8_weight_bits)
            check_frame = frames[len(frames) // 2]  # a real frame: int8 is judged on data like its own
    except (FileNotFoundError, ValueError) as e:
        return fail("perception-export", str(e))
    hist = op_histogram(out)
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB, {sum(hist.values())} nodes, "
          f"{time.time() - t0:.1f}s): unpool={opts.unpool}, outputs={','.join(opts.outputs)}, "
          f"{'int8' if q.int8 else 'fp16' if opts.fp16 else 'fp32'}")
    if opts.unpool != "onnx":
        problems = tensorrt_problems(out)
        print("TensorRT parser check: " + ("ok" if not problems else f"{len(problems)} problems, e.g. {problems[0]}"))
    if not args.no_verify:
        from perception.export.verify import verify_against_torch

        r = verify_against_torch(args.model, out, frame=check_frame)
        kind = "calibration" if check_frame is not None else "synthetic"
        print(f"ONNX Runtime vs PyTorch on a {kind} frame: labels agree {100 * r['agreement']:.3f}%"
              + (f", max |dprob| {r['max_prob_diff']:.2e}" if r.get("max_prob_diff") is not None else ""))
        if r["agreement"] < (0.95 if q.int8 else 0.99):
            return fail("perception-export", "exported graph disagrees with the PyTorch model", status=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
