"""Large frames and shutdown: every message queued at the end goes before the process exits, and
libzmq never reads a zero-copy payload the process has freed; the bytes received are the bytes sent."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from perception.stream.client import Subscriber
from perception.stream.protocol import ProtocolError, decode_message, encode_header, image_header, payload_crc32
from perception.stream.publisher import Publisher

# .ci/run runs the whole suite once; each shutdown case repeats this many times inside it (the fault
# it guards against was a race at exit).
REPEAT = int(os.environ.get("PERCEPTION_SHUTDOWN_REPEAT", "3"))


def _free_endpoint() -> str:
    with zmq.Context() as ctx:
        s = ctx.socket(zmq.PUB)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(linger=0)
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.parametrize("width,height,oversize", [(3840, 2160, False), (4800, 4700, True)],
                         ids=["3840x2160", "4800x4700_overlay_over_limit"])
def test_large_frames_every_mask_and_the_final_stats_arrive_and_the_node_exits_0(toy_model, width, height, oversize):
    _, model_dir = toy_model
    frames = 3
    for attempt in range(REPEAT):
        ep = _free_endpoint()
        proc = subprocess.Popen(
            [sys.executable, "-m", "perception.stream.node.cli", "--source",
             f"synthetic://?width={width}&height={height}&frames={frames}", "--model", str(model_dir),
             "--backend", "torch", "--publish", ep, "--wait-for-subscribers", "1", "--wait-timeout", "60",
             "--checksum", "--log-period", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        masks, streams, final = set(), set(), None
        try:
            with Subscriber(ep, on_error="raise") as sub:  # every stream; a bad checksum raises
                deadline = time.monotonic() + 120
                while final is None and time.monotonic() < deadline:
                    msg = sub.recv(timeout=1)
                    if msg is None:
                        if proc.poll() is not None:
                            break
                        continue
                    streams.add(msg.stream)
                    if msg.stream == "mask":
                        assert msg.data.shape == (height, width)
                        masks.add(msg.header["seq"])
                    elif msg.stream == "stats" and msg.data.get("final") is True:
                        final = msg.data
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = proc.stderr.read()
        assert rc == 0, f"attempt {attempt}: node rc {rc}: {err[-2000:]}"
        assert masks == set(range(frames)), f"attempt {attempt}: masks {sorted(masks)}"
        assert final is not None and final["frames_processed"] == frames, f"attempt {attempt}: no final stats"
        assert ("overlay" in streams) is not oversize  # 4800x4700x3 bytes passes the 64 MiB limit: withheld


def test_a_publisher_left_open_at_exit_still_delivers_its_last_large_message():
    """A library user who never closes the publisher: the exit handler closes it before pyzmq drops
    the zero-copy payloads, so the message arrives whole and the process exits 0."""
    ep = _free_endpoint()
    code = f"""
import numpy as np, time
from perception.stream.publisher import Publisher
from perception.stream.protocol import image_header
pub = Publisher({ep!r}, "segnet", checksum=True)
pub.wait_for_subscribers(1, timeout_s=30)
img = np.arange(3000 * 4000, dtype=np.uint32).astype(np.uint8).reshape(3000, 4000)
for seq in range(3):
    pub.publish("mask", image_header(seq=seq, stamp_ns=1, frame_id="c", image=img, encoding="mono8"), img.copy())
"""  # exits at once, never closing: the messages are still queued
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    got = []
    try:
        with Subscriber(ep, topics=["segnet/mask"], on_error="raise") as sub:
            while len(got) < 3:
                msg = sub.recv(timeout=30)
                if msg is None:
                    break
                got.append(msg)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, proc.stderr.read()[-2000:]
    expected = np.arange(3000 * 4000, dtype=np.uint32).astype(np.uint8).reshape(3000, 4000)
    assert [m.header["seq"] for m in got] == [0, 1, 2]
    assert all(np.array_equal(m.data, expected) for m in got)


def _pattern(seq: int, shape) -> np.ndarray:
    # Distinct per frame and position: a stale or reused buffer shows up as a wrong value.
    return ((np.arange(shape[0] * shape[1], dtype=np.uint32) * 2654435761 + seq * 97) >> 11).astype(np.uint8).reshape(shape)


@pytest.mark.slow
def test_received_bytes_are_the_bytes_sent_while_the_publisher_keeps_producing():
    """Thousands of large frames, each a fresh array sent zero-copy while the next is produced; each
    arrives with its CRC-32 verified and its content equal to what was meant for its seq."""
    n, shape = 2000, (720, 1280)
    pub = Publisher("tcp://127.0.0.1:*", "segnet", checksum=True, sndhwm=16)
    received: list[int] = []
    errors: list[str] = []
    sub = Subscriber(pub.endpoint, topics=["segnet/mask"], on_error="raise", rcvhwm=16)
    try:
        assert pub.wait_for_subscribers(1, timeout_s=30)

        def consume() -> None:
            try:
                while True:
                    msg = sub.recv(timeout=5)
                    if msg is None:
                        return
                    seq = msg.header["seq"]
                    if not np.array_equal(msg.data, _pattern(seq, shape)):
                        errors.append(f"frame {seq}: content differs")
                    received.append(seq)
                    if seq == n - 1:
                        return
            except ProtocolError as e:
                errors.append(str(e))

        t = threading.Thread(target=consume)
        t.start()
        for seq in range(n):
            img = _pattern(seq, shape)
            pub.publish("mask", image_header(seq=seq, stamp_ns=seq + 1, frame_id="c", image=img, encoding="mono8"), img)
            if seq % 16 == 15:
                pub.poll(1)  # paced like a producer: the subscriber keeps up and most frames arrive
        t.join(timeout=120)
    finally:
        sub.close()
        pub.close()
    assert not errors, errors[:3]
    assert len(received) >= n // 2, f"only {len(received)} of {n} frames arrived"
    assert received == sorted(received)


def test_a_corrupted_payload_is_rejected_by_its_checksum():
    img = np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)
    header = image_header(seq=0, stamp_ns=1, frame_id="c", image=img, encoding="mono8")
    header["crc32"] = payload_crc32(img)
    good = decode_message([b"segnet/mask", encode_header(header), img.tobytes()])
    assert np.array_equal(good.data, img)
    bad = bytearray(img.tobytes())
    bad[1000] ^= 0x01
    with pytest.raises(ProtocolError, match="crc32"):
        decode_message([b"segnet/mask", encode_header(header), bytes(bad)])
    header["crc32"] = 2**32  # out of range: malformed
    with pytest.raises(ProtocolError, match="crc32"):
        decode_message([b"segnet/mask", encode_header(header), img.tobytes()])
