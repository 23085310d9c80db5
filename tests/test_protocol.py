"""Wire format: round trips and bounded, defensive decoding."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from perception.stream.protocol import (
    SCHEMA_VERSION,
    Limits,
    ProtocolError,
    decode_message,
    encode_header,
    encode_image,
    encode_map,
    image_header,
    topic_for,
)


def _msg(topic, header, payload):
    return [topic.encode(), encode_header(header), payload]


@pytest.mark.parametrize("encoding,shape,dtype", [("mono8", (5, 7), np.uint8), ("bgr8", (5, 7, 3), np.uint8),
                                                   ("32FC1", (5, 7), np.float32)])
def test_image_round_trip(encoding, shape, dtype):
    img = (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)
    h = image_header(seq=3, stamp_ns=123, frame_id="cam", image=img, encoding=encoding)
    assert h["step"] == img.strides[0] and h["height"] == 5 and h["width"] == 7 and h["v"] == SCHEMA_VERSION
    stream = {"mono8": "mask", "bgr8": "overlay", "32FC1": "uncertainty"}[encoding]  # what each stream carries
    msg = decode_message(_msg(f"segnet/{stream}", h, bytes(encode_image(img, encoding))))
    assert msg.stream == stream and msg.header["seq"] == 3
    assert msg.data.dtype == dtype and np.array_equal(msg.data, img)


def test_padded_rows_honour_step():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    padded = np.zeros((3, 8), np.uint8)
    padded[:, :4] = img
    h = {"v": 1, "seq": 0, "stamp_ns": 0, "frame_id": "f", "encoding": "mono8", "height": 3, "width": 4, "step": 8}
    assert np.array_equal(decode_message(_msg("s/mask", h, padded.tobytes())).data, img)


def test_jpeg_and_maps():
    img = np.full((16, 24, 3), 128, np.uint8)
    h = image_header(seq=0, stamp_ns=0, frame_id="f", image=img, encoding="jpeg")
    out = decode_message(_msg("s/overlay", h, encode_image(img, "jpeg"))).data
    assert out.shape == img.shape and np.abs(out.astype(int) - 128).max() < 4
    m = decode_message(_msg("s/stats", {"v": 1, "seq": 0, "stamp_ns": 0, "frame_id": "f", "encoding": "msgpack"},
                            encode_map({"fps": 3.5})))
    assert m.data == {"fps": 3.5}


def _hdr(**kw):
    h = {"v": 1, "seq": 0, "stamp_ns": 0, "frame_id": "f", "encoding": "mono8", "height": 2, "width": 2, "step": 2}
    h.update(kw)
    return h


@pytest.mark.parametrize(
    "frames,match",
    [
        ([b"t", b"x"], "3 frames"),
        ([b"s/mask", b"\xc1garbage", b""], "malformed"),
        ([b"s/mask", msgpack.packb([1, 2]), b""], "not a map"),
        ([b"s/mask", msgpack.packb({"v": 1}), b""], "lacks"),
        ([b"s/mask", encode_header(_hdr(v=SCHEMA_VERSION + 1)), b"1234"], "schema version"),
        ([b"s/mask", encode_header(_hdr()), b"123"], "payload is 3 bytes"),
        ([b"s/mask", encode_header(_hdr(step=1)), b"12"], "smaller than a row"),
        ([b"s/mask", encode_header(_hdr(encoding="rgb16")), b"1234"], "mask carries mono8, png, not 'rgb16'"),
        ([b"s/mask", encode_header(_hdr(height=-1)), b""], "at least 1x1"),
        ([b"\xff\xfe", encode_header(_hdr()), b"1234"], "UTF-8"),
    ],
)
def test_malformed_messages_are_rejected(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode_message(frames)


def test_limits_bound_decoding():
    small = Limits(max_message_bytes=100, max_header_bytes=96, max_map_len=16, max_image_pixels=10)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_message([b"s/mask", encode_header(_hdr()), b"x" * 200], small)
    big_map = encode_header({**_hdr(), **{f"k{i}": i for i in range(10)}})
    with pytest.raises(ProtocolError):
        decode_message([b"s/mask", big_map, b"1234"], Limits(max_map_len=4))
    with pytest.raises(ProtocolError, match="pixel limit"):
        decode_message([b"s/mask", encode_header(_hdr(height=100, width=100, step=100)), b""], small)
    # A header claiming a huge string is refused by msgpack's limits before allocation.
    hostile = b"\x85" + b"\xdb\xff\xff\xff\xf0"  # map of 5, then a str32 header claiming ~4 GB
    with pytest.raises(ProtocolError):
        decode_message([b"s/mask", hostile, b""])


def test_topics():
    assert topic_for("segnet", "mask") == "segnet/mask"
    assert topic_for("/robot/front/", "overlay") == "robot/front/overlay"
    with pytest.raises(ValueError):
        topic_for("segnet", "depth")


def test_docs_protocol_example_consumer_works(toy_model, tmp_path):
    """The stand-alone consumer in docs/protocol.md (plain pyzmq + msgpack) decodes a real node's mask."""
    import re
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from perception.inference import load_backend
    from perception.stream.node.pipeline import Node, NodeSettings
    from perception.stream.publisher import Publisher
    from perception.stream.node.sources import open_source

    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    code = re.search(r"## Example consumer.*?```python\n(.*?)```", doc, re.S).group(1)
    pub = Publisher("tcp://127.0.0.1:*", "segnet")
    code = code.replace("tcp://127.0.0.1:5555", pub.endpoint) + "\nprint(mask.shape, mask.dtype, int(mask.max()))\n"
    node = Node(open_source("synthetic://?width=64&height=48&frames=3"), load_backend(toy_model[1]), pub,
                NodeSettings(wait_for_subscribers=1, wait_timeout=30), log=lambda m: None)
    t = threading.Thread(target=node.run, daemon=True)
    t.start()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    t.join(timeout=30)
    pub.close()
    assert r.returncode == 0, r.stderr
    shape, dtype, top = r.stdout.split(")")[0] + ")", r.stdout.split()[-2], int(r.stdout.split()[-1])
    assert shape == "(48, 64)" and dtype == "uint8" and 0 <= top < 3


