#!/usr/bin/env python3
"""ONNX Runtime (CPU) cost of one SegNet pool + unpool pair, in three exact standard-op forms.

Why: in the int8 SegNet-Basic graph, ONNX Runtime's MaxPool-with-Indices + MaxUnpool are the largest
cost after the convolutions. This measures whether a form built from other standard ops is cheaper:

* ``maxpool_indices``: MaxPool (Indices output) + MaxUnpool (what ``--unpool onnx`` exports);
* ``slices_depth_to_space``: four strided Slices, Max, first-maximum masks, Where, Concat, DepthToSpace;
* ``slices_resize_where``: the same masks interleaved once to full size, nearest Resize, Where.

All three are checked to equal PyTorch's ``max_pool2d``/``max_unpool2d`` (on ReLU'd, rounded input,
so ties are common) before timing. Prints medians and the ratio against ``maxpool_indices``.

    python tools/bench_pool_forms.py [--channels 64 --size 360x480 --runs 15 --threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", default="360x480", help="HxW before the pool (even sides)")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    return p


def _quadrants(x):
    a, b = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]
    c, d = x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    pooled = (a.maximum(b)).maximum(c.maximum(d))
    # First maximum in row-major window order wins, as PyTorch's and Caffe's indices do.
    ea = a == pooled
    eb = (b == pooled) & ~ea
    ec = (c == pooled) & ~(ea | eb)
    ed = ~(ea | eb | ec)
    return pooled, (ea, eb, ec, ed)


def main(argv: list[str] | None = None) -> int:
    import onnx
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F
    from onnx import TensorProto, helper

    args = build_parser().parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))
    if h % 2 or w % 2:
        print("bench_pool_forms: --size needs even sides", file=sys.stderr)
        return 2
    ch = args.channels

    class SlicesDepthToSpace(torch.nn.Module):
        def forward(self, x):
            pooled, masks = _quadrants(x)
            y = pooled * 2  # stands in for the decoder's values
            zero = torch.zeros_like(y)
            q = torch.cat([torch.where(m, y, zero) for m in masks], 1)  # (N, 4C, H/2, W/2), quadrant-major
            n = q.shape[0]
            q = q.reshape(n, 4, ch, h // 2, w // 2).transpose(1, 2).reshape(n, 4 * ch, h // 2, w // 2)
            return F.pixel_shuffle(q, 2)

    class SlicesResizeWhere(torch.nn.Module):
        def forward(self, x):
            pooled, masks = _quadrants(x)
            n = x.shape[0]
            full = F.pixel_shuffle(torch.stack(masks, 2).reshape(n, 4 * ch, h // 2, w // 2).to(torch.uint8), 2) > 0
            up = F.interpolate(pooled * 2, scale_factor=2.0, mode="nearest")
            return torch.where(full, up, torch.zeros_like(up))

    torch.manual_seed(0)
    x = torch.relu(torch.randn(1, ch, h, w)).round()
    y, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    reference = F.max_unpool2d(y * 2, idx, 2, 2, output_size=(h, w)).numpy()

    so = ort.SessionOptions()
    if args.threads:
        so.intra_op_num_threads = args.threads
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        graph = helper.make_graph(
            [helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Mul", ["y", "two"], ["y2"]),
             helper.make_node("MaxUnpool", ["y2", "i"], ["out"], kernel_shape=[2, 2], strides=[2, 2])],
            "maxpool_indices",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ch, h, w])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
            [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
        )
        files["maxpool_indices"] = Path(tmp) / "a.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), files["maxpool_indices"])
        for name, module in (("slices_depth_to_space", SlicesDepthToSpace()), ("slices_resize_where", SlicesResizeWhere())):
            files[name] = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(module, (x,), str(files[name]), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["out"])
        xn = x.numpy()
        for name, path in files.items():
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0].name
            out = sess.run(None, {inp: xn})[0]
            if not np.array_equal(out, reference):
                print(f"bench_pool_forms: {name} differs from PyTorch", file=sys.stderr)
                return 1
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                sess.run(None, {inp: xn})
                times.append(time.perf_counter() - t0)
            results[name] = 1e3 * float(np.median(times))
    base = results["maxpool_indices"]
    print(f"pool+unpool of {ch}x{h}x{w} (float32), ONNX Runtime {ort.__version__}, median of {args.runs}:")
    for name, ms in results.items():
        print(f"  {name:24s} {ms:8.1f} ms   x{base / ms:5.2f} speed vs maxpool_indices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
