#!/usr/bin/env python3
"""Prune a SegNet model folder's channels (perception.models.prune) into a new folder, ready to fine-tune:

    python tools/prune_model.py --model segnet_camvid --keep-ratio 0.5 --out runs/segnet_pruned50
    python tools/prune_model.py --model segnet_camvid --keep-ratio pool4=0.4,pool5=0.3 --out runs/p
    perception-train --model segnet --init-weights runs/segnet_pruned50 --distill-from segnet_camvid ...

Channels are ranked by their batch norms' |gamma| (``--importance random``: by chance, the control a
ranking must beat; tools/prune_screen.py compares them) and widths rounded up to multiples of 8. The new
folder's card records the widths (it loads, exports and runs like any model) and says it is pruned and not
yet fine-tuned; its metrics are the source's and are removed (nothing was measured).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perception.core.cli import fail  # noqa: E402


def parse_keep(text: str) -> float | dict[str, float]:
    """``0.5`` (every group) or ``pool4=0.4,pool5=0.3`` (those groups; the others keep every channel)."""
    try:
        if "=" not in text:
            return float(text)
        return {name.strip(): float(value) for name, value in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio or NAME=RATIO,..., got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a SegNet model folder or name")
    p.add_argument("--keep-ratio", required=True, type=parse_keep, help="0.5, or NAME=RATIO,... per channel group")
    p.add_argument("--multiple-of", type=int, default=8, help="round each width up to a multiple of this")
    p.add_argument("--importance", choices=("bn", "random"), default="bn",
                   help="how channels are ranked: batch-norm |gamma| (bn) or by chance (random, from --seed)")
    p.add_argument("--seed", type=int, default=0, help="the random ranking's seed")
    p.add_argument("--out", required=True, help="the new model folder (must not exist)")
    args = p.parse_args(argv)
    from perception.core.zoo import find_model
    from perception.models.io import load, save
    from perception.models.prune import IMPORTANCES, channel_groups, prune
    from perception.models.registry import model_config

    out = Path(args.out)
    if out.exists():
        return fail("prune_model", f"{out} exists: choose a new --out")
    try:
        model = load(find_model(args.model))
        pruned = prune(model, keep_ratio=args.keep_ratio, multiple_of=args.multiple_of,
                       importance=IMPORTANCES[args.importance](args.seed))
    except (FileNotFoundError, TypeError, ValueError) as e:
        return fail("prune_model", str(e))
    card = copy.deepcopy(model.card)
    card.architecture = model_config(pruned)
    card.id = f"{card.id}_pruned"
    card.metrics = {}
    card.extra["pruned_from"] = {"model": model.card.id, "keep_ratio": args.keep_ratio, "fine_tuned": False,
                                 "importance": args.importance}
    if args.importance == "random":
        card.extra["pruned_from"]["seed"] = args.seed
    save(pruned, out, card)
    before, after = (sum(q.numel() for q in m.parameters()) for m in (model, pruned))
    full = channel_groups(model)
    for name, group in channel_groups(pruned).items():
        print(f"{name:8s} {full[name].width:4d} -> {group.width:4d}")
    print(f"{out}: {after / 1e6:.2f}M parameters ({after / before:.0%} of {before / 1e6:.2f}M); fine-tune it with "
          f"perception-train --model {card.architecture['name']} --init-weights {out} --distill-from {args.model} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
