"""Ship a trained model: copy its folder into models/<name>/, re-measure it, and write its README.md card.

    perception-ship model runs/segnet_basic_camvid/final models/segnet_basic_camvid --data ../shared/camvid

The metrics in model.json and README.md come from the evaluation this stage runs (fp32, native
resolution), the same one ``perception-eval`` prints, so the card can be reproduced with that command.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perception.core.card import metrics_key
from perception.core.fileio import atomic_write_bytes
from perception.core.options import at_least, opt
from perception.data.loading import open_dataset
from perception.data.transforms import ToTensors
from perception.eval.card_metrics import card_metrics
from perception.eval.evaluate import evaluate
from perception.models import load, save
from perception.release.readme import ReadmeInputs, render_readme

__all__ = ["ShipModelOptions", "ship_model", "held_out_names", "training_frames"]


@dataclass
class ShipModelOptions:
    """perception-ship model's options (core.options)."""

    source: str = opt(flag="source", help="trained model folder (e.g. runs/NAME/final)")
    dest: str = opt(flag="dest", help="models/<name>")
    data: str = opt(help="dataset folder")
    split: str = opt("val", help="selection split to measure; '+' joins splits (train+val)")
    groups: str | None = opt(None, metavar="GROUP[,GROUP]",
                             help="measure only these drives of --split (the drive held out of training, e.g. 0006R0)")
    weights_dtype: str = opt("float32", choices=("float32", "float16"),
                             help="store the weights at this precision (float16 halves a large model; loading upcasts)")
    status: str = opt("final", help="'final', or e.g. 'in progress (epoch 12 of 120)'")
    try_bn_recalibration: bool = opt(False, help="also recompute batch-norm statistics over the frames the model "
                                     "trained on (its training split less the drives it held out; no augmentation) and "
                                     "keep them if that scores a higher mIoU on --split (the selection split)")
    mc_samples: int | None = opt(None, check=at_least(1), help="also measure Monte-Carlo dropout (Bayesian models), seed 0")
    also: list[str] = opt(default_factory=list, repeat=True, metavar="SPLIT[:GROUP,...]",
                          help="also measure this split (e.g. val, or train+val:0006R0); repeatable")
    recipe_run: str | None = opt(None, metavar="MODEL_DIR",
                                 help="for a run trained without a selection split: the held-out run of the same recipe "
                                      "that chose its number of epochs; measured on --split/--groups and cited in the card")
    note: list[str] = opt(default_factory=list, repeat=True, metavar="TEXT",
                          help="a fact about the run the card cannot know (e.g. how it was resumed, for a run older "
                               "than the trainer's record of that); kept in model.json and shown in the README; repeatable")
    training_command: str | None = opt(None, help="the command that started the run, for a run whose checkpoints "
                                                  "predate recording it (the resume command the card holds then "
                                                  "moves to 'resumed_with')")


def _round_as_stored(model, weights_dtype: str) -> None:
    """Round the model's floating tensors as the shipped file will store them (load() upcasts them again),
    so that every number measured afterwards is the shipped model's."""
    if weights_dtype == "float32":
        return
    import torch

    from perception.models.io import cast_floating

    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in cast_floating(state, getattr(torch, weights_dtype)).items()})


def _measure(model, ds, card, **kw: Any) -> dict:
    # channels_last as perception-eval uses on a CPU: dropout masks are drawn in memory order, so the
    # MC numbers reproduce only with the same layout.
    return evaluate(model, ds, card.input, amp="off", progress=True, channels_last=True, **kw)


def _adopt_training_command(card, command: str | None) -> None:
    if command and command != card.training.get("command"):
        resumed = list(card.training.get("resumed_with", []))
        if card.training.get("command"):
            resumed.insert(0, card.training["command"])
        card.training["command"] = command
        card.training["resumed_with"] = resumed


def _try_bn_recalibration(model, m: dict, ds, frames, opts: ShipModelOptions):
    """The model with batch-norm statistics recomputed on its training frames, if that scores higher."""
    from perception.train.loop import recalibrate_batch_norm

    card = model.card
    recal = copy.deepcopy(model)
    recalibrate_batch_norm(recal, frames, card.input, device="cpu", amp="off", progress=True)
    _round_as_stored(recal, opts.weights_dtype)
    m_recal = _measure(recal, ds, card)
    keep = m_recal["miou"] > m["miou"]
    print(f"batch-norm recalibration: {opts.split} mIoU {m['miou']:.4f} -> {m_recal['miou']:.4f} "
          f"({'kept' if keep else 'not kept'})", file=sys.stderr)
    card.training["bn_recalibration_tried"] = {"miou_before": m["miou"], "miou_after": m_recal["miou"],
                                               "frames": len(frames)}
    if not keep:
        return model, m
    recal.card = card
    card.training["bn_recalibrated"] = True
    return recal, m_recal


