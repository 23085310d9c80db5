"""``perception-train``: train a registered model on CamVid-layout or folder-layout data.

Single process:  perception-train --model segnet_basic --data ../shared/camvid --out runs/basic
Several GPUs:    torchrun --nproc_per_node 4 -m perception.train.cli --model segnet ...

Ctrl-C or SIGTERM stops after the current step and checkpoints there (exit 130 / 143); the same command with
--resume continues as if never stopped.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from perception.core.options import add_arguments, given
from perception.train.config import TrainConfig, build_config
from perception.core.cli import fail

__all__ = ["build_parser", "main", "StopOnSignal"]


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


class StopOnSignal:
    """While entered, SIGINT and SIGTERM ask the trainer to stop after its current step and checkpoint there
    (``train(stop=...)`` calls this object); a second signal aborts at once (KeyboardInterrupt). The handlers
    before are restored on exit. Outside the main thread (no signals there) it never asks to stop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._before: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"perception-train: {signal.Signals(signum).name}: stopping after this step and saving where the "
              "run is (send it again to abort at once)", file=sys.stderr, flush=True)


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
        from perception.train.loop import TrainingStopped, train

        cfg = build_config(yaml_file=config_file, overrides=overrides)
        with StopOnSignal() as stop:
            try:
                train(cfg, resume=args.resume, command=command, progress=not args.no_progress, stop=stop)
            except TrainingStopped as e:
                print(f"perception-train: {e}", file=sys.stderr, flush=True)
                return 128 + stop.signum
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        return fail("perception-train", str(e))
    except KeyboardInterrupt:  # a second signal: the last checkpoint written is the resume point
        print("perception-train: interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
