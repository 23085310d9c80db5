"""Ship a trained model: copy its folder into models/<name>/, re-measure it, and write its README.md card.

    python tools/ship_model.py runs/segnet_basic_camvid/final models/segnet_basic_camvid --data ../shared/camvid

The metrics in model.json and README.md come from the evaluation this script runs (fp32, native
resolution), the same one ``perception-eval`` prints, so the card can be reproduced with that command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


from perception.core.cli import fail
from perception.core.fileio import atomic_write_bytes
from perception.data.loading import open_dataset
from perception.data.transforms import ToTensors
from perception.eval.card_metrics import card_metrics, metrics_key
from perception.eval.evaluate import evaluate
from perception.models import load, save

# SegNet paper, Table 1: SegNet-Basic on CamVid test, 360x480, median-frequency balancing. The Bayesian
# variant is compared with the same row (the SegNet paper has no Bayesian SegNet-Basic row).
_SEGNET_BASIC_TEST = {"global_accuracy": 0.827, "class_accuracy": 0.620, "miou": 0.477, "bf": 0.3578}
PAPER_TEST = {
    "segnet_basic": ("paper SegNet-Basic, **test** (Table 1)", _SEGNET_BASIC_TEST),
    "bayesian_segnet_basic": ("paper SegNet-Basic (not Bayesian), **test** (Table 1)", _SEGNET_BASIC_TEST),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ship_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="trained model folder (e.g. runs/NAME/final)")
    p.add_argument("dest", help="models/<name>")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", help="selection split to measure; '+' joins splits (train+val)")
    p.add_argument("--groups", metavar="GROUP[,GROUP]",
                   help="measure only these drives of --split (the drive held out of training, e.g. 0006R0)")
    p.add_argument("--weights-dtype", choices=("float32", "float16"), default="float32",
                   help="store the weights at this precision (float16 halves a large model; loading upcasts)")
    p.add_argument("--status", default="final", help="'final', or e.g. 'in progress (epoch 12 of 120)'")
    p.add_argument("--try-bn-recalibration", action="store_true",
                   help="also recompute batch-norm statistics over the frames the model trained on (its training "
                   "split less the drives it held out; no augmentation) and keep them if that scores a higher mIoU "
                   "on --split (the selection split)")
    p.add_argument("--mc-samples", type=int, help="also measure Monte-Carlo dropout (Bayesian models), seed 0")
    p.add_argument("--also", action="append", default=[], metavar="SPLIT[:GROUP,...]",
                   help="also measure this split (e.g. val, or train+val:0006R0); repeatable")
    p.add_argument("--recipe-run", metavar="MODEL_DIR",
                   help="for a run trained without a selection split: the held-out run of the same recipe that "
                   "chose its number of epochs; measured on --split/--groups and cited in the card")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a fact about the run the card cannot know (e.g. how it was resumed, for a run older than "
                   "the trainer's record of that); kept in model.json and shown in the README; repeatable")
    p.add_argument(
        "--training-command",
        help="the command that started the run, for a run whose checkpoints predate recording it "
        "(the resume command the card holds then moves to 'resumed_with')",
    )
    return p


def _round_as_stored(model, weights_dtype: str) -> None:
    """Round the model's floating tensors as the shipped file will store them (load() upcasts them again),
    so that every number measured afterwards is the shipped model's."""
    if weights_dtype == "float32":
        return
    import torch

    from perception.models.io import cast_floating

    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in cast_floating(state, getattr(torch, weights_dtype)).items()})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = load(args.source)
    card = model.card
    _round_as_stored(model, args.weights_dtype)
    dest = Path(args.dest)
    card.id = dest.name
    if args.training_command and args.training_command != card.training.get("command"):
        resumed = list(card.training.get("resumed_with", []))
        if card.training.get("command"):
            resumed.insert(0, card.training["command"])
        card.training["command"] = args.training_command
        card.training["resumed_with"] = resumed
    groups = [g for g in args.groups.split(",") if g] if args.groups else None
    ds = open_dataset(args.data, args.split, transform=ToTensors(), groups=groups)
    split_name = metrics_key(args.split, groups)
    split_flags = _split_flags(args.split, groups)
    # channels_last as perception-eval uses on a CPU: dropout masks are drawn in memory order, so the
    # MC numbers reproduce only with the same layout.
    recal_frames = _training_frames(card, args.data) if args.try_bn_recalibration else None
    if args.try_bn_recalibration and recal_frames is None:  # before the evaluations, which take minutes
        return fail("ship_model", "--try-bn-recalibration: the card does not say which split the model trained on")
    m = evaluate(model, ds, card.input, amp="off", progress=True, channels_last=True)
    if args.try_bn_recalibration:
        import copy

        from perception.train.loop import recalibrate_batch_norm

        recal = copy.deepcopy(model)
        recalibrate_batch_norm(recal, recal_frames, card.input, device="cpu", amp="off", progress=True)
        _round_as_stored(recal, args.weights_dtype)
        m_recal = evaluate(recal, ds, card.input, amp="off", progress=True, channels_last=True)
        keep = m_recal["miou"] > m["miou"]
        print(f"batch-norm recalibration: {args.split} mIoU {m['miou']:.4f} -> {m_recal['miou']:.4f} "
              f"({'kept' if keep else 'not kept'})", file=sys.stderr)
        card.training["bn_recalibration_tried"] = {"miou_before": m["miou"], "miou_after": m_recal["miou"],
                                                   "frames": len(recal_frames)}
        if keep:
            model, m = recal, m_recal
            card.training["bn_recalibrated"] = True
    card.metrics = {split_name: card_metrics(m)}
    # Each row: (label, metrics, eval flags). A split the run trained on says so: its numbers measure
    # how well the model fits frames it has seen, not how it does on a new road.
    trained_on = _frames_trained_on(card, args.data, ds)
    rows = [(_row_label(split_name, trained_on, len(ds)), m, split_flags)]
    for spec in args.also:
        also_split, _, also_groups = spec.partition(":")
        also_groups = [g for g in also_groups.split(",") if g] or None
        also_ds = open_dataset(args.data, also_split, transform=ToTensors(), groups=also_groups)
        also_m = evaluate(model, also_ds, card.input, amp="off", progress=True, channels_last=True)
        key = metrics_key(also_split, also_groups)
        card.metrics[key] = card_metrics(also_m)
        rows.append((_row_label(key, _frames_trained_on(card, args.data, also_ds), len(also_ds)), also_m,
                     _split_flags(also_split, also_groups)))
    arch = card.architecture["name"]
    recipe_run = None
    if args.recipe_run:
        recipe_model = load(args.recipe_run)
        rt = recipe_model.card.training
        recipe_trained_on = _frames_trained_on(recipe_model.card, args.data, ds)
        if recipe_trained_on:
            raise SystemExit(f"error: --recipe-run {args.recipe_run} trained on {recipe_trained_on} frames of {split_name}; "
                             "it must be the run that held them out")
        rm = evaluate(recipe_model, ds, recipe_model.card.input, amp="off", progress=True, channels_last=True)
        recipe_arch = recipe_model.card.architecture["name"]
        recipe_run = {"model": str(args.recipe_run), "architecture": recipe_arch, "command": rt.get("command"),
                      "machine": rt.get("machine"), "train_images": rt.get("train_images"), "epoch": rt.get("epoch"),
                      "epochs": rt.get("config", {}).get("epochs"), "metrics": {split_name: card_metrics(rm)}}
        card.training["recipe_run"] = recipe_run
        # A held-out run of another architecture (e.g. the plain network for its Bayesian twin) is evidence
        # for the recipe, not a measurement of this network: the row names what it measured.
        other_arch = f", `{recipe_arch}`" if recipe_arch != arch else ""
        rows.append((f"{split_name}, the recipe's held-out run{other_arch} ({rt.get('train_images')} images without "
                     f"these frames, epoch {rt.get('epoch')} of {rt.get('config', {}).get('epochs')})", rm, None))
    mc = None
    if args.mc_samples:
        mc = evaluate(model, ds, card.input, amp="off", mc_samples=args.mc_samples, seed=0, progress=True,
                      channels_last=True)
        card.metrics[f"{split_name}_mc{args.mc_samples}"] = card_metrics(mc)
    card.extra["status"] = args.status
    if args.note:
        card.extra["notes"] = list(args.note)
    card.extra["eval_command"] = f"perception-eval --model {dest} --data {args.data} {split_flags}"
    run_dir = Path(args.source).resolve().parent  # runs/NAME/final -> runs/NAME (history, curves)
    history = []
    if (run_dir / "metrics.jsonl").is_file():
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        card.training["train_hours"] = round(sum(r.get("epoch_seconds", 0.0) for r in history) / 3600, 3)
        seconds = sorted(r["epoch_seconds"] for r in history if "epoch_seconds" in r)
        if seconds:
            card.training["median_epoch_seconds"] = round(seconds[len(seconds) // 2], 1)
            card.training["idle_hours"] = round(seconds[len(seconds) // 2] * len(history) / 3600, 3)
    import torch

    save(model, dest, card, weights_dtype=None if args.weights_dtype == "float32" else getattr(torch, args.weights_dtype))
    readme = render_readme(card=card, model=model, args=args, rows=rows, mc=mc, recipe_run=recipe_run, history=history,
                           run_dir=run_dir, dest=dest, split_name=split_name, m=m, groups=groups, trained_on=trained_on)
    atomic_write_bytes(dest / "README.md", readme.encode())
    print(json.dumps({k: m[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")}, indent=2))
    return 0


def render_readme(
    *, card, model, args: argparse.Namespace, rows: list, mc: dict | None, recipe_run: dict | None, history: list,
    run_dir: Path, dest: Path, split_name: str, m: dict, groups: list[str] | None, trained_on: int,
) -> str:
    """The model folder's README: what it is, the measured rows, how to reproduce them, how it trained
    (copies the run's curves beside it)."""
    arch = card.architecture["name"]
    paper = PAPER_TEST.get(arch)
    t = card.training
    selected = t.get("selection")
    lines = [
        f"# {card.id}",
        "",
        f"`{arch}` ({sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters) trained on the "
        f"{t.get('train_images', '?')} CamVid images of split `{t.get('train_split', 'train')}`"
        + (f" without drive(s) {', '.join(t['holdout'])}" if t.get("holdout") else "")
        + (f"; model selected on {selected} by mIoU." if selected else
           f" for {t.get('config', {}).get('epochs')} epochs with no selection split: the last epoch ships"
           + (f", the number of epochs chosen by the recipe's held-out run (`{recipe_run['model']}`, below)."
              if recipe_run else ".")),
        "",
        f"Status: **{args.status}**.",
        "",
        "## Measured (fp32, native resolution, void ignored)",
        "",
        "| split | G | C | mIoU | BF |",
        "|---|---|---|---|---|",
        *(f"| {label} | {100 * r['global_accuracy']:.1f} | {100 * r['class_accuracy']:.1f} | "
          f"{100 * r['miou']:.1f} | {100 * r['bf']:.1f} |" for label, r, _ in rows),
    ]
    if mc is not None:
        lines.append(
            f"| {split_name}, MC dropout {args.mc_samples} samples (measured) | {100 * mc['global_accuracy']:.1f} | "
            f"{100 * mc['class_accuracy']:.1f} | {100 * mc['miou']:.1f} | {100 * mc['bf']:.1f} |"
        )
    if paper:
        label, ref = paper
        lines.append(
            f"| {label} | {100 * ref['global_accuracy']:.1f} | {100 * ref['class_accuracy']:.1f} | "
            f"{100 * ref['miou']:.1f} | {100 * ref['bf']:.2f} |"
        )
    lines += [
        "",
        *(["A held-out drive is a road the model never saw in training: the honest proxy for a new road.",
            "The test split is not in this repository and is evaluated independently."] if groups and not trained_on
          else ["This model trained on every frame measured above, so its own rows show how it fits roads it has "
                "seen;", "the recipe's held-out run predicts a new road. The test split is not in this repository "
                "and is evaluated independently."] if trained_on and recipe_run
          else ["Val shares a driving sequence with train, so val scores run above test; the test split is not in",
                "this repository and is evaluated independently."]),
        "",
        "Per-class accuracy on " + split_name + ": "
        + ", ".join(f"{c} {100 * v:.1f}" for c, v in zip(card.classes, m["per_class_accuracy"])),
        "",
        "## Reproduce",
        "",
        "```bash",
        *(f"perception-eval --model {dest} --data {args.data} {flags}" for _, _, flags in rows if flags),
        *([card.extra["eval_command"] + f" --mc-samples {args.mc_samples}"] if args.mc_samples else []),
        "```",
        "",
        "Training command (from the run that produced these weights):",
        "",
        "```bash",
        str(t.get("command")),
        "```",
        "",
        *resume_lines(t),
        f"Machine: {_machine(t.get('machine', {}))}; "
        f"weights from epoch {t.get('epoch')} of {t.get('config', {}).get('epochs')} "
        + (f"(best {selected} mIoU)" if selected else "(the last)") + f"; date {t.get('date')}.",
        "",
        *(
            ["The recipe's held-out run (it chose this run's number of epochs):",
             "", "```bash", str(recipe_run["command"]), "```", "",
             f"Machine: {_machine(recipe_run['machine'])}; selected epoch {recipe_run['epoch']} of "
             f"{recipe_run['epochs']}. Measured here in fp32 from its weights (`{recipe_run['model']}`).", "",
             *([f"It trained `{recipe_run['architecture']}`, not `{arch}`: no held-out run of this network with "
                "this recipe exists, so its row estimates the recipe on a new road, not this network.", ""]
               if recipe_run["architecture"] != arch else [])]
            if recipe_run else []
        ),
        "Input: uint8 frames; the model card (`model.json`) gives the colour order, normalisation and",
        "input size. Load with `perception.models.load(folder)`.",
        "",
    ]
    if history:
        lines += [f"Training time: {card.training['train_hours']:.2f} h for {len(history)} epochs (sum of epoch "
                  "times, validation not included), on the machine above"
                  + (" while it trained other runs beside this one." if t.get("machine", {}).get("gpu") else "."),
                  f"Median epoch {card.training['median_epoch_seconds']:.0f} s, so {card.training['idle_hours']:.2f} h "
                  "at that rate (the sum also counts time the run spent paused while the machine measured other "
                  "things).", ""]
        if "weights_dtype" in card.training:
            lines += [f"Weights stored as {card.training['weights_dtype']} (upcast to float32 on load); the "
                      "numbers above are measured from the stored weights.", ""]
    if card.extra.get("notes"):
        lines += ["Notes:", "", *(f"- {n}" for n in card.extra["notes"]), ""]
    if (run_dir / "curves.png").is_file():
        shutil.copyfile(run_dir / "curves.png", dest / "training_curves.png")
        lines += ["![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def resume_lines(training: dict) -> list[str]:
    """How the run was continued, claiming an exact resume only where the trainer recorded one."""
    commands = training.get("resumed_with")
    if not commands:
        return []
    resumes = training.get("resumes")
    if resumes is None:  # a run older than the record: say what is known
        head = "The run was stopped and continued (same config) with:"
    elif not any(r["compact"] or r.get("optimizer_restarted") or r["selection_restarted"] for r in resumes):
        head = "The run was stopped and continued (same config, exact resume) with:"
    else:
        compact = [str(r["after_epoch"]) for r in resumes if r["compact"]]
        moments = [str(r["after_epoch"]) for r in resumes if r.get("optimizer_restarted")]
        restarted = [r["after_epoch"] for r in resumes if r["selection_restarted"]]
        head = "The run was stopped and continued (same config) with the commands below"
        if compact:
            head += (f"; after epoch {', '.join(compact)} it continued from a compact resume state (weights "
                     "rounded once to half precision), so it is not bit-identical to an uninterrupted run")
        if moments:
            head += f"; the optimiser restarted its moments after epoch {', '.join(moments)} (the schedule continued)"
        if restarted:
            head += (f"; selection restarted after epoch {restarted[-1]}, so the weights are the best of epochs "
                     f"{restarted[-1] + 1}-{training.get('config', {}).get('epochs')}")
        head += ":"
    return [head, "", "```bash", *commands, "```", ""]


def _split_flags(split: str, groups: list[str] | None) -> str:
    return f"--split {split}" + (f" --groups {','.join(groups)}" if groups else "")


def _machine(machine: dict) -> str:
    return (f"{machine.get('gpu', machine.get('cpu'))} ({machine.get('cpu_count')} CPU cores), "
            f"torch {machine.get('torch')}")


def _training_frames(card, data: str):
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
    train_set = _training_frames(card, data)
    if train_set is None:
        return 0
    trained = {img.stem for img, _ in train_set.pairs}
    return sum(img.stem in trained for img, _ in measured.pairs)


def _row_label(key: str, trained_on: int, total: int) -> str:
    if not trained_on:
        return f"{key} (measured; never trained on)"
    return f"{key} (measured; {trained_on} of {total} frames were in training)"


if __name__ == "__main__":
    sys.exit(main())
