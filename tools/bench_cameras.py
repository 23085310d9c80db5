"""Aggregate throughput of one node with 1, 2 and 4 cameras (synthetic 360x480 frames, the shipped
model), each against 1 camera measured in the same run: how much one shared, batched backend gains
over running the cameras' frames one by one.

    python tools/bench_cameras.py --frames 24 --cameras 1 2 4
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "segnet_basic_camvid"))
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--frames", type=int, default=24, help="frames per camera")
    p.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--size", default="360x480", help="HxW of the synthetic frames")
    return p


def _run(n_cameras: int, args) -> tuple[float, int, list[int]]:
    from perception.inference.resolve import resolve_backend
    from perception.stream.client import Subscriber
    from perception.stream.node.cameras import CameraSpec, run_cameras
    from perception.stream.node.pipeline import NodeSettings
    from perception.stream.node.sources import open_source
    from perception.stream.publisher import Publisher

    h, w = (int(v) for v in args.size.split("x"))
    backend = resolve_backend(args.model, backend=args.backend)
    pub = Publisher("tcp://127.0.0.1:*", "segnet")
    cams = [(CameraSpec(f"cam{i}", f"synthetic://?width={w}&height={h}&frames={args.frames}"),
             open_source(f"synthetic://?width={w}&height={h}&frames={args.frames}")) for i in range(n_cameras)]
    masks = [0]
    stop = threading.Event()
    nodes: list = []

    def count() -> None:  # a subscriber to every camera's mask, so each frame is inferred and sent
        with Subscriber(pub.endpoint, topics=["segnet/"]) as sub:
            while not stop.is_set():
                m = sub.recv(timeout=0.1)
                if m is not None and m.stream == "mask":
                    masks[0] += 1

    reader = threading.Thread(target=count, daemon=True)
    reader.start()
    settings = NodeSettings(wait_for_subscribers=1, wait_timeout=30, log_period=None)
    t0 = time.perf_counter()
    run_cameras(cams, backend, pub, settings, namespace="segnet", frame_id_given=False, log=lambda m: None,
                on_nodes=nodes.extend)
    elapsed = time.perf_counter() - t0
    time.sleep(0.3)
    stop.set()
    reader.join(timeout=5)
    pub.close()
    backend.close()
    processed = sum(n.counters.processed for n in nodes)
    return processed / elapsed, masks[0], list(nodes[0].backend.batches)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = {}
    for n in args.cameras:
        fps, received, batches = _run(n, args)
        results[n] = fps
        mean_batch = sum(batches) / len(batches) if batches else 0.0
        print(f"{n} camera(s): {fps:.2f} frames/s in all ({received} masks received, "
              f"mean batch {mean_batch:.2f})", flush=True)
    base = results.get(1)
    if base:
        print("ratio to 1 camera: " + ", ".join(f"{n}: {v / base:.2f}x" for n, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
