"""``perception-record``: save a node's streams: masks as PNG (class ids), overlays as a video,
stats as JSON lines and the latest info as JSON. Stops on Ctrl-C, ``--count``/``--duration``, or
when the node reports that its source has ended.

    perception-record tcp://127.0.0.1:5555 --out recording/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2

from perception.core.fileio import atomic_write_bytes

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-record", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--namespace", default="segnet")
    p.add_argument("--streams", default="mask,overlay,stats,info", help="comma list of streams to record")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate written into the overlay video")
    p.add_argument("--count", type=int, help="stop after N frames (mask or overlay messages)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--timeout", type=float, help="stop (status 1) if nothing arrives for this many seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perception.core.cli import stop_on_signals
    from perception.stream.client import Subscriber

    out = Path(args.out)
    (out / "mask").mkdir(parents=True, exist_ok=True)
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    topics = [f"{args.namespace}/{s}" for s in streams]
    stopped = stop_on_signals()
    writer = None
    # The container comes from the extension, so the temporary name must end in .mp4 too.
    video_tmp, video_path = out / ".overlay.partial.mp4", out / "overlay.mp4"
    frames = 0
    rc = 0
    t_end = None if args.duration is None else time.monotonic() + args.duration
    last = time.monotonic()
    stats_file = open(out / "stats.jsonl", "a") if "stats" in streams else None
    try:
        with Subscriber(args.endpoint, topics=topics) as sub:
            while not stopped.is_set() and (args.count is None or frames < args.count):
                if t_end is not None and time.monotonic() > t_end:
                    break
                msg = sub.recv(timeout=0.2)
                if msg is None:
                    if args.timeout is not None and time.monotonic() - last > args.timeout:
                        print(f"perception-record: nothing received for {args.timeout:g}s", file=sys.stderr)
                        rc = 1
                        break
                    continue
                last = time.monotonic()
                seq = msg.header["seq"]
                if msg.stream == "mask":
                    cv2.imwrite(str(out / "mask" / f"{seq:08d}.png"), msg.data)
                    frames += 1
                elif msg.stream == "overlay":
                    img = msg.data
                    if writer is None:
                        writer = cv2.VideoWriter(str(video_tmp), cv2.VideoWriter_fourcc(*"mp4v"), args.fps,
                                                 (img.shape[1], img.shape[0]))
                        if not writer.isOpened():
                            raise OSError(f"cannot write video {video_tmp}")
                    writer.write(img)
                    if "mask" not in streams:
                        frames += 1
                elif msg.stream == "stats":
                    assert stats_file is not None
                    stats_file.write(json.dumps({"seq": seq, "stamp_ns": msg.header["stamp_ns"], **msg.data}) + "\n")
                    stats_file.flush()
                    if msg.data.get("final"):
                        break  # the node has finished its source
                elif msg.stream == "info":
                    atomic_write_bytes(out / "info.json", json.dumps(msg.data, indent=2).encode())
    finally:
        if writer is not None:
            writer.release()
            os.replace(video_tmp, video_path)
        if stats_file is not None:
            stats_file.close()
    print(f"recorded {frames} frames to {out}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
