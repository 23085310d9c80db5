"""Training curves as a PNG, refreshed after every epoch."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["plot_history", "read_history"]

PANELS = (
    ("train_loss", "train loss"),
    ("val_global_accuracy", "val global accuracy (G)"),
    ("val_class_accuracy", "val class average (C)"),
    ("val_miou", "val mIoU"),
    ("val_bf", "val boundary F1 (BF)"),
    ("lr", "learning rate"),
)


def read_history(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: skip it
    return rows


def plot_history(history: str | Path, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(history)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.ravel(), PANELS):
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
            best = [r["epoch"] for r in rows if r.get("best")]
            if key.startswith("val_") and best:
                b = best[-1]
                ax.axvline(b, color="grey", ls=":", lw=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.set_yscale("log")
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
