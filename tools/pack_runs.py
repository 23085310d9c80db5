#!/usr/bin/env python3
"""Pack the results of ``tools/train_many.py`` for a size-limited trip off a machine: every run's
logs, metrics, curves and config, and the final model folders with fp16 weights, in priority order.

    python tools/pack_runs.py runs/sweep packed/ --first segnet_robust --rank-by holdout_0006R0 \\
        --max-mib 62 --chunk-mib 15 --rest rest.tar

Writes ``packed/part.tar.NN`` chunks (``cat part.tar.* | tar x`` restores them). Model folders that do
not fit under ``--max-mib`` go to ``--rest`` (a tar to fetch separately). Weights are stored as fp16
(``perception.models.load`` upcasts them); each model.json says so.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

SMALL_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "curves.png")


def _model_dir(run: Path) -> Path | None:
    for sub in ("final", "best"):
        if (run / sub / "model.json").is_file():
            return run / sub
    return None


def _fp16_folder_bytes(folder: Path) -> tuple[bytes, bytes]:
    from safetensors.torch import load_file, save

    import torch
    from perception.models.io import cast_floating

    state = cast_floating(load_file(str(folder / "weights.safetensors")), torch.float16)
    card = json.loads((folder / "model.json").read_text())
    card.setdefault("training", {})["weights_dtype"] = "float16"
    weights = save(state, metadata={"format": "pt", "model_id": str(card.get("id", ""))})
    return weights, (json.dumps(card, indent=2) + "\n").encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pack_runs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", help="folder of runs (train_many.py --out)")
    p.add_argument("dest", help="folder for part.tar.NN")
    p.add_argument("--first", default="", help="comma-separated runs whose models go first")
    p.add_argument("--rank-by", help="metrics key (e.g. holdout_0006R0): other models follow by its mIoU, best first")
    p.add_argument("--max-mib", type=float, default=62.0)
    p.add_argument("--chunk-mib", type=float, default=15.0)
    p.add_argument("--rest", help="tar for the model folders that do not fit")
    args = p.parse_args(argv)
    runs_dir, dest = Path(args.runs), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    runs = sorted(d for d in runs_dir.iterdir() if d.is_dir())

    def score(run: Path) -> float:
        s = run / "summary.json"
        if not s.is_file() or not args.rank_by:
            return -1.0
        return json.loads(s.read_text()).get("final_metrics", {}).get(args.rank_by, {}).get("miou", -1.0)

    first = [r for name in args.first.split(",") if name for r in runs if r.name == name]
    order = first + sorted((r for r in runs if r not in first), key=score, reverse=True)
    buf = io.BytesIO()
    rest = tarfile.open(args.rest, "w") if args.rest else None
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for log in sorted(runs_dir.glob("*.log")) + sorted(runs_dir.glob("sweep.*")):
            _add(tar, log.name, log.read_bytes())
        for run in runs:
            for f in SMALL_FILES:
                if (run / f).is_file():
                    _add(tar, f"{run.name}/{f}", (run / f).read_bytes())
        limit = int(args.max_mib * 2**20)
        for run in order:
            folder = _model_dir(run)
            if folder is None:
                continue
            weights, card = _fp16_folder_bytes(folder)
            target = tar if buf.tell() + len(weights) + len(card) + 10_000 < limit else rest
            if target is None:
                print(f"{run.name}: does not fit, left out", file=sys.stderr)
                continue
            _add(target, f"{run.name}/model/weights.safetensors", weights)
            _add(target, f"{run.name}/model/model.json", card)
            print(f"{run.name}: {'packed' if target is tar else 'to --rest'} ({len(weights) / 2**20:.1f} MiB)")
    if rest is not None:
        rest.close()
    data, chunk = buf.getvalue(), int(args.chunk_mib * 2**20)
    for i in range(0, len(data), chunk):
        (dest / f"part.tar.{i // chunk:02d}").write_bytes(data[i : i + chunk])
    print(f"{len(data) / 2**20:.1f} MiB in {(len(data) + chunk - 1) // chunk} chunks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
