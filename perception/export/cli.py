"""``perception-export``: a model folder to a self-contained ONNX file (uint8 BGR frames in, labels out)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from perception.core.sizes import parse_hw
from perception.core.cli import fail

__all__ = ["build_parser", "main", "parse_batch", "parse_size"]


def parse_batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must be a positive integer or 'dynamic', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--batch must be >= 1")
    return n


def parse_size(text: str) -> tuple[int, int] | str:
    try:
        return parse_hw(text, option="--size", minimum=32, keep_words=("dynamic",))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-export", description=__doc__)
    p.add_argument("--model", required=True, help="a model by name (perception-models lists them) or a model folder "
                   "(weights.safetensors + model.json)")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--unpool", choices=("native", "plugin", "onnx"), default="native",
                   help="native: standard ops only (any runtime); plugin: segnet:: custom ops for TensorRT, with "
                        "ONNX functions for ONNX Runtime; onnx: MaxPool+MaxUnpool (ONNX Runtime only)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--batch", type=parse_batch, default=1, help="N or 'dynamic' (default 1)")
    p.add_argument("--size", type=parse_size, default=None, help="HxW or 'dynamic' (default: the model's input size)")
    p.add_argument("--outputs", default="labels", help="comma list of labels,probs,logits (default labels)")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="'flip': the graph averages the logits of each frame and its mirror (about 2x the compute)")
    p.add_argument("--fp16", action="store_true", help="float16 compute graph (TensorRT 11 takes precision from types)")
    p.add_argument("--int8", action="store_true",
                   help="int8 static quantization for ONNX Runtime CPU (needs --calibration-data)")
    p.add_argument("--int8-activations", choices=("u8", "s8"), default="u8",
                   help="u8: uint8 activations, ONNX Runtime's fast path on x86 (default); s8: int8, the only "
                        "kind TensorRT's parser takes")
    p.add_argument("--calibration-data", help="folder of frames to calibrate int8 activations (e.g. train images)")
    p.add_argument("--calibration-count", type=int, default=32)
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perception.export.check import op_histogram, tensorrt_problems
    from perception.export.onnx import ExportOptions, export_onnx

    try:
        outputs = tuple(o.strip() for o in args.outputs.split(",") if o.strip())
        dynamic_size = args.size == "dynamic"
        opts = ExportOptions(
            unpool=args.unpool, opset=args.opset, batch=args.batch, size=None if dynamic_size else args.size,
            dynamic_size=dynamic_size, outputs=outputs, fp16=args.fp16, tta=args.tta,
        )
        if args.int8 and (args.fp16 or not args.calibration_data):
            raise ValueError("--int8 needs --calibration-data and cannot be combined with --fp16")
        from perception.core.zoo import find_model

        args.model = str(find_model(args.model))  # a path, or a model's name
        t0 = time.time()
        out = export_onnx(args.model, args.out, opts)
        check_frame = None
        if args.int8:
            from perception.core.card import load_card
            from perception.export.quantize import calibration_frames, quantize_int8

            card = load_card(args.model)
            frames = calibration_frames(args.calibration_data, count=args.calibration_count,
                                        size=None if dynamic_size else (args.size or (card.input.height, card.input.width)))
            quantize_int8(out, out, frames, activations=args.int8_activations)
            check_frame = frames[len(frames) // 2]  # a real frame: int8 is judged on data like its own
    except (FileNotFoundError, ValueError) as e:
        return fail("perception-export", str(e))
    hist = op_histogram(out)
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB, {sum(hist.values())} nodes, "
          f"{time.time() - t0:.1f}s): unpool={args.unpool}, outputs={','.join(outputs)}, "
          f"{'int8' if args.int8 else 'fp16' if args.fp16 else 'fp32'}")
    if args.unpool != "onnx":
        problems = tensorrt_problems(out)
        print("TensorRT parser check: " + ("ok" if not problems else f"{len(problems)} problems, e.g. {problems[0]}"))
    if not args.no_verify:
        from perception.export.verify import verify_against_torch

        r = verify_against_torch(args.model, out, frame=check_frame)
        kind = "calibration" if check_frame is not None else "synthetic"
        print(f"ONNX Runtime vs PyTorch on a {kind} frame: labels agree {100 * r['agreement']:.3f}%"
              + (f", max |dprob| {r['max_prob_diff']:.2e}" if r.get("max_prob_diff") is not None else ""))
        if r["agreement"] < (0.95 if args.int8 else 0.99):
            return fail("perception-export", "exported graph disagrees with the PyTorch model", status=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
