#!/usr/bin/env python3
"""Everything GPU-only this project has, in one command that fits in 8 minutes of a lent GPU machine:

0. the GPU-marked tests (tests/test_gpu.py, once), in a process without TRITON_INTERPRET;
1. the Triton kernels on CUDA against PyTorch's max_pool2d / max_unpool2d (ties, odd sizes, fp16), timed;
2. the PyTorch CUDA backend's labels against the CPU fp32 labels on the demo clip (fp32 and fp16, CUDA
   graphs on): agreement >= 0.995;
3. latency and frames/s of SegNet-Basic and SegNet at 360x480 through the backend (upload, preprocessing,
   network, argmax, copy back), batch 1 and 4, fp32 and fp16, CUDA graphs on and off, with each row's ratio
   against eager fp32 at the same batch measured in the same run;
4. the node end to end on the demo clip (``perception-node --source demo --device cuda``): frames/s;
5. where TensorRT is importable: SegNet-Basic engines (plugin and native unpooling, fp32 and fp16) against
   ONNX Runtime on the CPU, and their latency.

Each result is printed as soon as it is known and appended to ``--json`` (JSON Lines, flushed), so a
run cut short by a time limit keeps everything measured before the cut.

    python tools/gpu_check.py --json gpu_check.jsonl     # then record the numbers in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("segnet_basic_camvid", "segnet_camvid")
DEVICE = "cuda"  # --dry-run: "cpu", to try the script's plumbing on a machine without a GPU (no timings kept)
RUNS = 30


class Report:
    """Prints each row as it comes and appends it to a JSON Lines file (flushed per row)."""

    def __init__(self, json_path: str | None) -> None:
        self.file = open(json_path, "a", buffering=1) if json_path else None
        self.failed = 0

    def row(self, check: str, ok: bool | None, **fields) -> None:
        self.failed += ok is False
        status = {True: "ok", False: "FAIL", None: "skip"}[ok]
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        print(f"{status:5s} {check:56s} {extra}", flush=True)
        if self.file is not None:
            self.file.write(json.dumps({"check": check, "ok": ok, **fields, "t": time.time()}) + "\n")

    def guarded(self, name: str, fn, *args) -> None:
        """Run one check; an exception is a FAIL row with its message, and the next check still runs."""
        try:
            fn(self, *args)
        except Exception as e:  # noqa: BLE001
            self.row(name, False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])


def _sync() -> None:
    import torch

    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _time_cuda(fn, runs: int | None = None, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` (synchronised)."""
    runs = min(runs or RUNS, RUNS)
    for _ in range(min(warmup, runs)):
        fn()
    _sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def check_gpu_tests(report: Report) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or tensorrt",
                        str(ROOT / "tests" / "test_gpu.py")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=240)
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    report.row("pytest -m 'gpu or tensorrt' tests/test_gpu.py", r.returncode == 0, note=summary)
    if r.returncode != 0:
        print(r.stdout[-3000:], file=sys.stderr, flush=True)


def check_kernels(report: Report) -> None:
    import torch
    import torch.nn.functional as F

    from perception.export.tensorrt import kernels as K

    for dtype in (torch.float32, torch.float16):
        for hw in ((45, 60), (23, 30), (360, 480), (7, 1)):
            x = torch.randint(0, 3, (2, 64, *hw), device="cuda").to(dtype)
            y, idx = K.max_pool_argmax(x)
            ry, ridx = F.max_pool2d(x.float(), 2, 2, ceil_mode=True, return_indices=True)
            ok = torch.equal(y.float(), ry) and torch.equal(idx.long(), ridx)
            v = torch.randn_like(y)
            ok &= torch.equal(K.max_unpool2d(v, idx, hw).float(), F.max_unpool2d(v.float(), ridx, 2, 2, output_size=hw))
            pool_ms = _time_cuda(lambda: K.max_pool_argmax(x))
            ref_pool_ms = _time_cuda(lambda: F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True))
            unpool_ms = _time_cuda(lambda: K.max_unpool2d(v, idx, hw))
            ref_unpool_ms = _time_cuda(lambda: F.max_unpool2d(v, ridx, 2, 2, output_size=hw))
            report.row(f"triton pool+unpool {str(dtype)[6:]} 2x64x{hw[0]}x{hw[1]}", bool(ok), pool_ms=pool_ms,
                       torch_pool_ms=ref_pool_ms, unpool_ms=unpool_ms, torch_unpool_ms=ref_unpool_ms)


def _demo_frames(n: int = 16):
    import cv2
    import numpy as np

    from perception.stream.node.sources import DEMO_CLIP

    cap = cv2.VideoCapture(str(DEMO_CLIP))
    frames = []
    while len(frames) < n:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return np.stack(frames)


def check_agreement(report: Report) -> None:
    from perception.core.zoo import find_model
    from perception.inference.torch import TorchBackend

    frames = _demo_frames()
    for name in MODELS:
        folder = find_model(name)
        want = TorchBackend(folder, device="cpu").infer(frames).labels
        for precision in ("fp32", "fp16"):
            be = TorchBackend(folder, device=DEVICE, precision=precision if DEVICE != "cpu" else "fp32")
            got = be.infer(frames).labels
            agree = float((got == want).mean())
            report.row(f"torch {DEVICE} {precision} vs cpu fp32 labels, {name}, demo x{len(frames)}", agree >= 0.995,
                       agreement=agree)


