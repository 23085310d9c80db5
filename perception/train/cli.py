"""``perception-train``: train a registered model on CamVid-layout or folder-layout data.

Single process:  perception-train --model segnet_basic --data ../shared/camvid --out runs/basic
Several GPUs:    torchrun --nproc_per_node 4 -m perception.train.cli --model segnet ...
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from perception.core.options import add_arguments, given
from perception.train.config import TrainConfig, build_config
from perception.core.cli import fail

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception-train",
        description="Train a SegNet-family model. Precedence: --recipe defaults < --config YAML < flags.",
    )
    p.add_argument("--config", help="YAML file of options (keys as in <out>/config.yaml)")
    add_arguments(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = given(args, TrainConfig)
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
        return fail("perception-train", str(e))
    except KeyboardInterrupt:
        print("perception-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
