"""``perception-record``: save a node's streams. Stops on Ctrl-C, ``--count``/``--duration``, or when
the node reports that its source has ended.

    perception-record tcp://127.0.0.1:5555 --out recording/                  # PNG masks + overlay.mp4
    perception-record tcp://127.0.0.1:5555 --out bag/ --format mcap          # a ROS 2 bag (MCAP)
    perception-record --recover bag/                                         # after a recorder was killed

``--format files`` (default): masks as PNG (class ids), overlays as an H.264 mp4 written in
one-second fragments (a recorder killed outright loses at most the last second), stats as JSON lines,
the latest info as JSON. ``--format mcap``: a ROS 2 bag folder (metadata.yaml + .mcap, CDR) that
``ros2 bag``, rosbags and Foxglove open; see perception/stream/rosbag.py for the topics and types.
A recording that ends in an error (``--timeout``, a failed CURVE handshake) before any message arrived
removes the --out folder it created; one stopped by ``--duration`` or Ctrl-C keeps its (empty) output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from dataclasses import dataclass

from perception.core.cli import fail
from perception.core.options import add_arguments, opt, parse_into, positive
from perception.stream.client import NODE_GONE_S
from perception.stream.protocol import json_text
from perception.stream.security import ClientKeyOptions

__all__ = ["RecordOptions", "build_parser", "main"]

DEFAULT_STREAMS = "mask,overlay,stats,info"



@dataclass(kw_only=True)
class RecordOptions(ClientKeyOptions):
    """perception-record's options: its arguments come from these fields (core.options)."""

    endpoint: str | None = opt(None, flag="endpoint", nargs="?", help="the node's endpoint, e.g. tcp://127.0.0.1:5555")
    out: str | None = opt(None, help="output folder (new, or empty)")
    format: str = opt("files", choices=("files", "mcap"),
                      help="files: PNG masks + overlay.mp4 (default); mcap: a ROS 2 bag folder")
    namespace: str = opt("segnet", help="topic prefix of the node")
    camera: list[str] | None = opt(None, repeat=True, metavar="NAME",
                                   help="a node running several cameras: record this one (repeatable; topics "
                                        "<namespace>/<camera>/<stream>; files go to OUT/<camera>/, a bag holds them all)")
    streams: str | None = opt(None, help="comma list of streams to record (default: mask,overlay,stats,info; "
                                         "mcap also takes color_mask and uncertainty)")
    fps: float = opt(30.0, check=positive, help="frame rate written into the overlay video (files)")
    max_bag_duration: float | None = opt(None, check=positive, metavar="SECONDS",
                                         help="mcap: start a new .mcap file every this many seconds, so a killed "
                                              "recorder loses at most the file in progress (as ros2 bag record "
                                              "--max-bag-duration)")
    chunk_size: int = opt(1 << 20, check=positive, metavar="BYTES",
                          help="mcap: bytes of messages per compressed chunk (default 1 MiB); a killed recorder loses "
                               "the chunk it was filling, so smaller chunks lose less")
    recover: str | None = opt(None, metavar="BAG",
                              help="make a bag readable after its recorder was killed (SIGKILL, power loss), then exit")
    count: int | None = opt(None, check=positive, metavar="N", help="stop after N frames (mask or overlay messages)")
    duration: float | None = opt(None, check=positive, metavar="SECONDS", help="stop after this many seconds")
    timeout: float | None = opt(None, check=positive, metavar="SECONDS",
                                help="stop (status 1) if nothing arrives for this many seconds")
    gone_after: float = opt(NODE_GONE_S, check=positive, metavar="SECONDS",
                            help=f"stop (status 1) when the node has been disconnected this long without its final "
                                 f"stats: killed, or its machine lost (default {NODE_GONE_S:g}; a node restarted "
                                 "sooner is followed on)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-record", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, RecordOptions)
    return p


