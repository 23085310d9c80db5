#!/usr/bin/env python3
"""Training-step throughput of a registry model on this machine: eager vs ``torch.compile``, fp32 vs
bf16, NCHW vs channels_last.

    python tools/bench_train_step.py --model segnet --forms eager-bf16,compile-bf16 --steps 6
    python tools/bench_train_step.py --model segnet --forms eager-fp32-nchw,eager-fp32-nhwc --steps 4

One step = forward under the recipe's autocast, the Caffe-normalised weighted loss, backward and an
AdamW step, on random 240x320 crops. A form is ``{eager,compile}-{fp32,bf16}[-{nchw,nhwc}]``; without a
layout it is channels_last (nhwc). Prints images/s per form and its ratio to the first form, measured
in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="segnet_basic")
    p.add_argument("--forms", default="eager-bf16,compile-bf16",
                   help="comma list of {eager,compile}-{fp32,bf16}[-{nchw,nhwc}]; the first is the baseline")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", default="240x320", help="HxW")
    p.add_argument("--steps", type=int, default=6, help="timed steps per form (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from perception.models import get_model
    from perception.models.precision import autocast_context
    from perception.train.loss import SegmentationLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.crop.lower().split("x"))
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x_nchw = torch.randn(args.batch_size, 3, h, w, generator=g)
    y = torch.randint(0, 11, (args.batch_size, h, w), generator=g)
    criterion = SegmentationLoss(torch.ones(11), ignore_index=11)
    results: list[tuple[str, float, float]] = []
    for form in args.forms.split(","):
        mode, precision, layout = (form.split("-") + ["nhwc"])[:3]
        if mode not in ("eager", "compile") or precision not in ("fp32", "bf16") or layout not in ("nchw", "nhwc") \
                or form.count("-") > 2:
            print(f"error: unknown form {form!r}", file=sys.stderr)
            return 2
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        x = x_nchw.contiguous(memory_format=fmt)
        torch.manual_seed(0)
        model = get_model(args.model, num_classes=11).to(memory_format=fmt).train()
        step_model = torch.compile(model) if mode == "compile" else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        amp = "bf16" if precision == "bf16" else "off"

        def step() -> None:
            with autocast_context(device, amp):
                logits = step_model(x)
            loss = criterion(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        results.append((form, args.batch_size / med, warm))
        print(f"{form}: median step {med * 1000:.0f} ms ({min(times) * 1000:.0f}-{max(times) * 1000:.0f}), "
              f"{args.batch_size / med:.2f} img/s, warm-up {warm:.0f} s", flush=True)
    base = results[0][1]
    print(f"\n{args.model}, batch {args.batch_size} of {h}x{w}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for form, ips, _ in results:
        print(f"  {form:19s} {ips:6.2f} img/s  x{ips / base:.2f} vs {results[0][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
