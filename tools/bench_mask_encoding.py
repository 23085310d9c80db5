"""Bytes and cost of a mask on the wire: mono8 against PNG at several zlib levels, on the shipped
model's masks of real CamVid frames, at 360x480 and 720x960 (the node sends masks at the source's
resolution: a 720x960 camera gets its 360x480 prediction upscaled, nearest).

    python tools/bench_mask_encoding.py ../shared/camvid/val --frames 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="a folder of frames (e.g. ../shared/camvid/val)")
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "segnet_basic_camvid"))
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5, help="timing repetitions per mask (median kept)")
    return p


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perception.inference.resolve import resolve_backend
    from perception.stream.protocol import PNG_LEVEL

    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg"))[: args.frames]
    if not paths:
        print(f"error: no images in {args.images}", file=sys.stderr)
        return 2
    backend = resolve_backend(args.model, backend="onnxruntime")
    masks = [backend.infer(cv2.imread(str(p))[None]).labels[0] for p in paths]
    print(f"{len(masks)} masks of {paths[0].parent} by {backend.card.id} (default PNG level {PNG_LEVEL})")
    print(f"{'size':>8} {'encoding':>10} {'KiB/mask':>9} {'x smaller':>9} {'encode ms':>9} {'decode ms':>9}")
    for scale in (1, 2):
        scaled = [cv2.resize(m, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) for m in masks]
        h, w = scaled[0].shape
        raw = float(np.mean([m.nbytes for m in scaled]))
        print(f"{h}x{w:<4} {'mono8':>10} {raw / 1024:9.1f} {1.0:9.1f} {0.0:9.2f} {0.0:9.2f}")
        for level in (1, 3, 6, 9):
            sizes, enc_ms, dec_ms = [], [], []
            for m in scaled:
                buf = cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, level])[1]
                assert np.array_equal(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), m), "PNG must be lossless"
                sizes.append(buf.nbytes)
                enc_ms.append(_median_ms(lambda: cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, level]),
                                         args.repeat))
                dec_ms.append(_median_ms(lambda: cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), args.repeat))
            size = float(np.mean(sizes))
            print(f"{h}x{w:<4} {'png ' + str(level):>10} {size / 1024:9.1f} {raw / size:9.1f} "
                  f"{np.mean(enc_ms):9.2f} {np.mean(dec_ms):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
