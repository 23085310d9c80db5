"""The README.md card of a shipped model folder: what it is, the measured rows, how to reproduce them and
how it trained. Written by :mod:`perception.release.ship` from what it measured; every number comes from
``rows``, ``mc`` and the card."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ReadmeInputs", "render_readme", "resume_lines", "option_changes", "PAPER_TEST"]

# SegNet paper, Table 1: SegNet-Basic on CamVid test, 360x480, median-frequency balancing. The Bayesian
# variant is compared with the same row (the SegNet paper has no Bayesian SegNet-Basic row).
_SEGNET_BASIC_TEST = {"global_accuracy": 0.827, "class_accuracy": 0.620, "miou": 0.477, "bf": 0.3578}
PAPER_TEST = {
    "segnet_basic": ("paper SegNet-Basic, **test** (Table 1)", _SEGNET_BASIC_TEST),
    "bayesian_segnet_basic": ("paper SegNet-Basic (not Bayesian), **test** (Table 1)", _SEGNET_BASIC_TEST),
}


@dataclass
class ReadmeInputs:
    """What the README is written from: the card and model as shipped, the measured rows ``(label, metrics,
    perception-eval flags or None)``, the MC-dropout measurement, the recipe's held-out run, the run's
    history, and where things are."""

    card: Any
    parameters: int
    rows: list
    split_name: str
    metrics: dict
    data: str
    status: str
    dest: Path
    run_dir: Path
    groups: list[str] | None = None
    trained_on: int = 0
    mc: dict | None = None
    mc_samples: int | None = None
    recipe_run: dict | None = None
    history: list | None = None


def _row(label: str, r: dict, bf_digits: int = 1) -> str:
    return (f"| {label} | {100 * r['global_accuracy']:.1f} | {100 * r['class_accuracy']:.1f} | "
            f"{100 * r['miou']:.1f} | {100 * r['bf']:.{bf_digits}f} |")


def _intro(x: ReadmeInputs) -> list[str]:
    t, arch = x.card.training, x.card.architecture["name"]
    selected = t.get("selection")
    return [
        f"# {x.card.id}",
        "",
        f"`{arch}` ({x.parameters / 1e6:.3f}M parameters) trained on the "
        f"{t.get('train_images', '?')} CamVid images of split `{t.get('train_split', 'train')}`"
        + (f" without drive(s) {', '.join(t['holdout'])}" if t.get("holdout") else "")
        + (f"; model selected on {selected} by mIoU." if selected else
           f" for {t.get('config', {}).get('epochs')} epochs with no selection split: the last epoch ships"
           + (f", the number of epochs chosen by the recipe's held-out run (`{x.recipe_run['model']}`, below)."
              if x.recipe_run else ".")),
        "",
        f"Status: **{x.status}**.",
        "",
    ]


def _measured(x: ReadmeInputs) -> list[str]:
    lines = ["## Measured (fp32, native resolution, void ignored)", "",
             "| split | G | C | mIoU | BF |", "|---|---|---|---|---|",
             *(_row(label, r) for label, r, _ in x.rows)]
    if x.mc is not None:
        lines.append(_row(f"{x.split_name}, MC dropout {x.mc_samples} samples (measured)", x.mc))
    if paper := PAPER_TEST.get(x.card.architecture["name"]):
        lines.append(_row(paper[0], paper[1], bf_digits=2))
    if x.groups and not x.trained_on:
        why = ["A held-out drive is a road the model never saw in training: the honest proxy for a new road.",
               "The test split is not in this repository and is evaluated independently."]
    elif x.trained_on and x.recipe_run:
        why = ["This model trained on every frame measured above, so its own rows show how it fits roads it has "
               "seen;", "the recipe's held-out run predicts a new road. The test split is not in this repository "
               "and is evaluated independently."]
    else:
        why = ["Val shares a driving sequence with train, so val scores run above test; the test split is not in",
               "this repository and is evaluated independently."]
    per_class = ", ".join(f"{c} {100 * v:.1f}" for c, v in zip(x.card.classes, x.metrics["per_class_accuracy"]))
    return [*lines, "", *why, "", f"Per-class accuracy on {x.split_name}: {per_class}", ""]


def _reproduce(x: ReadmeInputs) -> list[str]:
    t, arch = x.card.training, x.card.architecture["name"]
    selected, rr = t.get("selection"), x.recipe_run
    lines = ["## Reproduce", "", "```bash",
             *(f"perception-eval --model {x.dest} --data {x.data} {flags}" for _, _, flags in x.rows if flags),
             *([x.card.extra["eval_command"] + f" --mc-samples {x.mc_samples}"] if x.mc_samples else []),
             "```", "", "Training command (from the run that produced these weights):", "",
             "```bash", str(t.get("command")), "```", "", *resume_lines(t),
             f"Machine{' (the last stretch; all of them under Training time)' if t.get('stretches') else ''}: "
             f"{_machine(t.get('machine', {}))}; weights from epoch {t.get('epoch')} of "
             f"{t.get('config', {}).get('epochs')} " + (f"(best {selected} mIoU)" if selected else "(the last)")
             + f"; date {t.get('date')}.", "", *_sources(t)]
    if rr:
        lines += ["The recipe's held-out run (it chose this run's number of epochs):", "", "```bash",
                  str(rr["command"]), "```", "",
                  f"Machine: {_machine(rr['machine'])}; selected epoch {rr['epoch']} of {rr['epochs']}. Measured "
                  f"here in fp32 from its weights (`{rr['model']}`).", ""]
        if rr["architecture"] != arch:
            lines += [f"It trained `{rr['architecture']}`, not `{arch}`: no held-out run of this network with "
                      "this recipe exists, so its row estimates the recipe on a new road, not this network.", ""]
    return lines + ["Input: uint8 frames; the model card (`model.json`) gives the colour order, normalisation and",
                    "input size. Load with `perception.models.load(folder)`.", ""]


def _sources(t: dict) -> list[str]:
    """What the weights came from beyond the command: the pretrained encoder, the folder the run started
    from (and what that was pruned from), the teacher it was distilled from."""
    lines = []
    if enc := t.get("encoder"):
        where = ", ".join(f"{k} {enc[k]}" for k in ("package", "version", "file") if k in enc)
        lines.append(f"Encoder: {enc.get('source')} ({where}{'; via the start folder' if enc.get('via') else ''}); "
                     f"licence: {enc.get('licence', 'not recorded')}.")
    if start := t.get("init_from"):
        pruned = start.get("pruned_from")
        lines.append(f"Started from `{start['id']}` (weights sha256 {start['weights_sha256'][:12]}…)"
                     + (f", itself `{pruned['model']}` pruned to keep {pruned['keep_ratio']} of its channels"
                        f" (ranked by {pruned.get('importance', 'bn')})" if pruned else "") + ".")
    if teacher := t.get("teacher"):
        lines.append(f"Distilled from `{teacher['id']}` (weights sha256 {teacher['weights_sha256'][:12]}…).")
    return [*lines, ""] if lines else []


def _training_time(x: ReadmeInputs) -> list[str]:
    t = x.card.training
    if not x.history:
        return []
    head = f"Training time: {t['train_hours']:.2f} h for {len(x.history)} epochs (sum of epoch times, validation not included)"
    if stretches := t.get("stretches"):
        lines = [head + ", on more than one machine:", "",
                 *(f"- epochs {s['epochs'][0]}-{s['epochs'][1]}: {s['hours']:.2f} h on "
                   + (s["machine"] or "a machine the trainer did not record (see the notes)")
                   + f"; median epoch {s['median_epoch_seconds']:.0f} s" for s in stretches),
                 "", f"At each machine's median epoch, {t['idle_hours']:.2f} h (the sum also counts time the run "
                 "spent paused while the machine measured other things).", ""]
    else:
        lines = [head + ", on the machine above"
                 + (" while it trained other runs beside this one." if t.get("machine", {}).get("gpu") else "."),
                 f"Median epoch {t['median_epoch_seconds']:.0f} s, so {t['idle_hours']:.2f} h at that rate (the sum "
                 "also counts time the run spent paused while the machine measured other things).", ""]
    if "weights_dtype" in t:
        lines += [f"Weights stored as {t['weights_dtype']} (upcast to float32 on load); the numbers above are "
                  "measured from the stored weights.", ""]
    return lines


def render_readme(x: ReadmeInputs) -> str:
    """The model folder's README (copies the run's curves beside it)."""
    lines = [*_intro(x), *_measured(x), *_reproduce(x), *_training_time(x)]
    if x.card.extra.get("notes"):
        lines += ["Notes:", "", *(f"- {n}" for n in x.card.extra["notes"]), ""]
    if (x.run_dir / "curves.png").is_file():
        shutil.copyfile(x.run_dir / "curves.png", x.dest / "training_curves.png")
        lines += ["![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def resume_lines(training: dict) -> list[str]:
    """How the run was continued, claiming an exact resume only where the trainer recorded one and the same
    config only where every resume command asked for what the run started with."""
    commands = training.get("resumed_with")
    if not commands:
        return []
    resumes = training.get("resumes")
    changes = option_changes(training.get("command"), commands, resumes)
    same = "" if changes else " (same config)"
    if resumes is None:  # a run older than the record: say what is known
        head = f"The run was stopped and continued{same} with"
    elif not changes and not any(r["compact"] or r.get("optimizer_restarted") or r["selection_restarted"]
                                 for r in resumes):
        head = "The run was stopped and continued (same config, exact resume) with"
    else:
        compact = [resume_point(r) for r in resumes if r["compact"]]
        moments = [resume_point(r) for r in resumes if r.get("optimizer_restarted")]
        restarted = [r["after_epoch"] for r in resumes if r["selection_restarted"]]
        head = f"The run was stopped and continued{same} with the commands below"
        if compact:
            head += (f"; after epoch {', '.join(compact)} it continued from a compact resume state (weights "
                     "rounded once to half precision), so it is not bit-identical to an uninterrupted run")
        if moments:
            head += f"; the optimiser restarted its moments after epoch {', '.join(moments)} (the schedule continued)"
        if restarted:
            head += (f"; selection restarted after epoch {restarted[-1]}, so the weights are the best of epochs "
                     f"{restarted[-1] + 1}-{training.get('config', {}).get('epochs')}")
    if changes:
        head += ("; options changed on the way, so no single command reproduces it: " + "; ".join(changes)
                 + ("; a new `--epochs` gives the lr schedule its new length from where the run was"
                    if any("`--epochs" in c for c in changes) else ""))
    return [head + ":", "", "```bash", *commands, "```", ""]


def resume_point(resume: dict) -> str:
    """Where a resume took the run up: "34", or "38 and 23 batches" for a run stopped inside an epoch."""
    batches = resume.get("after_batch", 0)
    return f"{resume['after_epoch']}" + (f" and {batches} batch{'es' if batches != 1 else ''}" if batches else "")


def _options(command: str) -> dict[str, str]:
    """A command line's ``--option value...`` pairs (flags map to ""), less ``--resume``."""
    import shlex

    options: dict[str, str] = {}
    key = None
    for token in shlex.split(command):
        if token.startswith("--"):
            key, _, value = token.partition("=")
            options[key] = value
        elif key is not None:
            options[key] = f"{options[key]} {token}".strip()
    options.pop("--resume", None)
    return options


def _option_text(key: str, value: str) -> str:
    return f"`{key} {value}`" if value else f"`{key}`"  # a flag has no value


def option_changes(start: str | None, commands: list[str], resumes: list[dict] | None) -> list[str]:
    """What each resume command asked for that differs from the command before it (the start command for the
    first), e.g. "after epoch 34: `--epochs 80` (was `--epochs 120`)"."""
    if not start:
        return []
    changes, before = [], _options(start)
    for i, command in enumerate(commands):
        now = _options(command)
        diff = [(_option_text(k, now[k]) if k in now else f"no `{k}`")
                + (f" (was {_option_text(k, before[k])})" if k in before else "")
                for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if diff:
            when = f"after epoch {resume_point(resumes[i])}" if resumes and i < len(resumes) else f"resume {i + 1}"
            changes.append(f"{when}: {', '.join(diff)}")
        before = now
    return changes


def _machine(machine: dict) -> str:
    return (f"{machine.get('gpu', machine.get('cpu'))} ({machine.get('cpu_count')} CPU cores), "
            f"torch {machine.get('torch')}")
