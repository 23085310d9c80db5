#!/usr/bin/env python3
"""How much of a SegNet each channel ranking keeps when the network is cut once, before any fine-tuning:
the full model's mIoU, then per ranking (``perception.models.prune.IMPORTANCES``) the pruned model's mIoU
as cut and after its batch-norm statistics are recomputed on training frames (the cut changes every
layer's input, so the stored statistics no longer fit). A quick screen (minutes) before hours of
fine-tuning; fine-tuning decides, and it can reverse the order (docs/training.md, "A smaller SegNet").

    python tools/prune_screen.py training_state/segnet_imagenet/segnet_imagenet_0006R0/final \\
        --data ../shared/camvid --split train+val --groups 0006R0 --keep-ratio 0.625 --every 3

Scores every ``--every``-th frame of the measured drive(s), fp32, without BF (it is slow and ranks the
same); the recalibration frames are drawn (``--seed``) from the split's other drives.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "prune_screen"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a SegNet model folder or a shipped model's name")
    p.add_argument("--data", required=True, help="dataset folder (CamVid or folder layout)")
    p.add_argument("--split", default="train+val", help="split ('+' joins splits)")
    p.add_argument("--groups", required=True, metavar="GROUP[,GROUP]",
                   help="the drive(s) measured, never used for recalibration (e.g. 0006R0)")
    p.add_argument("--keep-ratio", type=float, default=0.625, help="every group's share of channels kept")
    p.add_argument("--every", type=int, default=1, help="score every N-th frame of the measured drive(s)")
    p.add_argument("--calibration-frames", type=int, default=32, help="training frames for the batch norms")
    p.add_argument("--seed", type=int, default=0, help="the random ranking's and the frame draw's seed")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows here")
    return p


def screen(model, measured, calibration, *, keep_ratio: float, seed: int) -> dict[str, dict[str, float]]:
    """{"full": {"miou"}, ranking: {"miou_as_cut", "miou_recalibrated"}} on ``measured``."""
    import torch

    from perception.eval.evaluate import evaluate
    from perception.models.prune import IMPORTANCES, prune
    from perception.train.loop import recalibrate_batch_norm

    spec = model.card.input

    def miou(m) -> float:
        return float(evaluate(m, measured, spec, boundary=False, progress=False)["miou"])

    rows = {"full": {"miou": miou(model.eval())}}
    for name, ranking in IMPORTANCES.items():
        pruned = prune(model, keep_ratio=keep_ratio, importance=ranking(seed)).eval()
        as_cut = miou(pruned)
        recalibrate_batch_norm(pruned, calibration, spec, device=torch.device("cpu"), progress=False)
        rows[name] = {"miou_as_cut": as_cut, "miou_recalibrated": miou(pruned)}
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perception.core.cli import fail

    if not 0 < args.keep_ratio <= 1 or args.every < 1 or args.calibration_frames < 1:
        return fail(PROG, "--keep-ratio must be in (0, 1], --every and --calibration-frames >= 1")
    try:
        import numpy as np

        from perception.core.zoo import find_model
        from perception.data.loading import open_dataset
        from perception.data.transforms import ToTensors
        from perception.models.io import load

        model = load(find_model(args.model)).float()
        groups = [g for g in args.groups.split(",") if g]
        measured = open_dataset(args.data, args.split, transform=ToTensors(), groups=groups)
        measured = measured.with_pairs(measured.pairs[::args.every])
        rest = open_dataset(args.data, args.split, transform=ToTensors(), exclude_groups=groups)
        picks = np.random.default_rng(args.seed).choice(len(rest), min(args.calibration_frames, len(rest)), replace=False)
        calibration = rest.with_pairs([rest.pairs[i] for i in sorted(picks)])
        rows = screen(model, measured, calibration, keep_ratio=args.keep_ratio, seed=args.seed)
    except (FileNotFoundError, TypeError, ValueError) as e:
        return fail(PROG, str(e))
    print(f"{model.card.id}, keep {args.keep_ratio}, {len(measured)} frames of {args.split} [{args.groups}], "
          f"fp32; batch norms recalibrated on {len(calibration)} frames of the other drives")
    print(f"{'full model':12s} mIoU {rows['full']['miou']:.4f}")
    for name, row in rows.items():
        if name != "full":
            print(f"{name:12s} mIoU {row['miou_as_cut']:.4f} as cut, {row['miou_recalibrated']:.4f} recalibrated")
    if args.json:
        doc = {"model": model.card.id, "keep_ratio": args.keep_ratio, "frames": len(measured), "groups": groups,
               "calibration_frames": len(calibration), "seed": args.seed, "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
