"""``perception-train``: train a registered model on CamVid-layout or folder-layout data.

Single process:  perception-train --model segnet_basic --data ../shared/camvid --out runs/basic
Several GPUs:    torchrun --nproc_per_node 4 -m perception.train.cli --model segnet ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from perception.models.registry import list_models
from perception.train.config import RECIPES, build_config, parse_hw

__all__ = ["build_parser", "main"]


def _hw(text: str):
    try:
        return parse_hw(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.75,1.5), got {text!r}") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception-train",
        description="Train a SegNet-family model. Precedence: --recipe defaults < --config YAML < flags.",
    )
    p.add_argument("--model", choices=list_models(), help="architecture (default segnet_basic)")
    p.add_argument("--data", help="dataset folder (CamVid layout: train.txt/val.txt, or <split>/images + labels)")
    p.add_argument("--out", help="output folder for checkpoints, metrics, curves and model folders")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="default settings: 'paper' (faithful), 'cpu' (fast on CPU), 'robust' (cpu + changes of scale, light and sensor, for roads never seen)")
    p.add_argument("--config", help="YAML file of options (keys as in <out>/config.yaml)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--crop", type=_hw, help="random crop HxW, or 'none' for whole images")
    p.add_argument("--scale", type=_range, help="random scale range LO,HI")
    p.add_argument("--color-jitter", type=float, help="brightness/contrast/saturation factors in [1-J, 1+J]")
    p.add_argument("--gamma", type=_range, help="random gamma range LO,HI (e.g. 0.5,2.0)")
    p.add_argument("--hue", type=float, help="random hue shift in degrees")
    p.add_argument("--blur", type=float, help="probability of a Gaussian blur")
    p.add_argument("--noise", type=float, help="max std of Gaussian pixel noise (0-255 units)")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("sgd", "adamw"))
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=("constant", "cosine", "poly"))
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--class-weights", choices=("median", "reference", "none"))
    p.add_argument("--class-weight-power", type=float, help="raise the class weights to this power (0.5 softens)")
    p.add_argument("--loss-normalization", choices=("valid_pixels", "weights"))
    p.add_argument("--amp", choices=("bf16", "fp16", "off"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--val-every", type=int, help="validate every N epochs")
    p.add_argument("--train-split", help="training split; '+' joins splits (e.g. train+val)")
    p.add_argument("--val-split", help="split used for model selection (default val); with --holdout it is only "
                                       "reported, where none of its images were trained on; 'none' for no split")
    p.add_argument("--holdout", metavar="GROUP[,GROUP]",
                   help="hold these drives (groups of frames, see --group-pattern) out of the training split and "
                        "select on them, e.g. 0006R0")
    p.add_argument("--holdout-list", metavar="FILE", help="hold out the images named in FILE (one per line) instead")
    p.add_argument("--group-pattern", metavar="REGEX",
                   help="regex whose first group is an image's drive (default '^(.+?)_': CamVid's prefix)")
    p.add_argument("--time-budget", dest="time_budget_s", type=float, metavar="SECONDS",
                   help="after the warmup epochs, cut --epochs so the run ends within SECONDS (recorded in config.yaml)")
    p.add_argument("--bn-recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute batch-norm statistics over the training set at the end")
    p.add_argument("--encoder-weights", help="local torchvision vgg16_bn weights to initialise SegNet's encoder")
    p.add_argument("--init-weights", metavar="MODEL_DIR",
                   help="start from a model folder's weights (fine-tuning, e.g. another dataset or a Bayesian "
                        "variant of the same architecture); tensors whose names or shapes differ are skipped")
    p.add_argument("--model-kwargs", type=json.loads, help='JSON of extra builder arguments, e.g. \'{"lrn": true}\'')
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-iters-per-epoch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


_FLAG_TO_KEY = {"val_split": "val_split", "config": None, "resume": None, "no_progress": None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if _FLAG_TO_KEY.get(k, k) is not None}
    if isinstance(overrides.get("val_split"), str) and overrides["val_split"].lower() == "none":
        overrides["val_split"] = ""
    config_file = args.config
    if args.resume and args.out and config_file is None and (Path(args.out) / "config.yaml").is_file():
        # Resuming: the run's own effective config is the base, flags still override.
        config_file = str(Path(args.out) / "config.yaml")
    argv_list = sys.argv[1:] if argv is None else argv
    command = "perception-train " + " ".join(shlex.quote(a) for a in argv_list)
    try:
        from perception.train.loop import train

        cfg = build_config(yaml_file=config_file, overrides=overrides)
        train(cfg, resume=args.resume, command=command, progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"perception-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perception-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
