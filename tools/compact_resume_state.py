#!/usr/bin/env python3
"""Write a compact copy of a training run's resume state, for committing a large run between working
stretches (a git host refuses files over 100 MB; SegNet's full checkpoint is ~350 MB).

    python tools/compact_resume_state.py runs/segnet_heldout/last.pt training_state/segnet_heldout/last.pt

Weights become fp16 (``--dtype``) and the optimiser moments are dropped unless ``--keep-optimizer``.
``perception-train --out RUN --resume`` reads it like any checkpoint and says what it restarts; the run
folder's own ``last.pt`` on the machine that trained it stays the exact resume point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perception.core.cli import fail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run's last.pt")
    p.add_argument("dest", help="where to write the compact state (atomically)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--keep-optimizer", action="store_true", help="keep the optimiser moments (cast to --dtype)")
    p.add_argument("--max-mb", type=float, default=95.0, help="refuse to write a file larger than this (MB)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import io

    import torch

    from perception.core.fileio import atomic_write_bytes
    from perception.train.checkpoint import compact_checkpoint, load_checkpoint

    try:
        ck = load_checkpoint(args.source)
    except (FileNotFoundError, ValueError) as e:
        return fail("compact_resume_state", str(e))
    small = compact_checkpoint(ck, dtype=getattr(torch, args.dtype), keep_optimizer=args.keep_optimizer)
    buf = io.BytesIO()
    torch.save(small, buf)
    size_mb = buf.tell() / 1e6
    if size_mb > args.max_mb:
        return fail("compact_resume_state", f"{size_mb:.1f} MB is over --max-mb {args.max_mb:g}"
                    + ("" if not args.keep_optimizer else " (drop --keep-optimizer)"), status=1)
    Path(args.dest).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.dest, buf.getvalue())
    state = small["state"]
    where = (f"in epoch {state['epoch'] + 1} after batch {state['batch']}" if state.get("batch")
             else f"after epoch {state['epoch']}")
    print(f"{args.dest}: {size_mb:.1f} MB (from {Path(args.source).stat().st_size / 1e6:.1f} MB), {where}, "
          f"{small['compact']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
