#!/usr/bin/env python3
"""What Monte-Carlo dropout and flip TTA gain: a Bayesian model's one pass, its MC-dropout prediction at
each sample count, each with and without flip TTA, scored with the paper's metrics on the same frames in one
run (the gains against the one pass, a table, a JSON file and a plot), and how well each row's uncertainty
ranks its own errors: the AUROC of the paper's MC uncertainty (the samples' class variance) and of the
entropy of the mean probabilities (the node's map; for the one pass its softmax entropy, what a model without
dropout offers) as detectors of misclassified pixels.

    python tools/mc_gains.py bayesian_segnet_camvid --data ../shared/camvid --split train+val \\
        --groups 0006R0 --samples 4 8 16 --json mc_gains.json --plot mc_gains.png

Measure on frames the model never trained on (a held-out drive): on its own training frames the samples
agree and the gains say nothing. Per frame, the layers before the first dropout run once, and the K-sample
prediction is the first K of the largest count's samples, drawn after seeding with ``--seed`` + the
frame's index, so each row is exactly ``mc_dropout_predict(model, x, samples=K)`` (with ``FlipTTA`` for
the flip rows) under that seed: the rows share their samples, and their differences are not sampling
noise between separate runs. What the samples cost is ``tools/bench_mc.py``'s.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

PROG = "mc_gains"
METRICS = ("global_accuracy", "class_accuracy", "miou", "bf")
AUROCS = ("auroc_entropy", "auroc_variance")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a Bayesian model folder or a shipped model's name")
    p.add_argument("--data", required=True, help="dataset folder (CamVid or folder layout)")
    p.add_argument("--split", default="val", help="split ('+' joins splits, e.g. train+val)")
    p.add_argument("--groups", default=None, metavar="GROUP[,GROUP]", help="only these drives, e.g. 0006R0")
    p.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16], help="MC sample counts")
    p.add_argument("--seed", type=int, default=0, help="frame i's dropout masks are drawn after seeding seed + i")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="PyTorch autocast, as perception-eval's")
    p.add_argument("--json", default=None, metavar="FILE", help="write every row's metrics here")
    p.add_argument("--plot", default=None, metavar="PNG", help="mIoU, BF and AUROC against the sample count")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="a progress bar")
    return p


def row_names(counts: list[int]) -> list[str]:
    """The rows in table order: the one pass, then each sample count, each without and with flip TTA."""
    names = ["one pass", "one pass + flip"]
    for k in counts:
        names += [f"MC {k}", f"MC {k} + flip"]
    return names


class RowPrediction(NamedTuple):
    """One row's prediction for a batch: labels (N, H, W), the entropy of its mean class probabilities and,
    for MC rows, the paper's uncertainty (the samples' class variance averaged over classes; None otherwise)."""

    labels: Any
    entropy: Any
    variance: Any = None


def frame_predictions(model, x, counts: list[int], *, seed: int, amp: str = "off") -> dict[str, RowPrediction]:
    """Every row of :func:`row_names` on one normalised batch ``x``."""
    import torch

    from perception.models.bayesian import mc_dropout_mode, predictive_entropy as _entropy
    from perception.models.precision import autocast_context
    from perception.models.tta import FlipTTA

    out: dict[str, RowPrediction] = {}
    n, top = x.shape[0], max(counts)
    with torch.no_grad(), autocast_context(x.device, amp):
        model.eval()
        for name, net in (("one pass", model), ("one pass + flip", FlipTTA(model))):
            p = torch.softmax(net(x).double(), dim=1)
            out[name] = RowPrediction(p.argmax(1), _entropy(p))
        to_dropout = getattr(model, "forward_to_dropout", None)
        from_dropout = getattr(model, "forward_from_dropout", None)
        if to_dropout is None or from_dropout is None:  # whole passes: the same samples, at full cost
            to_dropout, from_dropout = (lambda v: v), model
        for flip in (False, True):
            # Both views as one batch of 2N, as FlipTTA runs them: the dropout masks are drawn in its order.
            views = torch.cat([x, x.flip(-1)]) if flip else x
            torch.manual_seed(seed)
            total = squares = None
            with mc_dropout_mode(model):
                prefix = to_dropout(views)
                for j in range(1, top + 1):
                    logits = from_dropout(prefix)
                    if flip:
                        logits = (logits[:n] + logits[n:].flip(-1)) / 2
                    p = torch.softmax(logits.double(), dim=1)
                    total = p if total is None else total + p
                    squares = p * p if squares is None else squares + p * p
                    if j in counts:  # mc_dropout_predict's summary of the first j samples
                        mean = total / j
                        variance = (squares / j - mean * mean).clamp_min(0).mean(1)
                        out[f"MC {j}{' + flip' if flip else ''}"] = RowPrediction(mean.argmax(1), _entropy(mean),
                                                                                 variance)
    return {name: out[name] for name in row_names(counts)}


def measure(model, dataset, counts: list[int], *, seed: int = 0, amp: str = "off", progress: bool = True) -> dict[str, dict]:
    """Every row's metrics over ``dataset`` (uint8 image, label tensors): ``SegmentationMetrics.compute()``
    plus ``auroc_entropy`` and, for MC rows, ``auroc_variance`` (``ErrorDetection``'s AUROC of each
    uncertainty as a detector of the row's own errors; None where a row has no variance)."""
    from tqdm.auto import tqdm

    from perception.data.transforms import normalize
    from perception.eval.metrics import ErrorDetection, SegmentationMetrics

    names = row_names(counts)
    k, void = dataset.num_classes, dataset.ignore_index
    scores = {name: SegmentationMetrics(k, void) for name in names}
    by_entropy = {name: ErrorDetection(k, void) for name in names}
    by_variance = {name: ErrorDetection(k, void) for name in names if name.startswith("MC")}
    spec = model.card.input
    device = next(model.parameters()).device
    for i in tqdm(range(len(dataset)), desc="frames", unit="img", disable=not progress):
        img, lab = dataset[i]
        x = normalize(img[None].to(device), spec)
        rows = frame_predictions(model, x, counts, seed=seed + i, amp=amp)
        target = lab.numpy()
        for name, row in rows.items():
            pred = row.labels[0].cpu().numpy()
            scores[name].update(pred, target)
            by_entropy[name].update(row.entropy[0].cpu().numpy(), pred, target)
            if name in by_variance:
                by_variance[name].update(row.variance[0].cpu().numpy(), pred, target)
    return {name: {**scores[name].compute(), "auroc_entropy": by_entropy[name].compute()["auroc"],
                   "auroc_variance": by_variance[name].compute()["auroc"] if name in by_variance else None}
            for name in names}


def format_rows(results: dict[str, dict]) -> str:
    """One line a row: G, C, mIoU, BF (percent), mIoU's gain over the one pass (points), and the AUROC of the
    entropy and of the variance as detectors of the row's errors."""
    base = results["one pass"]["miou"]
    lines = [f"{'':<16}{'G':>7}{'C':>7}{'mIoU':>7}{'BF':>7}{'gain':>8}{'AUROC H':>9}{'AUROC var':>10}"]
    for name, r in results.items():
        vals = "".join(f"{100 * r[k]:>7.1f}" for k in METRICS)
        var = f"{r['auroc_variance']:>10.3f}" if r["auroc_variance"] is not None else f"{'-':>10}"
        lines.append(f"{name:<16}{vals}{100 * (r['miou'] - base):>+8.1f}{r['auroc_entropy']:>9.3f}{var}")
    return "\n".join(lines)


def plot(results: dict[str, dict], counts: list[int], out_png: str | Path, title: str) -> None:
    """mIoU, BF and the errors' AUROC against the sample count, without and with flip; the one pass dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perception.core.fileio import atomic_write_bytes

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    panels = ((axes[0], "miou", "mIoU (%)", 100), (axes[1], "bf", "BF (%)", 100),
              (axes[2], "auroc_variance", "AUROC of the errors by uncertainty", 1))
    for ax, key, label, scale in panels:
        for suffix, colour in (("", "C0"), (" + flip", "C1")):
            ys = [scale * results[f"MC {k}{suffix}"][key] for k in counts]
            what = "variance" if key == "auroc_variance" else "dropout"
            ax.plot(counts, ys, marker="o", color=colour, label=f"MC {what}{suffix}")
            if key == "auroc_variance":  # the one pass has no variance: its softmax entropy instead
                ys = [results[f"MC {k}{suffix}"]["auroc_entropy"] for k in counts]
                ax.plot(counts, ys, marker="s", ls=":", color=colour, label=f"MC entropy{suffix}")
            one = results[f"one pass{suffix}"]
            ax.axhline(scale * one["auroc_entropy" if key == "auroc_variance" else key], color=colour, ls="--",
                       lw=1, label=f"one pass{suffix}" + (" (entropy)" if key == "auroc_variance" else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(k) for k in counts])
        ax.set_xlabel("MC samples")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perception.core.cli import fail

    if any(k < 1 for k in args.samples):
        return fail(PROG, "--samples must be >= 1")
    counts = sorted(set(args.samples))
    try:
        from perception.core.fileio import atomic_write_bytes
        from perception.core.zoo import find_model
        from perception.data.loading import open_dataset
        from perception.data.transforms import ToTensors
        from perception.models.bayesian import has_dropout
        from perception.models.io import load

        model = load(find_model(args.model))
        if not has_dropout(model):
            raise ValueError(f"{model.card.id} has no dropout layers: MC dropout needs a Bayesian model")
        groups = [g for g in args.groups.split(",") if g] if args.groups else None
        dataset = open_dataset(args.data, args.split, transform=ToTensors(), groups=groups)
        if list(dataset.classes) != list(model.card.classes):
            raise ValueError(f"dataset classes {list(dataset.classes)} differ from the model's {model.card.classes}")
        results = measure(model, dataset, counts, seed=args.seed, amp="bf16" if args.precision == "bf16" else "off",
                          progress=args.progress)
        where = f"{args.split}{' ' + args.groups if args.groups else ''}"
        print(f"{model.card.id} on {args.data} [{where}], {len(dataset)} images, {args.precision}, seed {args.seed}")
        print(format_rows(results))
        if args.json:
            doc = {"model": model.card.id, "data": str(args.data), "split": args.split, "groups": groups,
                   "images": len(dataset), "precision": args.precision, "seed": args.seed, "samples": counts,
                   "rows": {name: {k: r[k] for k in (*METRICS, *AUROCS, "per_class_iou")}
                            for name, r in results.items()}}
            atomic_write_bytes(args.json, (json.dumps(doc, indent=2) + "\n").encode())
        if args.plot:
            plot(results, counts, args.plot, f"{model.card.id} on {where} ({len(dataset)} images)")
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        return fail(PROG, str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
