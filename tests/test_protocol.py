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
    msg = decode_message(_msg("segnet/mask", h, bytes(encode_image(img, encoding))))
    assert msg.stream == "mask" and msg.header["seq"] == 3
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
        ([b"s/mask", encode_header(_hdr(encoding="rgb16")), b"1234"], "unknown encoding"),
        ([b"s/mask", encode_header(_hdr(height=-1)), b""], "invalid"),
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
                NodeSettings(wait_for_subscribers=1, wait_timeout_s=30), log=lambda m: None)
    t = threading.Thread(target=node.run, daemon=True)
    t.start()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    t.join(timeout=30)
    pub.close()
    assert r.returncode == 0, r.stderr
    shape, dtype, top = r.stdout.split(")")[0] + ")", r.stdout.split()[-2], int(r.stdout.split()[-1])
    assert shape == "(48, 64)" and dtype == "uint8" and 0 <= top < 3
