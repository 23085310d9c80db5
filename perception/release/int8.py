"""Ship a model folder's int8 graph: ``model_int8.onnx`` beside its weights, calibrated on frames of the
drives it trained on (never the drive it is measured on), its mIoU on that drive recorded in the card
next to fp32's (``<split>_int8``), which is what ``--precision auto`` decides on
(:meth:`perception.core.model_folder.ModelFolder.int8_verdict`).

    perception-ship int8 models/segnet_basic_camvid --data ../shared/camvid --split train+val --groups 0006R0 \\
        --twin models/segnet_basic_camvid/heldout_0006R0

``--twin``: for a model that trained on every drive, its held-out twin (same recipe, the drive left
out) gets the same treatment, and its fp32/int8 pair on frames it never saw is recorded beside the
model's own.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

from perception.core.card import (
    CARD_FILE, INT8_ONNX_FILE, ONNX_FILE, ModelCard, int8_metrics_key, load_card, metrics_key,
)
from perception.core.fileio import atomic_write_bytes
from perception.core.options import at_least, opt

__all__ = ["ShipInt8Options", "ship_int8", "ship_int8_folders", "calibration_pairs", "README_HEADING"]


@dataclass
class ShipInt8Options:
    """perception-ship int8's options (core.options)."""

    folder: str = opt(flag="folder", help="a model folder (models/<name>)")
    data: str = opt(help="dataset folder")
    groups: str = opt(metavar="GROUP[,GROUP]", help="the drive(s) measured, never calibrated on (e.g. 0006R0)")
    split: str = opt("train+val", help="the split measured")
    count: int = opt(32, check=at_least(1), help="calibration frames")
    calibration_split: str | None = opt(None, help="default: the split the model trained on")
    twin: str | None = opt(None, help="the held-out twin folder, for a model that trained on the measured drive")

README_HEADING = "## int8 (`model_int8.onnx`)"


