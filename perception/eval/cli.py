"""``perception-eval``: the paper's metrics for a model folder on a dataset split, at native resolution."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from perception.core.cli import fail
from perception.core.fileio import atomic_write_bytes
from perception.core.options import add_arguments, at_least, opt, parse_into
from perception.core.choices import TTA_MODES, DEVICE_HELP, parse_device

__all__ = ["EvalOptions", "build_parser", "parse_options", "main", "format_table"]


def _to_tensors():
    from perception.data.transforms import ToTensors

    return ToTensors()


@dataclass
class EvalOptions:
    """perception-eval's options: its flags come from these fields (core.options)."""

    model: str = opt(help="a model by name (perception-models lists them), a model folder, or what the node deploys: "
                          "an .onnx (fp32, fp16, int8) or a TensorRT .engine, evaluated through the node's backend")
    data: str = opt(help="dataset folder (CamVid or folder layout)")
    split: str = opt("val", help="split to evaluate (test, val, ...); '+' joins splits (train+val)")
    groups: str | None = opt(None, metavar="GROUP[,GROUP]",
                             help="only the frames of these drives, e.g. 0006R0 (a drive held out of training)")
    group_pattern: str | None = opt(None, metavar="REGEX",
                                    help="regex whose first group is an image's drive (default '^(.+?)_': CamVid's prefix)")
    tta: str = opt("none", choices=TTA_MODES,
                   help="test-time augmentation: 'flip' averages the logits of the image and its mirror")
    json: str | None = opt(None, metavar="FILE", help="write the metrics here as JSON")
    save_predictions: str | None = opt(None, metavar="DIR", help="one uint8 label PNG per image (class ids), same name")
    mc_samples: int | None = opt(None, check=at_least(1), help="Monte-Carlo dropout samples (Bayesian models)")
    seed: int = opt(0, help="seed of the MC dropout masks")
    precision: str = opt("fp32", choices=("fp32", "bf16"), help="PyTorch precision for model folders")
    device: str = opt("auto", parse=parse_device, help=DEVICE_HELP)
    progress: bool = opt(True, help="a progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-eval", description=__doc__)
    add_arguments(p, EvalOptions)
    return p


def parse_options(argv: list[str] | None = None) -> EvalOptions:
    """The command line as :class:`EvalOptions` (argparse exits with status 2 on a bad or missing flag)."""
    p = build_parser()
    try:
        return parse_into(p, EvalOptions, argv)
    except ValueError as e:
        p.error(str(e))  # exits with status 2, argparse's one line
        raise  # unreachable


def format_table(result: dict[str, Any], classes: list[str]) -> str:
    """Paper-style table: per-class accuracy for each class, then G, C, mIoU, BF (percent)."""
    names = [c[:10] for c in classes] + ["G", "C", "mIoU", "BF"]
    vals = list(result["per_class_accuracy"]) + [result[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")]
    width = max(7, max(len(n) for n in names) + 1)
    head = "".join(f"{n:>{width}}" for n in names)
    row = "".join(f"{100 * v:>{width}.1f}" for v in vals)
    return head + "\n" + row


def _open_model(args: EvalOptions):
    """(backend or None, model-like with ``.card``): an exported model through the node's backend, a folder
    in PyTorch (the model itself, as measured on its card)."""
    from perception.core.cli import print_notes
    from perception.core.zoo import find_model
    from perception.inference.resolve import resolve

    folder_only = args.mc_samples or args.tta != "none" or args.precision != "fp32"
    if folder_only and not find_model(args.model).is_dir():
        raise ValueError("--mc-samples, --tta and --precision apply to model folders; an exported model "
                         "runs as it was exported (export with --tta flip for flip TTA)")
    resolution = resolve(args.model, device=args.device, tta=args.tta, reference=True,
                         precision="auto" if args.precision == "fp32" else args.precision)
    args.model, args.device = str(resolution.path), resolution.device
    print_notes(resolution.notes)
    if resolution.backend != "torch":
        backend = resolution.load()
        return backend, backend
    from perception.models.bayesian import has_dropout
    from perception.models.io import load

    model = load(resolution.path, map_location=args.device)
    if args.mc_samples and not has_dropout(model):
        raise ValueError(f"--mc-samples needs a model with dropout; {model.card.architecture['name']} has none")
    return None, model


def _prediction_saver(save_dir: Path | None, dataset):
    """A callback writing each prediction as a uint8 label PNG named after its image, or None."""
    if save_dir is None:
        return None
    save_dir.mkdir(parents=True, exist_ok=True)
    names = [p[0].name for p in dataset.pairs]

    def save_prediction(i: int, labels) -> None:
        path = save_dir / (Path(names[i]).stem + ".png")
        ok, buf = cv2.imencode(".png", labels)
        if not ok:
            raise OSError(f"could not encode {path}")
        atomic_write_bytes(path, buf.tobytes())

    return save_prediction


def _evaluate(args: EvalOptions, backend, model, dataset) -> dict[str, Any]:
    on_prediction = _prediction_saver(Path(args.save_predictions) if args.save_predictions else None, dataset)
    if backend is not None:
        from perception.eval.scoring import evaluate_backend

        return evaluate_backend(backend, dataset, progress=args.progress, on_prediction=on_prediction)
    import torch

    from perception.eval.evaluate import evaluate

    return evaluate(model, dataset, model.card.input, amp="bf16" if args.precision == "bf16" else "off",
                    mc_samples=args.mc_samples, seed=args.seed, progress=args.progress, tta=args.tta,
                    on_prediction=on_prediction, channels_last=torch.device(args.device).type == "cpu")


def _json_doc(args: EvalOptions, model, backend, groups, dataset, result: dict[str, Any]) -> dict[str, Any]:
    classes = list(dataset.classes)
    return {
        "model": model.card.id, "model_path": str(args.model), "backend": backend.name if backend is not None else "torch",
        "data": str(args.data), "split": args.split, **({"groups": groups} if groups else {}), "images": len(dataset),
        "tta": args.tta, "mc_samples": args.mc_samples, **({"seed": args.seed} if args.mc_samples else {}),
        "precision": args.precision, **{k: result[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")},
        "per_class": {c: {"accuracy": result["per_class_accuracy"][i], "iou": result["per_class_iou"][i],
                          "bf": result["per_class_bf"][i]} for i, c in enumerate(classes)},
        "confusion": result["confusion"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_options(argv)
    groups = [g for g in args.groups.split(",") if g] if args.groups else None
    try:
        from perception.data.loading import open_dataset

        backend, model = _open_model(args)
        dataset = open_dataset(args.data, args.split, transform=_to_tensors() if backend is None else None, groups=groups,
                               group_pattern=args.group_pattern)
        if list(dataset.classes) != list(model.card.classes):
            raise ValueError(f"dataset classes {list(dataset.classes)} differ from the model's {model.card.classes}")
        result = _evaluate(args, backend, model, dataset)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        return fail("perception-eval", str(e))
    print(f"{model.card.id} on {args.data} [{args.split}{' ' + args.groups if args.groups else ''}], {len(dataset)} images"
          + (f", {args.mc_samples} MC samples" if args.mc_samples else "") + (", flip TTA" if args.tta == "flip" else ""))
    print(format_table(result, list(dataset.classes)))
    if args.json:
        doc = _json_doc(args, model, backend, groups, dataset, result)
        atomic_write_bytes(args.json, (json.dumps(doc, indent=2) + "\n").encode())
    return 0

if __name__ == "__main__":
    sys.exit(main())
