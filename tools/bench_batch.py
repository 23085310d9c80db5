#!/usr/bin/env python3
"""Does batching pay on this CPU? Per-frame time of an ONNX graph with a dynamic batch axis at batch
sizes 1, 2, 4, ..., each against batch 1 in the same round (ONNX Runtime, the backend's session
options), on CamVid-sized frames.

    perception-export --model segnet_basic_camvid --out /tmp/b.onnx --unpool onnx --batch dynamic \
        --int8 --calibration-data ../shared/camvid/train
    python tools/bench_batch.py /tmp/b.onnx --batches 1 2 4 --runs 8 --rounds 3

Run it on a quiet machine (pause training: kill -STOP).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graph", help=".onnx with a dynamic batch axis (uint8 BGR NHWC input)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--runs", type=int, default=8, help="runs per batch size and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", default="360x480")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnxruntime as ort

    from perception.core.onnx_meta import read_onnx_metadata
    from perception.inference.onnxruntime import disabled_optimizers

    h, w = (int(v) for v in args.size.split("x"))
    s = ort.InferenceSession(args.graph, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled_optimizers(read_onnx_metadata(args.graph)))
    if isinstance(s.get_inputs()[0].shape[0], int) and s.get_inputs()[0].shape[0] != max(args.batches):
        print(f"bench_batch: error: {args.graph} has a static batch of {s.get_inputs()[0].shape[0]}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    per_frame: dict[int, list[float]] = {b: [] for b in args.batches}
    for _ in range(args.rounds):
        for b in args.batches:
            x = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
            s.run(None, {"image": x})  # warm-up at this shape
            t0 = time.perf_counter()
            for _ in range(args.runs):
                s.run(None, {"image": x})
            per_frame[b].append((time.perf_counter() - t0) / args.runs / b * 1e3)
    base = np.array(per_frame[args.batches[0]])
    print(f"{'batch':>6} {'ms/frame (median)':>18} {'frames/s':>9} {'x batch ' + str(args.batches[0]) + ' (per round)':>28}")
    for b in args.batches:
        v = np.array(per_frame[b])
        ratios = base / v
        print(f"{b:>6} {np.median(v):>18.1f} {1e3 / np.median(v):>9.2f} "
              f"{np.median(ratios):>10.2f} ({ratios.min():.2f}-{ratios.max():.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
