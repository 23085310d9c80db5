#!/usr/bin/env python3
"""Where an ONNX graph's time goes in ONNX Runtime: per-op-type milliseconds per frame, for one or more
graphs measured in turn in the same run (e.g. an int8 graph before and after
perception.export.quantized_pools), each against the first.

    python tools/profile_ops.py before.onnx after.onnx --frame ../shared/camvid/val/0016E5_07959.png --runs 20

Run it on a quiet machine (pause training: kill -STOP). Times come from ONNX Runtime's own profiler
(node events), so they exclude Python overhead; "total" is the wall time of a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graphs", nargs="+", help=".onnx files (uint8 BGR NHWC input)")
    p.add_argument("--frame", help="an image to run (default: random pixels at the graph's input size)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="alternate the graphs this many times")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    p.add_argument("--nhwc", action="store_true",
                   help="keep ONNX Runtime's NHWC rewrite where the backend turns it off (int8, float pools)")
    return p


def profile(path: str, frame: np.ndarray, runs: int, threads: int, nhwc: bool) -> tuple[dict[str, float], float]:
    """(ms per frame by op type, wall ms per frame) over ``runs`` runs after two warm-ups, with the
    session options of the node's backend (perception.inference.onnxruntime) unless ``nhwc``."""
    import onnxruntime as ort

    from perception.core.onnx_meta import read_onnx_metadata
    from perception.inference.onnxruntime import disabled_optimizers

    disabled = [] if nhwc else disabled_optimizers(read_onnx_metadata(path))

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        feed = {s.get_inputs()[0].name: frame[None]}
        for _ in range(2):
            s.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(runs):
            s.run(None, feed)
        wall = (time.perf_counter() - t0) / runs * 1e3
        events = json.loads(Path(s.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    node_events = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    n_runs = runs + 2
    for e in node_events:
        by_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / n_runs
    return dict(by_op), wall


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import cv2
    import onnx

    shape = [d.dim_value for d in onnx.load(args.graphs[0], load_external_data=False).graph.input[0].type.tensor_type.shape.dim]
    if args.frame:
        frame = cv2.imread(args.frame)
        if frame is None:
            print(f"profile_ops: error: cannot read {args.frame}", file=sys.stderr)
            return 2
    else:
        frame = np.random.default_rng(0).integers(0, 256, (shape[1], shape[2], 3), dtype=np.uint8)
    results: dict[str, list[tuple[dict[str, float], float]]] = defaultdict(list)
    for _ in range(args.rounds):
        for g in args.graphs:
            results[g].append(profile(g, frame, args.runs, args.threads, args.nhwc))
    summary = {}
    for g in args.graphs:
        ops: dict[str, list[float]] = defaultdict(list)
        for by_op, _ in results[g]:
            for k, v in by_op.items():
                ops[k].append(v)
        summary[g] = ({k: float(np.median(v)) for k, v in ops.items()}, float(np.median([w for _, w in results[g]])))
    names = sorted({k for ops, _ in summary.values() for k in ops}, key=lambda k: -summary[args.graphs[0]][0].get(k, 0))
    head = f"{'op type':<22}" + "".join(f"{Path(g).name[:24]:>26}" for g in args.graphs)
    print(head)
    for k in names:
        print(f"{k:<22}" + "".join(f"{summary[g][0].get(k, 0.0):>23.2f} ms" for g in args.graphs))
    print(f"{'sum of ops':<22}" + "".join(f"{sum(summary[g][0].values()):>23.2f} ms" for g in args.graphs))
    base = summary[args.graphs[0]][1]
    print(f"{'wall per frame':<22}" + "".join(f"{summary[g][1]:>15.2f} ms ({base / summary[g][1]:.2f}x)" for g in args.graphs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