class FragmentedVideo:
    """An H.264 MP4 written in one-second fragments and flushed as it goes (PyAV, FFmpeg's
    ``frag_keyframe+empty_moov``): the file plays at every moment, so a recorder killed outright loses
    at most the last second, where a plain MP4 loses everything (its index is written at the end)."""

    def __init__(self, path: Path, fps: float) -> None:
        import av

        self.path = path
        self.fps = fps
        self.container = av.open(str(path), "w", format="mp4", options={
            "movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"})
        self.stream = None
        self.frames = 0

    def write(self, bgr) -> None:
        import av
        from fractions import Fraction

        h, w = bgr.shape[0] & ~1, bgr.shape[1] & ~1  # 4:2:0 needs even sizes: drop an odd last row/column
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, "yuv420p"
            # A keyframe (so a fragment) every second; no lookahead, so frames leave the encoder at once.
            self.stream.codec_context.gop_size = max(1, round(self.fps))
            self.stream.options = {"preset": "veryfast", "tune": "zerolatency", "crf": "20"}
        frame = av.VideoFrame.from_ndarray(bgr[:h, :w], format="bgr24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        self.container.close()


class _FileSink:
    """Masks as PNG, overlays as a fragmented MP4 (see :class:`FragmentedVideo`), stats as JSON lines."""

    def __init__(self, out: Path, streams: list[str], fps: float) -> None:
        import av  # noqa: F401  (fail at start, not at the first frame)
        import cv2  # noqa: F401

        self.out, self.fps = out, fps
        (out / "mask").mkdir(parents=True, exist_ok=True)
        self.video: FragmentedVideo | None = None
        self.stats_file = open(out / "stats.jsonl", "a") if "stats" in streams else None

    def write(self, msg) -> None:
        import cv2

        from perception.core.fileio import atomic_write_bytes

        seq = msg.header["seq"]
        if msg.stream == "mask":
            # imencode + an atomic write: a full disk raises (cv2.imwrite only returns False, and left 185 of
            # 200 masks empty with "recorded 200 frames"), and never leaves a half-written PNG.
            ok, png = cv2.imencode(".png", msg.data)
            if not ok:
                from perception.stream.consumers.rosbag import UnrecordableMessage

                raise UnrecordableMessage(f"mask {seq} could not be encoded as PNG")
            atomic_write_bytes(self.out / "mask" / f"{seq:08d}.png", png.tobytes())
        elif msg.stream == "overlay":
            if self.video is None:
                self.video = FragmentedVideo(self.out / "overlay.mp4", self.fps)
            self.video.write(msg.data)
        elif msg.stream == "stats" and self.stats_file is not None:
            self.stats_file.write(json_text({"seq": seq, "stamp_ns": msg.header["stamp_ns"], **msg.data}) + "\n")
            self.stats_file.flush()
        elif msg.stream == "info":
            atomic_write_bytes(self.out / "info.json", json_text(msg.data, indent=2).encode())

    def close(self) -> None:
        if self.video is not None:
            self.video.close()
        if self.stats_file is not None:
            self.stats_file.close()


class _PerCamera:
    """File sinks by camera, for a node running several cameras."""

    def __init__(self, sinks: dict[str, _FileSink], namespace: str) -> None:
        self.sinks, self.namespace = sinks, namespace

    def write(self, msg) -> None:
        camera = msg.topic[len(self.namespace) + 1 :].split("/", 1)[0]
        if camera in self.sinks:
            self.sinks[camera].write(msg)

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()


def _recover(folder: str) -> int:
    from perception.stream.consumers.rosbag import BagError, recover_bag

    try:
        rewritten = recover_bag(folder)
    except (BagError, OSError) as e:
        return fail("perception-record", str(e))
    if not rewritten:
        print(f"{folder}: every .mcap file was complete; metadata.yaml rebuilt", file=sys.stderr)
    for name, n in rewritten.items():
        print(f"{folder}/{name}: recovered {n} messages", file=sys.stderr)
    return 0


def _check_out(out: Path) -> str | None:
    """Why --out cannot be recorded into, or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return f"--out {out} cannot be created ({probe} is not a writable folder)"
    return None


def _parse_streams(parser: argparse.ArgumentParser, args: RecordOptions) -> list[str]:
    streams = [s.strip() for s in (args.streams or DEFAULT_STREAMS).split(",") if s.strip()]
    allowed = ("mask", "overlay", "stats", "info") if args.format == "files" else \
        ("mask", "color_mask", "overlay", "uncertainty", "stats", "info")
    if bad := [s for s in streams if s not in allowed]:
        parser.error(f"--streams: {bad} cannot be recorded as {args.format}; choose from {', '.join(allowed)}")
    return streams


def _open_sink(args: RecordOptions, out: Path, streams: list[str]):
    if args.format == "mcap":
        from perception.stream.consumers.rosbag import BagWriter

        return BagWriter(out, max_bag_duration=args.max_bag_duration, chunk_size=args.chunk_size)
    if args.camera:
        return _PerCamera({c: _FileSink(out / c, streams, args.fps) for c in args.camera}, args.namespace)
    return _FileSink(out, streams, args.fps)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_into(parser, RecordOptions, argv)
    except ValueError as e:
        return fail("perception-record", str(e))
    if args.recover:
        return _recover(args.recover)
    if not args.endpoint or not args.out:
        parser.error("an endpoint and --out are required (or --recover BAG)")
    if args.max_bag_duration is not None and args.format != "mcap":
        parser.error("--max-bag-duration needs --format mcap")
    out = Path(args.out)
    if why := _check_out(out):
        return fail("perception-record", why)
    streams = _parse_streams(parser, args)

    import zmq

    from perception.stream.client import Subscriber
    from perception.stream.consumers.rosbag import BagError
    from perception.stream.security import CurveError, client_keys_from_args

    try:
        curve = client_keys_from_args(args)
    except CurveError as e:
        return fail("perception-record", str(e))
    made_out = not out.exists()  # a recording that fails before anything arrives leaves nothing behind
    try:
        sink = _open_sink(args, out, streams)
    except (BagError, OSError) as e:  # e.g. /proc, which even root cannot write into; a full disk
        if made_out:
            shutil.rmtree(out, ignore_errors=True)
        why = str(e) if isinstance(e, BagError) else f"--out {out} cannot be created ({e.strerror or e})"
        return fail("perception-record", why)
    prefixes = [f"{args.namespace}/{c}" for c in args.camera] if args.camera else [args.namespace]
    try:
        # JPEG payloads go into a bag as they came (CompressedImage); the file sink needs pixels.
        # Always the stats too (recorded only when asked for): their final message says the node is done.
        sub = Subscriber(args.endpoint, topics=[f"{p}/{s}" for p in prefixes for s in {*streams, "stats"}],
                         decode_jpeg=args.format == "files", curve=curve)
    except zmq.ZMQError as e:
        sink.close()
        if made_out:
            shutil.rmtree(out, ignore_errors=True)
        return fail("perception-record", f"cannot connect to {args.endpoint!r} ({e})")
    with sub:
        rc, tally = _record(sub, sink, args, streams, len(prefixes))
    if rc != 0 and not tally["written"] and made_out:
        shutil.rmtree(out, ignore_errors=True)
    if rc == 0 or tally["frames"]:  # after an error with nothing recorded, the error is the one line
        notes = [f"{tally['skipped']} messages skipped (no ROS 2 form)"] if tally["skipped"] else []
        notes += [sub.losses()] if sub.losses() else []
        print(f"recorded {tally['frames']} frames to {out}" + (f" ({'; '.join(notes)})" if notes else ""),
              file=sys.stderr)
    return rc


def _record(sub, sink, args: RecordOptions, streams: list[str], cameras: int) -> tuple[int, dict[str, int]]:
    """Write what arrives into ``sink`` until the node is done (every camera's final stats), --count frames,
    --duration, --timeout of silence or a signal; closes the sink. The exit status and the counts."""
    from perception.core.cli import stop_on_signals
    from perception.stream.client import follow
    from perception.stream.consumers.echo import end_status
    from perception.stream.consumers.rosbag import UnrecordableMessage

    frame_stream = "mask" if "mask" in streams else "overlay"
    tally = {"frames": 0, "skipped": 0, "written": 0}
    following = follow(sub, gone_after=args.gone_after, count=args.count, duration=args.duration, timeout=args.timeout,
                       stopped=stop_on_signals(), counted=lambda m: m.stream == frame_stream, finals_needed=cameras,
                       warn=lambda m: print(f"perception-record: warning: {m}", file=sys.stderr, flush=True))
    rc = 0
    try:
        for msg in following:
            if msg.stream not in streams:
                continue  # stats heard for the node's end, not asked for in --streams
            try:
                sink.write(msg)
            except UnrecordableMessage as e:
                if not tally["skipped"]:
                    print(f"perception-record: warning: skipping messages that cannot be recorded ({e})",
                          file=sys.stderr, flush=True)
                tally["skipped"] += 1
                continue
            tally["written"] += 1
            tally["frames"] += msg.stream == frame_stream
            if getattr(sink, "disk_full", False):  # the bag was finished in its reserve: it opens as it is
                rc = fail("perception-record", f"stopped after {tally['frames']} frames: {args.out} is full "
                          "(No space left on device); the bag is closed with everything written so far", status=1)
                break
        else:
            rc = end_status("perception-record", following, args.endpoint)
    except ValueError as e:  # BagError: a stream changed type mid-recording
        rc = fail("perception-record", str(e), status=1)
    except OSError as e:  # a full disk, a removed folder: stop with what was written
        closed = "; the bag is closed with everything written so far" if getattr(sink, "disk_full", False) else ""
        rc = fail("perception-record", f"stopped after {tally['frames']} frames: cannot write to {args.out} "
                  f"({e.strerror or e}){closed}", status=1)
    finally:
        rc = _close_sink(sink, args, rc)
    return rc, tally


def _close_sink(sink, args: RecordOptions, rc: int) -> int:
    """Close the sink; a failure to (a full disk flushing the video or the bag's summary) is one line."""
    try:
        sink.close()
    except OSError as e:
        if rc == 0:
            rc = fail("perception-record", f"cannot finish writing {args.out} ({e.strerror or e})", status=1)
        if args.format == "mcap":
            print(f"perception-record: free some space, then run: perception-record --recover {args.out}",
                  file=sys.stderr, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