_STATS = {"v": 1, "seq": 0, "stamp_ns": 0, "frame_id": "f", "encoding": "msgpack"}


@pytest.mark.parametrize(
    "frames,match",
    [
        ([b"s/mask", encode_header(_hdr(encoding=["mono8"])), b"1234"], "'encoding' must be a string"),
        ([b"s/mask", encode_header(_hdr(encoding={"a": 1})), b"1234"], "'encoding' must be a string"),
        ([b"s/mask", encode_header(_hdr(latency_ms="fast")), b"1234"], "'latency_ms' must be a map"),
        ([b"s/mask", encode_header(_hdr(latency_ms=[1, 2])), b"1234"], "'latency_ms' must be a map"),
        ([b"s/mask", encode_header(_hdr(latency_ms={"infer": "x"})), b"1234"], "'latency_ms' must be a map"),
        ([b"s/mask", encode_header(_hdr(seq=True)), b"1234"], "'seq' must be an integer"),
        ([b"s/mask", encode_header(_hdr(frame_id=b"cam")), b"1234"], "malformed"),
        ([b"s/mask", encode_header(_hdr(extra=b"\x00\x01")), b"1234"], "malformed"),
        ([b"s/stats", encode_header(_STATS), encode_map({"fps": b"\x00"})], "malformed"),
    ],
)
def test_malformed_header_values_are_rejected_not_crashing(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode_message(frames)


def _jpeg(h, w, **params):
    import cv2

    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    flags = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if params.get("progressive") else []
    ok, buf = cv2.imencode(".jpg", img, flags)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("h,w,progressive", [(16, 24, False), (1, 1, False), (37, 101, True), (480, 640, False)])
def test_jpeg_size_is_read_from_the_frame_header_as_opencv_decodes(h, w, progressive):
    import cv2

    from perception.stream.protocol import jpeg_size

    data = _jpeg(h, w, progressive=progressive)
    assert jpeg_size(data) == (h, w) == cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
    assert jpeg_size(b"\x89PNG\r\n") is None and jpeg_size(b"\xff\xd8\xff\xd9") is None and jpeg_size(b"") is None


def test_jpeg_bomb_is_rejected_before_decoding():
    from perception.stream.protocol import jpeg_size

    small = bytearray(_jpeg(16, 24))
    # Rewrite the frame header to claim 16000 x 16000 pixels, as a decompression bomb would.
    i = next(k for k in range(2, len(small) - 9) if small[k] == 0xFF and small[k + 1] in (0xC0, 0xC2))
    small[i + 5 : i + 9] = (16000).to_bytes(2, "big") + (16000).to_bytes(2, "big")
    bomb = bytes(small)
    assert jpeg_size(bomb) == (16000, 16000)
    h = image_header(seq=0, stamp_ns=0, frame_id="f", encoding="jpeg", height=16, width=24)
    with pytest.raises(ProtocolError, match="JPEG payload is 16000x16000, header says 24x16"):
        decode_message(_msg("s/overlay", h, bomb))
    # An honest JPEG of another size than its header, and bytes that are no JPEG, are rejected too.
    with pytest.raises(ProtocolError, match="header says 24x16"):
        decode_message(_msg("s/overlay", h, _jpeg(20, 24)))
    with pytest.raises(ProtocolError, match="no readable frame header"):
        decode_message(_msg("s/overlay", h, b"not a jpeg"))


def test_random_corruption_only_ever_raises_protocol_error():
    """Thousands of byte-level corruptions of valid messages: decoding succeeds or raises ProtocolError."""
    rng = np.random.default_rng(0)
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    valid = [
        _msg("s/mask", image_header(seq=1, stamp_ns=2, frame_id="f", image=img, encoding="mono8",
                                    latency_ms={"infer": 1.5}), encode_image(img, "mono8")),
        _msg("s/overlay", image_header(seq=1, stamp_ns=2, frame_id="f", encoding="jpeg", height=8, width=8),
             _jpeg(8, 8)),
        _msg("s/stats", _STATS, encode_map({"fps": 3.5, "latency_ms": {"infer": {"p50": 3.0}}})),
    ]
    outcomes = {"ok": 0, "rejected": 0}
    for trial in range(3000):
        frames = [bytearray(f) for f in valid[trial % len(valid)]]
        part = frames[rng.integers(0, 3)]
        for _ in range(rng.integers(1, 4)):
            if len(part) and rng.random() < 0.7:
                part[rng.integers(0, len(part))] = rng.integers(0, 256)
            elif rng.random() < 0.5:
                del part[rng.integers(0, len(part) + 1):]
            else:
                part.extend(rng.integers(0, 256, rng.integers(1, 8), dtype=np.uint8).tobytes())
        try:
            decode_message([bytes(f) for f in frames])
            outcomes["ok"] += 1
        except ProtocolError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 500 and outcomes["ok"] > 100, outcomes


def test_subscriber_skips_and_counts_what_a_rogue_publisher_sends():
    import time

    import zmq

    from perception.stream.client import Subscriber

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    img = np.zeros((2, 2), np.uint8)
    good = _msg("s/mask", image_header(seq=7, stamp_ns=1, frame_id="f", image=img, encoding="mono8"),
                encode_image(img, "mono8"))
    bad = [
        [b"s/mask", encode_header(_hdr(encoding=["mono8"])), b"1234"],
        [b"s/mask", encode_header(_hdr(latency_ms="slow")), b"1234"],
        [b"s/mask", encode_header(_hdr(extra=b"\x00")), b"1234"],
    ]
    with Subscriber(f"tcp://127.0.0.1:{port}", topics=["s/mask"]) as sub:
        try:
            got = None
            deadline = time.monotonic() + 20
            while got is None and time.monotonic() < deadline:  # until the subscription has propagated
                for frames in bad + [good]:
                    pub.send_multipart(frames)
                got = sub.recv(timeout=0.2)
            assert got is not None and got.header["seq"] == 7
            # Connected now: one more round of three bad messages and a good one, in order.
            before = sub.errors
            for frames in bad + [good]:
                pub.send_multipart(frames)
            again = sub.recv(timeout=10)
            assert again is not None and again.header["seq"] == 7 and sub.errors - before == 3
        finally:
            pub.close(linger=0)


def test_subscriber_survives_a_peer_that_sends_over_the_size_limit():
    """libzmq drops the connection on a message over ZMQ_MAXMSGSIZE and never re-makes it; the
    Subscriber does, so one oversize message from a foreign peer costs that message, not the stream."""
    import time

    import zmq

    from perception.stream.client import Subscriber
    from perception.stream.protocol import Limits

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    img = np.zeros((2, 2), np.uint8)

    def good(seq: int) -> list:
        return _msg("s/mask", image_header(seq=seq, stamp_ns=1, frame_id="f", image=img, encoding="mono8"),
                    encode_image(img, "mono8"))

    huge = _msg("s/mask", image_header(seq=99, stamp_ns=1, frame_id="f", image=np.zeros((64, 64), np.uint8),
                                       encoding="mono8"), np.zeros((64, 64), np.uint8))
    with Subscriber(f"tcp://127.0.0.1:{port}", topics=["s/mask"], limits=Limits(max_message_bytes=2048)) as sub:
        try:
            got = None
            deadline = time.monotonic() + 20
            while got is None and time.monotonic() < deadline:  # until the subscription has propagated
                pub.send_multipart(good(1))
                got = sub.recv(timeout=0.2)
            assert got is not None
            pub.send_multipart(huge)  # 4 KiB over a 2 KiB limit: libzmq cuts the connection
            seqs = set()
            deadline = time.monotonic() + 20
            while 2 not in seqs and time.monotonic() < deadline:
                pub.send_multipart(good(2))
                if (m := sub.recv(timeout=0.2)) is not None:
                    seqs.add(m.header["seq"])
            assert 2 in seqs, "the subscriber must hear the peer again after an oversize message"
            assert 99 not in seqs and sub.reconnects >= 1
        finally:
            pub.close(linger=0)


def _passes_a_message(ctx, within_s: float = 10.0) -> bool:
    """A fresh PUB/SUB pair on ``ctx`` passes a message: the context's I/O thread is not stuck."""
    import time

    import zmq

    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{port}")
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            pub.send(b"ping")
            if sub.poll(100):
                return True
        return False
    finally:
        pub.close(linger=0)
        sub.close(linger=0)


_STUCK_CONTEXTS: list = []  # a stuck I/O thread hangs term(): such a context is kept from the collector


def _retrying_context():
    """A private context whose sockets retry a refused connection every millisecond: a subscriber
    of a dead endpoint then makes in seconds the monitor events of hours (at the default 100 ms)."""
    import zmq

    ctx = zmq.Context()
    ctx.setsockopt(zmq.RECONNECT_IVL, 1)
    return ctx


def _resource_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_an_unread_subscriber_cannot_stall_the_other_sockets():
    """libzmq sends monitor events from its I/O thread with a blocking send: an unread monitor queue
    at its high-water mark (1000 + 1000 by default) stalled every socket of the context, the node's
    publisher included. A subscriber nobody reads while its node is down must not do that."""
    import time

    from conftest import free_endpoint

    from perception.stream.client import Subscriber

    ctx = _retrying_context()
    healthy = False
    sub = Subscriber(free_endpoint(), context=ctx)  # nothing listens there: libzmq keeps retrying
    try:
        deadline = time.monotonic() + 5  # ~900 events a second here: past the old limit in ~2 s
        healthy = True
        while healthy and time.monotonic() < deadline:
            healthy = _passes_a_message(ctx)
        events = sum(1 for _ in sub._monitor.events())
        assert healthy, "a fresh socket pair stopped passing messages: the I/O thread is stuck"
        assert events > 2000, f"only {events} monitor events queued: the test did not reach the old limit"
    finally:
        sub.close()
        if healthy:
            ctx.destroy(linger=0)
        else:
            _STUCK_CONTEXTS.append(ctx)


def test_a_subscriber_dropped_without_close_is_closed_in_the_order_libzmq_needs():
    """The garbage collector closes a forgotten subscriber (or publisher): monitoring off first, then its sockets,
    with no "unclosed socket" warning and nothing stuck (libzmq#3575: the reading end of a monitor
    closed while monitoring is on blocks the I/O thread for good)."""
    import gc
    import warnings

    from conftest import free_endpoint

    from perception.stream.client import Subscriber
    from perception.stream.publisher import Publisher

    ctx = _retrying_context()
    healthy = False
    try:
        for i in range(20):  # subscribers retrying a dead endpoint a thousand times a second
            kept = (Subscriber(free_endpoint(), context=ctx) if i % 2
                    else Publisher("tcp://127.0.0.1:*", "s", context=ctx))
            sockets = (kept.sock, kept._monitor.pair)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                del kept
                gc.collect()
            assert all(s.closed for s in sockets)
            assert not _resource_warnings(caught)
        healthy = _passes_a_message(ctx)
        assert healthy, "a fresh socket pair stopped passing messages: the I/O thread is stuck"
    finally:
        if healthy:
            ctx.destroy(linger=0)
        else:
            _STUCK_CONTEXTS.append(ctx)


def test_a_subscriber_that_cannot_connect_closes_what_it_opened():
    """A bad endpoint raises, and the sockets made before it are closed then (in order), not left to
    the garbage collector."""
    import gc
    import warnings

    import zmq

    from perception.stream.client import Subscriber

    ctx = zmq.Context()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(zmq.ZMQError):
                Subscriber("not-an-endpoint", context=ctx)
            gc.collect()
        assert not _resource_warnings(caught)
    finally:
        ctx.destroy(linger=0)


def test_png_masks_are_checked_before_they_are_inflated():
    import cv2

    mask = (np.arange(48 * 64) % 5).astype(np.uint8).reshape(48, 64)
    payload = encode_image(mask, "png")
    header = image_header(seq=0, stamp_ns=1, frame_id="f", image=mask, encoding="png")
    assert header["step"] == 0
    assert np.array_equal(decode_message([b"s/mask", encode_header(header), payload]).data, mask)
    # A 20000x20000 PNG (a few hundred KB of zeros) under a 64x48 header: refused from its IHDR.
    ok, bomb = cv2.imencode(".png", np.zeros((20000, 20000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    with pytest.raises(ProtocolError, match="PNG payload is 20000x20000"):
        decode_message([b"s/mask", encode_header(header), bomb.tobytes()])
    ok, colour = cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(ProtocolError, match="8-bit greyscale"):
        decode_message([b"s/mask", encode_header(header), colour.tobytes()])
    with pytest.raises(ProtocolError, match="no readable IHDR"):
        decode_message([b"s/mask", encode_header(header), b"not a png"])


def test_the_subscriber_counts_frames_it_never_received_from_seq_gaps():
    """seq 0 1 2 5 6 | 0 1 3 (a new node run, then one lost) on mask, and stats whose seq jumps (not frames):
    3 frames missed on segnet/mask; a consumer's summary says so (issue 45, item 1)."""
    import time

    import zmq

    from perception.stream.client import Subscriber

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    img = np.zeros((2, 2), np.uint8)

    def mask(seq):
        return _msg("segnet/mask", image_header(seq=seq, stamp_ns=1, frame_id="f", image=img, encoding="mono8"),
                    encode_image(img, "mono8"))

    def stats(seq):
        return _msg("segnet/stats", {"v": SCHEMA_VERSION, "seq": seq, "stamp_ns": 1, "frame_id": "f",
                                     "encoding": "msgpack"}, encode_map({"fps": 1.0}))

    with Subscriber(f"tcp://127.0.0.1:{port}", topics=["segnet/"]) as sub:
        try:
            deadline = time.monotonic() + 20
            while sub.recv(timeout=0.2) is None and time.monotonic() < deadline:  # until subscribed
                pub.send_multipart(stats(0))
            for frames in [mask(0), mask(1), mask(2), stats(40), mask(5), mask(6), mask(0), mask(1), stats(90), mask(3)]:
                pub.send_multipart(frames)
            got = [sub.recv(timeout=10) for _ in range(10)]
            assert [m.header["seq"] for m in got] == [0, 1, 2, 40, 5, 6, 0, 1, 90, 3]
        finally:
            pub.close(linger=0)
        assert dict(sub.missed) == {"segnet/mask": 3}
        assert sub.losses() == "3 frames missed (seq gaps: segnet/mask 3)"
        # The node's final stats: it read 6 frames in this run (seq 0-5), so 4 and 5 never came; a repeat
        # of the final counts nothing more.
        final = _msg("segnet/stats", {"v": SCHEMA_VERSION, "seq": 91, "stamp_ns": 1, "frame_id": "f",
                                      "encoding": "msgpack"}, encode_map({"final": True, "frames_captured": 6}))
        for _ in range(2):
            sub._decode([memoryview(part) for part in final])
        assert dict(sub.missed) == {"segnet/mask": 5}