def calibration_pairs(card: ModelCard, data: str, split: str, exclude: list[str], count: int) -> list:
    """``count`` (image, label) pairs spread evenly over ``split`` without the drives in ``exclude``
    and the frames the model was held out of (``card.training``'s ``holdout`` drives and ``holdout_list``)."""
    from perception.data.loading import open_dataset
    from perception.data.splits import split_pairs_by_group
    from perception.release.ship import held_out_names

    drives = sorted(set(exclude) | set(card.training.get("holdout") or []))
    pairs = open_dataset(data, split).pairs
    kept, _ = split_pairs_by_group(pairs, holdout=drives) if drives else (list(pairs), [])
    named = held_out_names(card)
    kept = [pair for pair in kept if Path(pair[0]).stem not in named]
    if not kept:
        raise ValueError(f"no calibration frames in {split} without {', '.join(drives)}")
    step = max(1, len(kept) // count)
    return list(kept[::step][:count])


def ship_int8(
    folder: str | Path, data: str, *, split: str, groups: list[str], count: int = 32, calibration_split: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export, calibrate, quantize (pools on the integers) and measure ``folder``'s int8 graph; writes
    ``model_int8.onnx`` and the card's ``<split>_int8`` metrics. Returns the record kept in
    ``card.extra["int8"]`` plus both metrics."""
    import cv2

    from perception.data.loading import open_dataset
    from perception.data.splits import group_of
    from perception.eval.card_metrics import card_metrics
    from perception.eval.scoring import evaluate_backend
    from perception.export.onnx import ExportOptions, export_onnx
    from perception.export.quantize import quantize_int8
    from perception.inference import load_backend

    folder = Path(folder)
    card = load_card(folder)
    calibration_split = calibration_split or card.training.get("train_split", "train")
    pairs = calibration_pairs(card, data, calibration_split, groups, count)
    frames = [f for f in (cv2.imread(str(img)) for img, _ in pairs) if f is not None]
    drives = sorted({group_of(Path(img).name) for img, _ in pairs})
    log(f"{card.id}: calibrating on {len(frames)} frames of {calibration_split} (drives {', '.join(drives)})")
    out = folder / INT8_ONNX_FILE
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(folder, Path(tmp) / ONNX_FILE, ExportOptions(unpool="onnx"))
        quantize_int8(fp32, out, frames, weight_bits=7)
    key = metrics_key(split, groups)
    ds = open_dataset(data, split, groups=groups)
    fp32_metrics = card.metrics.get(key)
    if not isinstance(fp32_metrics, dict) or "miou" not in fp32_metrics:
        from perception.eval.evaluate import evaluate
        from perception.data.transforms import ToTensors
        from perception.models.io import load

        fp32_metrics = card_metrics(evaluate(load(folder), open_dataset(data, split, groups=groups, transform=ToTensors()),
                                             card.input, progress=False, channels_last=True))
        card.metrics[key] = fp32_metrics
    with load_backend(out) as backend:
        int8_metrics = card_metrics(evaluate_backend(backend, ds, progress=True))
    card.metrics[int8_metrics_key(key)] = int8_metrics
    record = {
        "file": INT8_ONNX_FILE,
        "command": f"perception-ship int8 {folder} --data {data} --split {split} --groups {','.join(groups)} "
                   f"--count {count}",
        "calibration": f"{len(frames)} frames of {calibration_split} from drives {', '.join(drives)} (MinMax, u8 "
                       "activations, 7-bit per-channel weights, pools on the uint8 tensors)",
        # 7-bit weights: the same integers on every x86 CPU, VNNI or not (perception.core.cpu), so the
        # number below holds beyond the machine that measured it.
        "weight_bits": 7,
        "eval_command": f"perception-eval --model {out} --data {data} --split {split} --groups {','.join(groups)}",
        "machine": _machine_line(),
    }
    card.extra["int8"] = {**card.extra.get("int8", {}), **record}
    atomic_write_bytes(folder / CARD_FILE, (json.dumps(card.to_dict(), indent=2) + "\n").encode())
    log(f"{card.id}: {key} mIoU fp32 {100 * fp32_metrics['miou']:.2f}, int8 {100 * int8_metrics['miou']:.2f} "
        f"({100 * (int8_metrics['miou'] - fp32_metrics['miou']):+.2f} points); wrote {out} "
        f"({out.stat().st_size / 1e6:.1f} MB)")
    return {**record, "key": key, "fp32": fp32_metrics, "int8": int8_metrics}


def _machine_line() -> str:
    import onnxruntime

    from perception.train.loop import machine_description

    m = machine_description()
    return (f"{m.get('cpu')} ({m.get('cpu_count')} CPU cores, {m.get('cpu_isa')}), onnxruntime {onnxruntime.__version__}, "
            f"{date.today().isoformat()}")


def _readme_section(result: dict[str, Any], twin: dict[str, Any] | None, trained_on_measured: bool) -> str:
    def row(label: str, m: dict[str, Any]) -> str:
        return (f"| {label} | {100 * m['global_accuracy']:.1f} | {100 * m['class_accuracy']:.1f} | "
                f"{100 * m['miou']:.1f} | {100 * m['bf']:.1f} |")

    key = result["key"]
    lines = [README_HEADING, "",
             "ONNX Runtime on a CPU runs this graph by default (`--precision auto`) when its mIoU below is within 0.5 "
             "points of fp32's; `--precision fp32` keeps the fp32 graph. Its weights have 7 bits, so ONNX Runtime's "
             "u8 x s8 sums cannot saturate on x86 CPUs without VNNI: every CPU computes the integers that gave the "
             f"numbers below (measured on {result['machine']}).", "",
             "| graph | G | C | mIoU | BF |", "|---|---|---|---|---|",
             row(f"fp32, {key}" + (" (frames it trained on)" if trained_on_measured else ""), result["fp32"]),
             row(f"int8, {key}" + (" (frames it trained on)" if trained_on_measured else ""), result["int8"])]
    if twin is not None:
        lines += [row(f"fp32, {key}, the held-out twin (never trained on them)", twin["fp32"]),
                  row(f"int8, {key}, the held-out twin", twin["int8"])]
    lines += ["", f"Calibration: {result['calibration']}.", "", "```bash", result["command"], result["eval_command"],
              "```", ""]
    return "\n".join(lines)


def _update_readme(folder: Path, section: str) -> None:
    path = folder / "README.md"
    text = path.read_text() if path.is_file() else ""
    if README_HEADING in text:
        head, _, rest = text.partition(README_HEADING)
        after = rest.split("\n## ", 1)
        text = head + section + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_bytes(path, text.encode())


def ship_int8_folders(opts: ShipInt8Options, log: Callable[[str], None] = print) -> None:
    """:func:`ship_int8` on ``opts.folder`` (and its held-out twin first, where given), their READMEs updated."""
    groups = [g for g in opts.groups.split(",") if g]
    folder = Path(opts.folder)
    card = load_card(folder)
    twin = None
    if opts.twin:
        twin = ship_int8(opts.twin, opts.data, split=opts.split, groups=groups, count=opts.count,
                         calibration_split=opts.calibration_split, log=log)
        _update_readme(Path(opts.twin), _readme_section(twin, None, False))
    trained_on_measured = not set(groups) <= set(card.training.get("holdout") or [])
    result = ship_int8(folder, opts.data, split=opts.split, groups=groups, count=opts.count,
                       calibration_split=opts.calibration_split, log=log)
    if twin is not None:
        card = load_card(folder)
        card.extra["int8"]["heldout_twin"] = {"folder": str(opts.twin), "key": twin["key"],
                                              "fp32_miou": twin["fp32"]["miou"], "int8_miou": twin["int8"]["miou"]}
        atomic_write_bytes(folder / CARD_FILE, (json.dumps(card.to_dict(), indent=2) + "\n").encode())
    _update_readme(folder, _readme_section(result, twin, trained_on_measured))
