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


def plot_history(history: str | Path, out_png: str | Path, *, selection: bool = True) -> Path:
    """Plot the run's history (``metrics.jsonl``) to ``out_png`` (written atomically).

    ``selection=False`` is a run without a selection split (``--val-split none``, a final run on all the
    data): it has no validation curves, so the figure is the train loss and the learning rate alone,
    titled so that nobody looks for the missing panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(history)
    panels = PANELS if selection else tuple(p for p in PANELS if not p[0].startswith("val_"))
    shape, size = ((2, 3), (13, 7)) if selection else ((1, 2), (11, 4))
    fig, axes = plt.subplots(*shape, figsize=size, constrained_layout=True, squeeze=False)
    if not selection:
        fig.suptitle("no selection split: the last epoch ships")
    for ax, (key, title) in zip(axes.ravel(), panels):
        # A log axis cannot show lr 0 (the cosine schedule's last epoch): those points are left out.
        pts = [(r["epoch"], r[key]) for r in rows if key in r and (key != "lr" or r[key] > 0)]
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
