#!/usr/bin/env python3
"""Node throughput against the bare backend on the same frames, and raw transport throughput.

    python tools/benchmark_node.py --model models/segnet_basic_camvid --frames 60 [--json node.json]

1. bare: the frames of a video decoded up front, then ``backend.infer`` one frame at a time.
2. node: the same video through ``perception.stream.node`` (capture thread, inference, colour/overlay
   post-processing for the subscribed streams, ZeroMQ publishing) with one subscriber to ``--streams``.
   Ratio = node fps / bare fps, measured in the same run (goal: >= 0.95).
3. transport: 360x480 mono8 masks (and bgr8 overlays) from the Publisher to a Subscriber over
   loopback TCP, messages/s and MB/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_video(path: Path, n: int, h: int, w: int, frames_dir: str | None) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (w, h))
    if frames_dir:
        files = sorted(p for p in Path(frames_dir).iterdir() if p.suffix.lower() in (".png", ".jpg"))
        imgs = [cv2.resize(cv2.imread(str(f)), (w, h)) for f in files[:n]]
    else:
        from perception.export.verify import synthetic_frame

        imgs = [synthetic_frame(h, w, seed=i) for i in range(n)]
    for i in range(n):
        writer.write(imgs[i % len(imgs)])
    writer.release()


def bench_bare(backend, video: Path) -> dict:
    from perception.stream.node.sources import open_source

    frames = [f.image for f in open_source(str(video))]
    backend.infer(frames[0][None])  # warm-up
    t0 = time.perf_counter()
    for f in frames:
        backend.infer(f[None])
    dt = time.perf_counter() - t0
    return {"frames": len(frames), "seconds": dt, "fps": len(frames) / dt}


def bench_node(backend, video: Path, streams: list[str]) -> dict:
    from perception.stream.client import Subscriber
    from perception.stream.node.pipeline import Node, NodeSettings
    from perception.stream.publisher import Publisher
    from perception.stream.node.sources import open_source

    pub = Publisher("tcp://127.0.0.1:*", "segnet", sndhwm=1000)
    node = Node(open_source(str(video)), backend, pub, NodeSettings(wait_for_subscribers=1, wait_timeout=30),
                log=lambda m: None)
    sub = Subscriber(pub.endpoint, topics=[f"segnet/{s}" for s in streams], rcvhwm=1000)
    got = []
    done = threading.Event()

    def consume():
        while not done.is_set():
            m = sub.recv(timeout=0.2)
            if m is not None and m.stream == streams[0]:
                got.append(time.perf_counter())

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    backend.infer(np.zeros((1, 360, 480, 3), np.uint8))  # warm-up, as for bare
    t0 = time.perf_counter()
    rc = node.run()
    dt = time.perf_counter() - t0
    time.sleep(0.5)
    done.set()
    t.join()
    sub.close()
    pub.close()
    n = node.counters.processed
    return {"rc": rc, "frames": n, "received": len(got), "seconds": dt, "fps": n / dt}


def bench_transport(seconds: float = 2.0) -> list[dict]:
    from perception.stream.client import Subscriber
    from perception.stream.publisher import Publisher
    from perception.stream.protocol import image_header

    out = []
    for stream, shape, enc in (("mask", (360, 480), "mono8"), ("overlay", (360, 480, 3), "bgr8")):
        pub = Publisher("tcp://127.0.0.1:*", "bench", sndhwm=100)
        sub = Subscriber(pub.endpoint, topics=[f"bench/{stream}"], rcvhwm=100)
        pub.wait_for_subscribers(1, timeout_s=10)
        img = np.random.default_rng(0).integers(0, 11, shape, dtype=np.uint8)
        stop = threading.Event()
        received = [0]

        def consume():
            while not stop.is_set():
                if sub.recv(timeout=0.1) is not None:
                    received[0] += 1

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        t0 = time.perf_counter()
        sent = 0
        while time.perf_counter() - t0 < seconds:
            payload = img.copy()  # a fresh buffer per message, as the node does (zero-copy safety)
            pub.publish(stream, image_header(seq=sent, stamp_ns=time.time_ns(), frame_id="b", image=payload,
                                             encoding=enc), payload)
            sent += 1
        time.sleep(0.3)
        stop.set()
        t.join()
        dt = time.perf_counter() - t0
        sub.close()
        pub.close()
        out.append({"stream": stream, "bytes": int(img.nbytes), "sent": sent, "received": received[0],
                    "msgs_per_s": received[0] / dt, "MB_per_s": received[0] * img.nbytes / dt / 1e6})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "segnet_basic_camvid"))
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--frames-dir", help="take frames from this folder (e.g. ../shared/camvid/val)")
    p.add_argument("--streams", default="mask,color_mask,overlay")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from perception.stream.node.cli import NodeConfig, node_backend
    from perception.train.loop import machine_description

    backend = node_backend(NodeConfig(model=args.model, backend=args.backend))
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmpd:
        video = Path(tmpd) / "frames.avi"
        make_video(video, args.frames, 360, 480, args.frames_dir)
        bare = bench_bare(backend, video)
        node = bench_node(backend, video, streams)
    transport = bench_transport()
    ratio = node["fps"] / bare["fps"]
    print(f"backend {backend.name}, {bare['frames']} frames of 360x480, streams {','.join(streams)}")
    print(f"bare backend: {bare['fps']:.3f} fps   node: {node['fps']:.3f} fps   ratio node/bare: {ratio:.3f}")
    for t in transport:
        print(f"transport {t['stream']:8s} {t['bytes'] / 1e3:7.1f} kB: {t['msgs_per_s']:8.0f} msg/s "
              f"{t['MB_per_s']:8.1f} MB/s ({t['received']}/{t['sent']} received)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_description(), "backend": backend.name,
                                               "bare": bare, "node": node, "ratio_node_vs_bare": ratio,
                                               "transport": transport}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
