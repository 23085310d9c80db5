#!/usr/bin/env python3
"""What Monte-Carlo dropout costs: one frame's MC prediction at each sample count, against one
deterministic (eval-mode) pass of the same network in the same round, with the layers before the
first dropout computed once per frame (what the node and perception-eval run) and, as the baseline,
as whole passes per sample.

    python tools/bench_mc.py --model bayesian_segnet --samples 1 2 4 8 --rounds 2

The cost does not depend on the weights, so ``--model`` takes a registry name (random weights) as
well as a model folder or a shipped model's name. Run it on a quiet machine (pause training:
kill -STOP). Times are medians over rounds; ratios are per round, then their median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bayesian_segnet",
                   help="registry name (random weights), shipped model name or model folder")
    p.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", default="360x480", help="frame size HxW")
    p.add_argument("--amp", choices=["off", "bf16"], default="off", help="autocast, as perception-eval --precision")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p


def _load(name: str, num_classes: int = 11):
    from perception.core.zoo import find_model
    from perception.models import get_model, list_models, load

    if name in list_models():
        return get_model(name, num_classes=num_classes)
    return load(find_model(name))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from perception.core.cli import fail
    from perception.models import has_dropout, mc_dropout_predict
    from perception.models.precision import autocast_context

    prog = "bench_mc"
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(s < 1 for s in args.samples):
        return fail(prog, "--samples must be >= 1")
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        return fail(prog, f"--size must be HxW, got {args.size!r}")
    try:
        model = _load(args.model).eval()
    except (FileNotFoundError, ValueError, KeyError) as e:
        return fail(prog, f"{args.model}: {e}")
    if not has_dropout(model):
        return fail(prog, f"{args.model} has no dropout layers: MC dropout would repeat one pass")
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))

    def timed(fn) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast_context("cpu", args.amp):
            fn()
        return time.perf_counter() - t0

    timed(lambda: model(x))  # warm-up: allocator, kernels' first-call work
    rows: dict[tuple[str, int], list[float]] = {}
    one_pass: list[float] = []
    for _ in range(args.rounds):
        one_pass.append(timed(lambda: model(x)))
        for n in args.samples:
            for form, reuse in (("whole passes", False), ("prefix once", True)):
                t = timed(lambda: mc_dropout_predict(model, x, samples=n, generator_seed=0, reuse_prefix=reuse))
                rows.setdefault((form, n), []).append(t)

    base = statistics.median(one_pass)
    print(f"{args.model}, one {h}x{w} frame, amp {args.amp}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; one eval pass: {base:.2f} s")
    print(f"{'samples':>7} {'whole passes s':>15} {'prefix once s':>14} {'x one pass':>11} {'speed-up':>9}")
    for n in args.samples:
        whole, once = rows[("whole passes", n)], rows[("prefix once", n)]
        ratio = statistics.median(o / b for o, b in zip(once, one_pass))
        speedup = statistics.median(wh / o for wh, o in zip(whole, once))
        print(f"{n:>7} {statistics.median(whole):>15.2f} {statistics.median(once):>14.2f} {ratio:>11.2f} {speedup:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
