"""``perception-predict``: colour masks and alpha overlays (with a class legend) for images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataclasses import dataclass

import cv2

from perception.core.cli import fail
from perception.core.fileio import list_images
from perception.core.choices import DEVICE_HELP, UNCERTAINTY_MEASURES, parse_device
from perception.core.options import add_arguments, in_range, opt, parse_into
from perception.inference import BACKEND_CHOICES

__all__ = ["PredictOptions", "build_parser", "main", "expand_images"]



@dataclass
class PredictOptions:
    """perception-predict's options: its arguments come from these fields (core.options)."""

    images: list[str] = opt(flag="images", nargs="+", help="image files, folders or glob patterns")
    out: str = opt(help="output folder")
    model: str | None = opt(None, help="a model by name (perception-models lists them), a model folder, .onnx or "
                                       ".engine (default: the shipped default model)")
    backend: str = opt("auto", choices=BACKEND_CHOICES,
                       help="as perception-node chooses: an engine -> TensorRT, a folder -> its int8 or fp32 graph (or "
                            "PyTorch for MC-dropout uncertainty), an .onnx -> ONNX Runtime")
    alpha: float = opt(0.5, check=in_range(0, 1), help="overlay opacity of the colour mask")
    legend: bool = opt(True, help="draw the legend of the classes present on the overlay")
    save_labels: bool = opt(False, help="also write the uint8 class-id PNGs")
    uncertainty: bool = opt(False, help="uncertainty heat maps (Bayesian models)")
    uncertainty_measure: str = opt("entropy", choices=UNCERTAINTY_MEASURES,
                                   help="what the heat maps show: the MC samples' predictive entropy or the "
                                        "paper's mean class variance")
    device: str = opt("auto", parse=parse_device, help=DEVICE_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-predict", description=__doc__)
    add_arguments(p, PredictOptions)
    return p


def expand_images(items: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() or any(ch in item for ch in "*?["):
            out += list_images(item)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image, folder or pattern: {item}")
    if not out:
        raise FileNotFoundError(f"no images found in {items}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_into(parser, PredictOptions, argv)
    except ValueError as e:
        parser.error(str(e))  # exits with status 2, argparse's one line
    from perception.core.cli import print_notes
    from perception.inference.resolve import resolve
    from perception.inference.postprocess import classes_present, colorize, draw_legend, overlay, palette_lut, uncertainty_to_bgr

    try:
        images = expand_images(args.images)
        resolution = resolve(args.model, backend=args.backend, device=args.device,
                             uncertainty_measure=args.uncertainty_measure)
        print_notes(resolution.notes)
        backend = resolution.load()
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        return fail("perception-predict", str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lut = palette_lut(backend.palette)
    failed = 0
    from tqdm.auto import tqdm

    for path in tqdm(images, desc="predict", unit="img"):
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            print(f"perception-predict: skipping {path}: not a readable image", file=sys.stderr)
            failed += 1
            continue
        res = backend.infer(frame[None], uncertainty=args.uncertainty)
        labels = res.labels[0]
        color = colorize(labels, lut)
        over = overlay(frame, color, args.alpha)
        if args.legend:
            draw_legend(over, backend.classes, backend.palette, present=classes_present(labels, len(backend.classes)),
                        in_place=True)
        stem = path.stem
        cv2.imwrite(str(out / f"{stem}_mask.png"), color)
        cv2.imwrite(str(out / f"{stem}_overlay.png"), over)
        if args.save_labels:
            cv2.imwrite(str(out / f"{stem}_labels.png"), labels)
        if args.uncertainty and res.uncertainty is not None:
            cv2.imwrite(str(out / f"{stem}_uncertainty.png"), uncertainty_to_bgr(res.uncertainty[0]))
    print(f"wrote {len(images) - failed} predictions to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