def _also_rows(model, card, opts: ShipModelOptions) -> list:
    rows = []
    for spec in opts.also:
        also_split, _, also_groups = spec.partition(":")
        groups = [g for g in also_groups.split(",") if g] or None
        ds = open_dataset(opts.data, also_split, transform=ToTensors(), groups=groups)
        m = _measure(model, ds, card)
        key = metrics_key(also_split, groups)
        card.metrics[key] = card_metrics(m)
        rows.append((_row_label(key, _frames_trained_on(card, opts.data, ds), len(ds)), m, _split_flags(also_split, groups)))
    return rows


def _load_recipe_run(ds, split_name: str, opts: ShipModelOptions):
    """The recipe's held-out run, which must not have trained on the measured frames (checked before the
    minutes of evaluation)."""
    recipe_model = load(opts.recipe_run)
    if trained := _frames_trained_on(recipe_model.card, opts.data, ds):
        raise ValueError(f"--recipe-run {opts.recipe_run} trained on {trained} frames of {split_name}; "
                         "it must be the run that held them out")
    return recipe_model


def _recipe_run(recipe_model, card, ds, split_name: str, opts: ShipModelOptions) -> tuple[dict, tuple]:
    """The recipe's held-out run measured on the same frames, and its row."""
    rt = recipe_model.card.training
    rm = _measure(recipe_model, ds, recipe_model.card)
    arch, recipe_arch = card.architecture["name"], recipe_model.card.architecture["name"]
    run = {"model": str(opts.recipe_run), "architecture": recipe_arch, "command": rt.get("command"),
           "machine": rt.get("machine"), "train_images": rt.get("train_images"), "epoch": rt.get("epoch"),
           "epochs": rt.get("config", {}).get("epochs"), "metrics": {split_name: card_metrics(rm)}}
    # A held-out run of another architecture (e.g. the plain network for its Bayesian twin) is evidence
    # for the recipe, not a measurement of this network: the row names what it measured.
    other_arch = f", `{recipe_arch}`" if recipe_arch != arch else ""
    row = (f"{split_name}, the recipe's held-out run{other_arch} ({rt.get('train_images')} images without "
           f"these frames, epoch {rt.get('epoch')} of {rt.get('config', {}).get('epochs')})", rm, None)
    return run, row


