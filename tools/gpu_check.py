#!/usr/bin/env python3
"""Everything GPU-only this project has, in one command, on a machine with an NVIDIA GPU:

0. the GPU-marked tests (tests/test_gpu.py), in a process without TRITON_INTERPRET;
1. the Triton kernels on CUDA against PyTorch's max_pool2d / max_unpool2d (ties, odd sizes, fp16);
2. PyTorch CUDA fp32/fp16 latency per registered model at 360x480;
3. if TensorRT is installed: SegNet-Basic engines (plugin and native unpooling, fp32 and fp16) built
   with tools/build_engine.py, their argmax agreement with ONNX Runtime (CPU) on CamVid-like frames,
   and their latency.

    python tools/gpu_check.py [--model models/segnet_basic_camvid] [--json gpu_check.json]

Prints a table; record its numbers with the card's name in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time_cuda(fn, runs=30, warmup=5):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def check_gpu_tests(rows):
    """The GPU-marked tests, in a clean process without Triton's interpreter (they refuse to run under it)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or tensorrt",
                        str(ROOT / "tests" / "test_gpu.py")], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    rows.append({"check": "pytest -m 'gpu or tensorrt' tests/test_gpu.py", "ok": r.returncode == 0, "note": summary})
    if r.returncode != 0:
        print(r.stdout[-4000:], file=sys.stderr)


def check_kernels(rows):
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
            out = K.max_unpool2d(v, idx, hw)
            ok &= torch.equal(out.float(), F.max_unpool2d(v.float(), ridx, 2, 2, output_size=hw))
            ms = _time_cuda(lambda: K.max_pool_argmax(x))
            ref_ms = _time_cuda(lambda: F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True))
            rows.append({"check": f"triton pool+unpool {str(dtype)[6:]} {hw[0]}x{hw[1]}", "ok": bool(ok),
                         "ms": ms, "torch_ms": ref_ms})


def check_torch_models(rows):
    import torch

    from perception.models import get_model, list_models

    x = torch.randn(1, 3, 360, 480, device="cuda")
    for name in list_models():
        m = get_model(name, num_classes=11).cuda().eval()
        with torch.inference_mode():
            fp32 = _time_cuda(lambda: m(x), runs=20)
            with torch.autocast("cuda", dtype=torch.float16):
                fp16 = _time_cuda(lambda: m(x), runs=20)
        rows.append({"check": f"torch {name} 360x480", "ok": True, "ms": fp16, "fp32_ms": fp32})


def check_tensorrt(rows, model: Path, work: Path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        rows.append({"check": "tensorrt", "ok": None, "note": "TensorRT not installed: engine checks skipped"})
        return
    import numpy as np

    from perception.inference import load_backend
    from perception.export.tensorrt.builder import main as build_main
    from perception.export.onnx import ExportOptions, export_onnx
    from perception.export.verify import synthetic_frame

    ref_path = export_onnx(model, work / "ref.onnx", ExportOptions(unpool="native"))
    ref = load_backend(ref_path)
    frames = np.stack([synthetic_frame(360, 480, seed=s) for s in range(4)])
    want = ref.infer(frames).labels
    for unpool in ("plugin", "native"):
        for precision in ("fp32", "fp16"):
            eng = work / f"{unpool}-{precision}.engine"
            rc = build_main(["--model", str(model), "--out", str(eng), "--unpool", unpool, "--precision", precision])
            if rc != 0:
                rows.append({"check": f"tensorrt {unpool} {precision}", "ok": False, "note": f"build failed ({rc})"})
                continue
            be = load_backend(eng)
            got = be.infer(frames).labels
            agree = float((got == want).mean())
            t0 = time.perf_counter()
            for _ in range(50):
                be.infer(frames[:1])
            ms = (time.perf_counter() - t0) / 50 * 1e3
            rows.append({"check": f"tensorrt {unpool} {precision}", "ok": agree >= 0.995, "agreement": agree, "ms": ms})
            be.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "segnet_basic_camvid"))
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 3
    rows = []
    gpu = torch.cuda.get_device_name(0)
    check_gpu_tests(rows)
    check_kernels(rows)
    check_torch_models(rows)
    with tempfile.TemporaryDirectory() as tmpd:
        check_tensorrt(rows, Path(args.model), Path(tmpd))
    print(f"GPU: {gpu}, torch {torch.__version__}")
    for r in rows:
        status = {True: "ok", False: "FAIL", None: "skip"}[r["ok"]]
        extra = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                         if k not in ("check", "ok"))
        print(f"{status:5s} {r['check']:48s} {extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=2))
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
