#!/usr/bin/env python3
"""Run several ``perception-train`` runs side by side on one machine (a recipe comparison, or the
models of a release on one GPU), within one wall-clock budget, and tabulate what they scored.

    python tools/train_many.py configs/sweeps/heldout_0006R0.yaml --out runs/sweep --budget 420 -- --data ../shared/camvid

The sweep file holds ``common`` (flags given to every run) and ``runs`` (name -> its own flags)::

    common: [--data, ../shared/camvid, --train-split, train+val, --holdout, 0006R0, --seed, "0"]
    runs:
      basic_cpu: [--recipe, cpu, --model, segnet_basic]
      basic_robust: [--recipe, robust, --model, segnet_basic]

Every run gets ``--out OUT/<name>`` and, with ``--budget``, ``--time-budget`` (each run chooses its
number of epochs after its warmup so that it ends in time, and writes the choice to its config.yaml).
Runs still going at the hard deadline are interrupted (their last checkpoint stays resumable). The
table (``OUT/sweep.md``, ``OUT/sweep.json``) lists each run's epochs, time and final metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from perception.core.cli import fail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_many.py", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="YAML with 'common' and 'runs'")
    p.add_argument("--out", required=True, help="folder for the runs (one sub-folder each)")
    p.add_argument("--budget", type=float, help="wall-clock seconds for every run (passed as --time-budget)")
    p.add_argument("--grace", type=float, default=60.0, help="seconds past --budget before runs are interrupted")
    p.add_argument("--only", help="comma-separated run names to start (default: all)")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads per run")
    p.epilog = "Flags after '--' are added to every run (e.g. -- --data /data/camvid --num-workers 2)."
    return p


def _load_sweep(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    data = yaml.safe_load(path.read_text()) or {}
    common = [str(a) for a in data.get("common", [])]
    runs = {str(k): [str(a) for a in v] for k, v in (data.get("runs") or {}).items()}
    if not runs:
        raise ValueError(f"{path} defines no runs")
    return common, runs


def _metrics_row(run_dir: Path) -> dict:
    row: dict = {"run": run_dir.name}
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        row.update(epochs=s.get("epochs"), best_epoch=s.get("best_epoch"), seconds=s.get("training_seconds"))
        for split, m in (s.get("final_metrics") or {}).items():
            for k, short in (("global_accuracy", "G"), ("class_accuracy", "C"), ("miou", "mIoU"), ("bf", "BF")):
                row[f"{split} {short}"] = round(100 * m[k], 1)
    else:
        row["status"] = "unfinished"
    return row


def _table(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        common, runs = _load_sweep(Path(args.sweep))
    except (OSError, ValueError, yaml.YAMLError) as e:
        return fail("train_many.py", str(e))
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - set(runs)
        if unknown:
            return fail("train_many.py", f"unknown runs {sorted(unknown)}; the sweep has {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in wanted}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen] = {}
    started = time.time()
    for name, run_args in runs.items():
        cmd = [sys.executable, "-m", "perception.train.cli", *common, *run_args, *extra, "--out", str(out / name)]
        if args.budget:
            cmd += ["--time-budget", str(args.budget)]
        log = open(out / f"{name}.log", "w")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"started {name} (pid {procs[name].pid})", flush=True)
    deadline = started + args.budget + args.grace if args.budget else None
    interrupted: set[str] = set()
    try:
        while any(p.poll() is None for p in procs.values()):
            if deadline is not None and time.time() > deadline:
                for name, p in procs.items():
                    if p.poll() is None and name not in interrupted:
                        p.send_signal(signal.SIGINT)  # the trainer exits at once; --resume continues it
                        interrupted.add(name)
                if time.time() > deadline + 30:
                    for p in procs.values():
                        if p.poll() is None:
                            p.kill()
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs.values():
            p.wait()
    rows = []
    for name, p in procs.items():
        row = _metrics_row(out / name)
        row["rc"] = p.returncode
        rows.append(row)
        print(f"{name}: rc {p.returncode}" + (" (interrupted at the deadline)" if name in interrupted else ""))
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "sweep.md").write_text(_table(rows))
    print(_table(rows))
    print(f"wall time {time.time() - started:.0f} s")
    return 0 if all(p.returncode == 0 for p in procs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
