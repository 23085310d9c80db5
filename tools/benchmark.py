#!/usr/bin/env python3
"""CPU/GPU inference benchmark of one model across backends, with speed ratios against PyTorch eager
fp32 measured in the same run (machines are shared and noisy: compare ratios, not absolute times).

    python tools/benchmark.py --model models/segnet_basic_camvid \\
        --backends torch,torch-bf16,onnxruntime,onnxruntime-int8 --data ../shared/camvid --split val \\
        --json bench.json

Each backend runs in its own process (clean thread pools, its own peak memory). Per backend: warm-up,
``--runs`` timed calls of ``backend.infer`` on a batch of uint8 BGR frames (preprocessing included),
median and p95 latency, frames/s, peak RSS, and, with ``--data``, val mIoU at native resolution.
``--rounds`` repeats the whole sequence of backends (interleaved, so a slow drift of a shared machine
hits all of them alike); each row reports medians over rounds and the median (and range) of the
per-round ratios against that round's PyTorch fp32 baseline.

``--versus MODEL`` times a second model beside the first: every backend runs both models, one after the
other in each round (same threads, same frames), and each row of the second model carries its speed-up
over the first model's row of the same backend (e.g. a pruned SegNet's int8 graph against the full one's):

    python tools/benchmark.py --model segnet_camvid --versus segnet_camvid_fast --backends onnxruntime-int8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from perception.core.cli import fail


BACKENDS = {
    # name: (kind, options, export options)
    "torch": ("torch", {"precision": "fp32"}, None),
    "torch-bf16": ("torch", {"precision": "bf16"}, None),
    "torch-cl": ("torch", {"precision": "fp32", "channels_last": True}, None),
    # --device cuda: the PyTorch GPU path (fp16 weights, channels_last, CUDA graphs; -eager: without graphs)
    "torch-fp16": ("torch", {"precision": "fp16"}, None),
    "torch-fp16-eager": ("torch", {"precision": "fp16", "cuda_graphs": False}, None),
    "torch-eager": ("torch", {"precision": "fp32", "cuda_graphs": False}, None),
    "onnxruntime": ("onnxruntime", {}, {"unpool": "onnx"}),
    "onnxruntime-native": ("onnxruntime", {}, {"unpool": "native"}),
    "onnxruntime-plugin": ("onnxruntime", {}, {"unpool": "plugin"}),
    "onnxruntime-int8": ("onnxruntime", {}, {"unpool": "onnx", "int8": True}),
    "onnxruntime-native-int8": ("onnxruntime", {}, {"unpool": "native", "int8": True}),
    # flip test-time augmentation inside the graph: each frame and its mirror, logits averaged
    "onnxruntime-flip": ("onnxruntime", {}, {"unpool": "onnx", "tta": "flip"}),
    "onnxruntime-int8-flip": ("onnxruntime", {}, {"unpool": "onnx", "int8": True, "tta": "flip"}),
    # Bayesian models: 8 MC-dropout passes per frame for the uncertainty (what the node runs for them)
    "torch-mc8": ("torch", {"precision": "fp32", "mc_samples": 8, "uncertainty": True}, None),
    "torch-bf16-mc8": ("torch", {"precision": "bf16", "mc_samples": 8, "uncertainty": True}, None),
}
BASELINE = "torch"


def _device(value: str) -> str:
    from perception.core.choices import parse_device

    try:
        device = parse_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if device == "auto":
        raise argparse.ArgumentTypeError("name the device a benchmark measures: cpu or cuda[:N]")
    return device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model by name (perception-models lists them) or a model folder")
    p.add_argument("--versus", help="a second model timed beside --model, backend by backend (model-vs-model rows)")
    p.add_argument("--backends", default="torch,torch-bf16,onnxruntime,onnxruntime-int8",
                   help=f"comma list from {', '.join(BACKENDS)} (the baseline '{BASELINE}' is always run)")
    p.add_argument("--size", default=None, help="HxW of the benchmark frames (default: the model's input size)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3,
                   help="run every backend this many times, interleaved, each in a fresh process; ratios are "
                   "taken within a round (against that round's baseline) so slow drifts of a shared machine cancel")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    p.add_argument("--device", default="cpu", type=_device,
                   help="cpu (default) or cuda[:N]: where the torch backends (and ONNX Runtime's CUDA provider) run")
    p.add_argument("--data", help="dataset folder: also measure mIoU on --split")
    p.add_argument("--split", default="val", help="'+' joins splits (train+val)")
    p.add_argument("--groups", help="only these drives of --split (e.g. 0006R0, a drive the model never saw)")
    p.add_argument("--calibration-data", default=None,
                   help="frames for int8 calibration (default: <data>/train when --data is given)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--work-dir", help="where exported ONNX files go (default: a temporary folder)")
    return p


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    d = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
         "torch": torch.__version__}
    try:
        import onnxruntime

        d["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def prepare(name: str, model: Path, work: Path, calib: str | None) -> str | None:
    """Export the ONNX file a backend needs (in the parent, once); returns its path."""
    kind, _, export = BACKENDS[name]
    if kind != "onnxruntime":
        return None
    from perception.core.zoo import INT8_ONNX_FILE
    from perception.export.onnx import ExportOptions, export_onnx

    if export.get("int8") and export["unpool"] == "onnx" and (model / INT8_ONNX_FILE).is_file():
        print(f"{name}: the folder's shipped {INT8_ONNX_FILE}", file=sys.stderr)
        return str(model / INT8_ONNX_FILE)  # what the node runs

    path = work / f"{name}.onnx"
    export_onnx(model, path, ExportOptions(unpool=export["unpool"], tta=export.get("tta", "none")))
    if export.get("int8"):
        from perception.export.quantize import calibration_frames, quantize_int8
        from perception.models.io import load_card

        if not calib:
            raise SystemExit(f"{name} needs --calibration-data (or --data with a train/ folder)")
        card = load_card(model)
        quantize_int8(path, path, calibration_frames(calib, count=32, size=(card.input.height, card.input.width)))
    return str(path)


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    exec, so a spawned worker would report its parent's peak (e.g. from int8 calibration)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(name: str, model: str, onnx_path: str | None, args: dict, queue: mp.Queue) -> None:
    try:
        from perception.inference import load_backend

        kind, opts, _ = BACKENDS[name]
        opts = dict(opts)
        uncertainty = opts.pop("uncertainty", False)
        if args["threads"]:
            opts["threads"] = args["threads"]
        if kind in ("torch", "onnxruntime"):
            opts["device"] = args["device"]
        if kind == "torch" and args["device"] == "cpu":
            opts.pop("cuda_graphs", None)  # graphs are CUDA's
        backend = load_backend(onnx_path or model, backend=kind, **opts)
        if uncertainty and not backend.capabilities.uncertainty:
            raise ValueError(f"{name} needs a model with dropout (a Bayesian one)")
        card = backend.card
        h, w = args["size"] or (card.input.height, card.input.width)
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, (args["batch"], h, w, 3), dtype=np.uint8)
        for _ in range(args["warmup"]):
            backend.infer(frames, uncertainty=uncertainty)
        times = []
        for _ in range(args["runs"]):
            t0 = time.perf_counter()
            backend.infer(frames, uncertainty=uncertainty)
            times.append(time.perf_counter() - t0)
        t = np.array(times) * 1e3
        res = {"backend": name, "onnx": onnx_path, "median_ms": float(np.median(t)),
               "p95_ms": float(np.percentile(t, 95)), "fps": float(args["batch"] * 1e3 / np.median(t))}
        if args["data"]:
            from perception.data.loading import open_dataset
            from perception.eval.scoring import evaluate_backend

            ds = open_dataset(args["data"], args["split"], groups=args["groups"])
            r = evaluate_backend(backend, ds, boundary=False, progress=False, uncertainty=uncertainty)
            res["val_miou"] = r["miou"]
            res["val_global_accuracy"] = r["global_accuracy"]
        res["peak_mb"] = _peak_rss_mb()
        queue.put(res)
    except BaseException as e:  # report, don't hang the parent
        queue.put({"backend": name, "error": f"{type(e).__name__}: {e}"})


def _merge_rounds(name: str, per_round: list[dict], baseline: list[dict], ratio_key: str = "ratio_vs_torch_fp32") -> dict:
    """One row per backend: medians over rounds, and the ratio against the same round's baseline."""
    errors = [r["error"] for r in per_round if "error" in r]
    if errors:
        return {"backend": name, "error": errors[0]}
    res = dict(per_round[0])
    for key in ("median_ms", "p95_ms", "fps"):
        res[key] = float(np.median([r[key] for r in per_round]))
    res["peak_mb"] = max(r["peak_mb"] for r in per_round)
    res["round_median_ms"] = [r["median_ms"] for r in per_round]
    ratios = [b["median_ms"] / r["median_ms"] for r, b in zip(per_round, baseline) if "error" not in b]
    if ratios:
        res[ratio_key] = float(np.median(ratios))
        res["ratio_range"] = [min(ratios), max(ratios)]
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        print(f"benchmark: unknown backends {unknown}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    if BASELINE not in names:
        names.insert(0, BASELINE)
    if args.device.startswith("cuda"):
        from perception.core.model_folder import torch_cuda_status

        ok, why = torch_cuda_status()
        if not ok:
            print(f"benchmark: --device {args.device}: {why}", file=sys.stderr)
            return 2
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    calib = args.calibration_data or (str(Path(args.data) / "train") if args.data else None)
    from perception.core.zoo import find_model

    try:
        model = find_model(args.model)  # a path, or a model's name
        versus = find_model(args.versus) if args.versus else None
    except FileNotFoundError as e:
        return fail("benchmark", str(e))
    # (row label, backend, model): with --versus each backend runs both models, back to back.
    entries = [(name, name, model) for name in names]
    if versus is not None:
        entries = [e for name in names for e in ((name, name, model), (f"{name} [{versus.name}]", name, versus))]
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as tmpd:
        work = Path(args.work_dir) if args.work_dir else Path(tmpd)
        work.mkdir(parents=True, exist_ok=True)
        cfg = {"size": size, "batch": args.batch, "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
               "device": args.device,
               "data": args.data, "split": args.split,
               "groups": [g for g in args.groups.split(",") if g] if args.groups else None}
        onnx_paths = {}
        # One folder per model, named after it (the exported files share names across models).
        folders = {model: work / model.name}
        if versus is not None:
            folders[versus] = work / (versus.name if versus.name != model.name else f"{versus.name}_versus")
        for label, name, m in entries:
            folders[m].mkdir(exist_ok=True)
            onnx_paths[label] = prepare(name, m, folders[m], calib)
        rounds: list[dict[str, dict]] = []
        for k in range(args.rounds):
            # mIoU does not depend on timing: measured in the first round only.
            round_cfg = cfg if k == 0 else {**cfg, "data": None}
            got = {}
            for label, name, m in entries:
                q = ctx.Queue()
                proc = ctx.Process(target=run_one, args=(name, str(m), onnx_paths[label], round_cfg, q))
                proc.start()
                got[label] = {**q.get(), "backend": label}
                proc.join()
                res = got[label]
                print(f"  round {k + 1}/{args.rounds} {label}: " + (res.get("error") or f"{res['median_ms']:.1f} ms"),
                      file=sys.stderr, flush=True)
            rounds.append(got)
    results = []
    for label, name, m in entries:
        if m is versus:  # against the first model's row of the same backend
            results.append(_merge_rounds(label, [r[label] for r in rounds], [r[name] for r in rounds],
                                         ratio_key=f"speedup_vs_{model.name}"))
        else:
            results.append(_merge_rounds(label, [r[label] for r in rounds], [r[BASELINE] for r in rounds]))
    doc = {"machine": machine(), "model": str(model), **({"versus": str(versus)} if versus else {}), "batch": args.batch,
           "size": list(size) if size else None, "runs": args.runs, "rounds": args.rounds, "results": results}
    hdr = (f"{'backend':40s} {'median ms':>10s} {'p95 ms':>8s} {'fps':>7s} {'peak MB':>8s} {'mIoU':>9s} "
           f"{'x base':>8s} {'(range)':>12s}   (x base: against torch fp32; a --versus row: against --model's row)")
    print(hdr)
    for r in results:
        if "error" in r:
            print(f"{r['backend']:40s} error: {r['error']}")
            continue
        miou = f"{100 * r['val_miou']:.2f}" if "val_miou" in r else "-"
        print(f"{r['backend']:40s} {r['median_ms']:10.1f} {r['p95_ms']:8.1f} {r['fps']:7.2f} {r['peak_mb']:8.0f} "
              f"{miou:>9s} {r.get('ratio_vs_torch_fp32', r.get(f'speedup_vs_{model.name}', float('nan'))):8.2f} "
              + ("{:>12s}".format("%.2f-%.2f" % tuple(r["ratio_range"])) if "ratio_range" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