def check_latency(report: Report) -> None:
    import numpy as np
    import torch

    from perception.core.zoo import find_model
    from perception.inference.torch import TorchBackend

    frames = _demo_frames(4)
    for name in MODELS:
        folder = find_model(name)
        for batch in (1, 4):
            x = np.ascontiguousarray(frames[:batch])
            base_ms = None
            for precision, graphs in (("fp32", False), ("fp32", True), ("fp16", False), ("fp16", True)):
                be = TorchBackend(folder, device=DEVICE, precision=precision if DEVICE != "cpu" else "fp32",
                                  cuda_graphs=graphs and DEVICE != "cpu")
                ms = _time_cuda(lambda: be.infer(x), warmup=5)
                base_ms = ms if base_ms is None else base_ms
                report.row(f"torch {DEVICE} {name} 360x480 b{batch} {precision} {'graphs' if graphs else 'eager'}",
                           True, ms=ms, fps=batch * 1e3 / ms, speedup_vs_eager_fp32=base_ms / ms)
                be.close()
                if DEVICE != "cpu":
                    torch.cuda.empty_cache()


def check_node(report: Report) -> None:
    """The node on the demo clip as fast as it goes (not paced), with a subscriber taking every mask."""
    import socket

    from perception.stream.client import Subscriber, follow

    for name in MODELS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        node = subprocess.Popen([sys.executable, "-m", "perception.stream.node.cli", "--source", "demo", "--model",
                                 name, "--device", DEVICE, "--publish", endpoint, "--wait-for-subscribers", "1",
                                 "--log-period", "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        masks, final, t0 = 0, {}, None
        with Subscriber(endpoint, topics=["segnet/mask", "segnet/stats"]) as sub:
            for msg in follow(sub, timeout=90):
                if msg.stream == "mask":
                    t0 = t0 or time.perf_counter()
                    masks += 1
                elif isinstance(msg.data, dict) and msg.data.get("final"):
                    final = msg.data
        wall = time.perf_counter() - (t0 or time.perf_counter())
        err = node.communicate(timeout=60)[1]
        fields = {"masks": masks, "fps_received": (masks - 1) / wall if masks > 1 and wall > 0 else 0.0,
                  "node_fps": final.get("fps"), "latency_ms": json.dumps(final.get("latency_ms"))[:200],
                  "startup": next((line for line in err.splitlines() if line.startswith("publishing")), "")[:200]}
        report.row(f"node --source demo --device {DEVICE}, {name}", node.returncode == 0 and masks > 0, **fields)


def check_tensorrt(report: Report, model: Path, work: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        report.row("tensorrt", None, note="TensorRT not installed: engine checks skipped")
        return
    from perception.export.onnx import ExportOptions, export_onnx
    from perception.export.tensorrt.builder import main as build_main
    from perception.inference import load_backend

    ref = load_backend(export_onnx(model, work / "ref.onnx", ExportOptions(unpool="native")))
    frames = _demo_frames(4)
    want = ref.infer(frames).labels
    for unpool in ("plugin", "native"):
        for precision in ("fp32", "fp16"):
            eng = work / f"{unpool}-{precision}.engine"
            rc = build_main(["--model", str(model), "--out", str(eng), "--unpool", unpool, "--precision", precision])
            if rc != 0:
                report.row(f"tensorrt {unpool} {precision}", False, note=f"build failed ({rc})")
                continue
            be = load_backend(eng)
            agree = float((be.infer(frames).labels == want).mean())
            ms = _time_cuda(lambda: be.infer(frames[:1]), runs=50)
            report.row(f"tensorrt {unpool} {precision}", agree >= 0.995, agreement=agree, ms=ms)
            be.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "segnet_basic_camvid"), help="the model TensorRT builds")
    p.add_argument("--json", help="append one JSON object per result here (JSON Lines)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, two runs per timing: tries the script itself "
                                                          "where there is no GPU (its numbers mean nothing)")
    p.add_argument("--skip", default="", help="comma list of checks to leave out: tests,kernels,agreement,latency,"
                                              "node,tensorrt")
    args = p.parse_args(argv)
    import torch

    global DEVICE, RUNS
    if args.dry_run:
        DEVICE, RUNS = "cpu", 2
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 3
    report = Report(args.json)
    gpu = torch.cuda.get_device_name(0) if DEVICE != "cpu" else "none (--dry-run)"
    report.row("machine", True, gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda)
    skip = set(filter(None, args.skip.split(",")))
    checks = [("tests", check_gpu_tests), ("kernels", check_kernels), ("agreement", check_agreement),
              ("latency", check_latency), ("node", check_node)]
    for name, fn in checks:
        if name not in skip:
            report.guarded(name, fn)
    if "tensorrt" not in skip:
        with tempfile.TemporaryDirectory() as tmpd:
            report.guarded("tensorrt", check_tensorrt, Path(args.model), Path(tmpd))
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
