#!/usr/bin/env python3
"""Make a demo video from a folder of frames (e.g. the CamVid val sequence), in name order.

    python tools/make_demo_video.py ../shared/camvid/val demo.mp4 --fps 10
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2

from perception.core.fileio import list_images



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("frames", help="folder of images")
    p.add_argument("out", help="output video (.mp4 or .avi)")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--max-frames", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.frames)
    paths = list_images(folder)
    if not paths:
        print(f"make_demo_video: no images in {folder}", file=sys.stderr)
        return 2
    paths = paths[: args.max_frames]
    first = cv2.imread(str(paths[0]))
    h, w = first.shape[:2]
    out = Path(args.out)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")  # container from the extension
    fourcc = cv2.VideoWriter_fourcc(*("mp4v" if out.suffix.lower() == ".mp4" else "MJPG"))
    writer = cv2.VideoWriter(str(tmp), fourcc, args.fps, (w, h))
    if not writer.isOpened():
        print(f"make_demo_video: cannot write {out}", file=sys.stderr)
        return 1
    for p in paths:
        img = cv2.imread(str(p))
        if img is None:
            continue
        writer.write(img if img.shape[:2] == (h, w) else cv2.resize(img, (w, h)))
    writer.release()
    os.replace(tmp, out)
    print(f"wrote {out}: {len(paths)} frames, {w}x{h} at {args.fps:g} fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
