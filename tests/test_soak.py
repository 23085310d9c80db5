"""Soak: 3000 small frames to 10 subscribers (3 never read, 2 slow, 5 fast). Memory stays flat, fast
readers see every mask with no gap, and the node ends cleanly. Marked ``soak``: CI runs it once."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import start_node
from perception.stream.client import Subscriber

pytestmark = pytest.mark.soak

FRAMES = 3000


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def test_soak_3000_frames_10_subscribers(toy_model):
    _, model_dir = toy_model
    # A finite synthetic source is not paced: the node runs as fast as it can, and drops nothing.
    node, pub, t, result = start_node(f"synthetic://?width=64&height=48&frames={FRAMES}", model_dir,
                                      n_subs=10, queue_size=2)
    stop = threading.Event()
    fast: list[list[int]] = [[] for _ in range(5)]
    slow_counts = [0, 0]
    idle = [Subscriber(pub.endpoint, topics=["segnet/"]) for _ in range(3)]  # connected, never read

    def read(sub: Subscriber, into: list[int] | None, slot: int | None, delay: float) -> None:
        with sub:
            while not stop.is_set():
                msg = sub.recv(timeout=0.1)
                if msg is None or msg.stream != "mask":
                    continue
                if into is not None:
                    into.append(msg.header["seq"])
                else:
                    slow_counts[slot] += 1
                    time.sleep(delay)  # a consumer slower than the node

    readers = [threading.Thread(target=read, args=(Subscriber(pub.endpoint, topics=["segnet/mask"], rcvhwm=0),
                                                   fast[i], None, 0.0), daemon=True) for i in range(5)]
    readers += [threading.Thread(target=read, args=(Subscriber(pub.endpoint, topics=["segnet/"]), None, i, 0.05),
                                 daemon=True) for i in range(2)]
    for r in readers:
        r.start()
    rss = []
    t.start()
    while t.is_alive():
        t.join(timeout=1.0)
        rss.append(_rss_mib())
    # Let fast readers drain what is already sent.
    deadline = time.monotonic() + 30
    while min(len(f) for f in fast) < pub.sent.get("mask", 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for r in readers:
        r.join(timeout=10)
    for s in idle:
        s.close()
    pub.close()

    assert result.get("rc") == 0
    sent = pub.sent.get("mask", 0)
    assert sent >= FRAMES * 0.9, f"only {sent} masks were sent"
    for seqs in fast:
        assert len(seqs) == sent and seqs == sorted(seqs), "a fast reader misses nothing"
    assert all(0 < c < sent for c in slow_counts), "slow readers fall behind but keep receiving"
    settled = rss[len(rss) // 4 :]  # after warm-up
    assert max(settled) - min(settled) < 64, f"RSS grew from {min(settled):.0f} to {max(settled):.0f} MiB"
    print(f"soak: {sent} masks, slow readers got {slow_counts}, RSS {min(settled):.0f}-{max(settled):.0f} MiB")