def _run_history(card, run_dir: Path) -> list:
    """The run's epochs (``metrics.jsonl`` beside ``final/``), with its hours recorded on the card: in all, and
    per stretch of epochs on one machine (a run resumed elsewhere trains at another rate)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    card.training["train_hours"] = round(sum(r.get("epoch_seconds", 0.0) for r in history) / 3600, 3)
    stretches = machine_stretches(history)
    if stretches:
        seconds = sorted(r["epoch_seconds"] for r in history if "epoch_seconds" in r)
        card.training["median_epoch_seconds"] = round(seconds[len(seconds) // 2], 1)
        # Each stretch at its own machine's median rate: what the epochs cost without the pauses.
        card.training["idle_hours"] = round(sum(s["median_epoch_seconds"] * s["epochs_count"] for s in stretches) / 3600, 3)
        if len(stretches) > 1:
            card.training["stretches"] = stretches
    return history


def machine_stretches(history: list) -> list[dict]:
    """Consecutive epochs trained on one machine (each record's ``machine``, None where the trainer did not
    record it), each with its epochs, hours and median epoch time: which machine trained which epochs."""
    groups: list[list[dict]] = []
    for r in (r for r in history if "epoch_seconds" in r):
        if groups and groups[-1][-1].get("machine") == r.get("machine"):
            groups[-1].append(r)
        else:
            groups.append([r])
    stretches = []
    for g in groups:
        seconds = sorted(r["epoch_seconds"] for r in g)
        stretches.append({"epochs": [g[0]["epoch"], g[-1]["epoch"]], "epochs_count": len(g),
                          "machine": g[0].get("machine"), "hours": round(sum(seconds) / 3600, 3),
                          "median_epoch_seconds": round(seconds[len(seconds) // 2], 1)})
    return stretches


def ship_model(opts: ShipModelOptions) -> dict:
    """Measure ``opts.source`` and write it to ``opts.dest`` with its card and README; returns the metrics on
    the selection split. Raises ValueError with a one-line reason for what cannot be shipped."""
    model = load(opts.source)
    card = model.card
    _round_as_stored(model, opts.weights_dtype)
    dest = Path(opts.dest)
    card.id = dest.name
    _adopt_training_command(card, opts.training_command)
    groups = [g for g in opts.groups.split(",") if g] if opts.groups else None
    ds = open_dataset(opts.data, opts.split, transform=ToTensors(), groups=groups)
    split_name, split_flags = metrics_key(opts.split, groups), _split_flags(opts.split, groups)
    recal_frames = training_frames(card, opts.data) if opts.try_bn_recalibration else None
    if opts.try_bn_recalibration and recal_frames is None:  # before the evaluations, which take minutes
        raise ValueError("--try-bn-recalibration: the card does not say which split the model trained on")
    recipe_model = _load_recipe_run(ds, split_name, opts) if opts.recipe_run else None
    m = _measure(model, ds, card)
    if opts.try_bn_recalibration:
        model, m = _try_bn_recalibration(model, m, ds, recal_frames, opts)
    card.metrics = {split_name: card_metrics(m)}
    # Each row: (label, metrics, eval flags). A split the run trained on says so: its numbers measure
    # how well the model fits frames it has seen, not how it does on a new road.
    trained_on = _frames_trained_on(card, opts.data, ds)
    rows = [(_row_label(split_name, trained_on, len(ds)), m, split_flags), *_also_rows(model, card, opts)]
    recipe_run = None
    if recipe_model is not None:
        recipe_run, row = _recipe_run(recipe_model, card, ds, split_name, opts)
        card.training["recipe_run"] = recipe_run
        rows.append(row)
    mc = _measure(model, ds, card, mc_samples=opts.mc_samples, seed=0) if opts.mc_samples else None
    if mc is not None:
        card.metrics[f"{split_name}_mc{opts.mc_samples}"] = card_metrics(mc)
    card.extra["status"] = opts.status
    if opts.note:
        card.extra["notes"] = list(opts.note)
    card.extra["eval_command"] = f"perception-eval --model {dest} --data {opts.data} {split_flags}"
    run_dir = Path(opts.source).resolve().parent  # runs/NAME/final -> runs/NAME (history, curves)
    history = _run_history(card, run_dir)
    import torch

    save(model, dest, card, weights_dtype=None if opts.weights_dtype == "float32" else getattr(torch, opts.weights_dtype))
    readme = render_readme(ReadmeInputs(
        card=card, parameters=sum(p.numel() for p in model.parameters()), rows=rows, split_name=split_name, metrics=m,
        data=opts.data, status=opts.status, dest=dest, run_dir=run_dir, groups=groups, trained_on=trained_on, mc=mc,
        mc_samples=opts.mc_samples, recipe_run=recipe_run, history=history))
    atomic_write_bytes(dest / "README.md", readme.encode())
    return {k: m[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")}


def _split_flags(split: str, groups: list[str] | None) -> str:
    return f"--split {split}" + (f" --groups {','.join(groups)}" if groups else "")


def training_frames(card, data: str):
    """The frames the card's run trained on (its training split less the drives and the name list it held
    out), without augmentation; None where the card does not name its training split."""
    t = card.training
    if not t.get("train_split"):
        return None
    train_set = open_dataset(data, t["train_split"], transform=ToTensors(), exclude_groups=t.get("holdout") or None,
                             group_pattern=(t.get("config") or {}).get("group_pattern"))
    held = held_out_names(card)
    if held:
        train_set = train_set.with_pairs([pair for pair in train_set.pairs if pair[0].stem not in held])
    return train_set


def held_out_names(card) -> set[str]:
    """The file stems of the frames the card's run held out by name (``--holdout-list``), where that list
    is still at hand; drives held out by group are in ``card.training["holdout"]``."""
    listed = card.training.get("holdout_list")
    if not listed or not Path(listed).is_file():
        return set()
    from perception.data.splits import read_name_list

    return {Path(n).stem for n in read_name_list(Path(listed))}


def _frames_trained_on(card, data: str, measured) -> int:
    """How many frames of ``measured`` the card's run trained on (matched by file stem, so a JPEG copy of
    the data counts as the same frames)."""
    train_set = training_frames(card, data)
    if train_set is None:
        return 0
    trained = {img.stem for img, _ in train_set.pairs}
    return sum(img.stem in trained for img, _ in measured.pairs)


def _row_label(key: str, trained_on: int, total: int) -> str:
    if not trained_on:
        return f"{key} (measured; never trained on)"
    return f"{key} (measured; {trained_on} of {total} frames were in training)"

