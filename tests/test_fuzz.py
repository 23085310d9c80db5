"""Property-based fuzzing (hypothesis) of what a consumer does with bytes from the network: decoding
either yields a well-formed message or raises ProtocolError, never anything else, and whatever decodes
can be printed by perception-echo and recorded as a ROS 2 message without an exception."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from perception.stream.protocol import (  # noqa: E402
    SCHEMA_VERSION,
    Limits,
    Message,
    ProtocolError,
    decode_message,
    encode_header,
)

SMALL = Limits(max_message_bytes=1 << 20, max_image_pixels=1 << 16)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack-able values of every kind a hostile peer could put in a header or a map.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
HEADER_KEYS = ["v", "seq", "stamp_ns", "frame_id", "encoding", "height", "width", "step", "latency_ms",
               "model_id", "class_pixels"]


@st.composite
def headers(draw) -> dict:
    """Mostly plausible headers with some fields replaced by anything."""
    enc = draw(st.sampled_from(["mono8", "bgr8", "32FC1", "jpeg", "msgpack", "rgba16", ""]))
    h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    header = {"v": SCHEMA_VERSION, "seq": draw(st.integers(0, 2**40)), "stamp_ns": draw(st.integers(0, 2**62)),
              "frame_id": "camera", "encoding": enc, "height": h, "width": w,
              "step": w * {"bgr8": 3, "32FC1": 4}.get(enc, 1)}
    for key in draw(st.lists(st.sampled_from(HEADER_KEYS), max_size=3, unique=True)):
        if draw(st.booleans()):
            header[key] = draw(values)
        else:
            header.pop(key, None)
    return header


def _consume(msg: Message) -> None:
    """What perception-echo and perception-record --format mcap do with a decoded message."""
    from perception.stream.consumers.echo import summarize
    from perception.stream.consumers.rosbag import ros_message

    from perception.stream.consumers.rosbag import UnrecordableMessage

    summarize(msg, areas=True, classes=["a", "b"])
    json.dumps({"topic": msg.topic, "header": msg.header, "data": msg.data if isinstance(msg.data, dict) else None})
    try:
        msgtype, ros = ros_message(msg, _STORE)
    except UnrecordableMessage:
        return  # perception-record skips it, warns and counts
    _STORE.serialize_cdr(ros, msgtype)


_STORE = None


def setup_module() -> None:
    global _STORE
    pytest.importorskip("rosbags")
    from perception.stream.consumers.rosbag import _typestore

    _STORE = _typestore()


@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_arbitrary_frames_decode_or_raise_protocol_error(frames):
    try:
        decode_message(frames, SMALL)
    except ProtocolError:
        pass


@FUZZ
@given(header=headers(), payload=st.binary(max_size=5000), topic=st.sampled_from(
    ["segnet/mask", "segnet/overlay", "segnet/stats", "segnet/info", "segnet/uncertainty", "x", ""]))
def test_hostile_headers_are_refused_or_consumed_safely(header, payload, topic):
    _receive(topic.encode(), header, lambda: payload)


@FUZZ
@given(header=headers(), data=st.dictionaries(st.text(max_size=10), values, max_size=6))
def test_hostile_stats_and_info_maps_are_refused_or_consumed_safely(header, data):
    header["encoding"] = "msgpack"
    _receive(b"segnet/stats", header, lambda: msgpack.packb(data, use_bin_type=True))


def _receive(topic: bytes, header: dict, payload) -> None:
    """Encode what a hostile publisher could send, then decode and consume it as a client does."""
    try:
        frames = [topic, encode_header(header), payload()]
    except (TypeError, ValueError, OverflowError):
        return  # not even msgpack-encodable: cannot arrive on the wire
    try:
        msg = decode_message(frames, SMALL)
    except ProtocolError:
        return
    _consume(msg)


@FUZZ
@given(h=st.integers(1, 20), w=st.integers(1, 20), pad=st.integers(0, 8), enc=st.sampled_from(["mono8", "bgr8", "32FC1"]))
def test_valid_images_with_padded_rows_round_trip(h, w, pad, enc):
    """The positive side: any legal raw image, rows padded by ``pad`` bytes, decodes to its pixels."""
    dtype, channels = {"mono8": ("u1", 1), "bgr8": ("u1", 3), "32FC1": ("<f4", 1)}[enc]
    rng = np.random.default_rng(h * 1000 + w * 10 + pad)
    img = rng.integers(0, 255, (h, w, channels)).astype(dtype)
    row = w * channels * np.dtype(dtype).itemsize
    buf = np.zeros((h, row + pad), np.uint8)
    buf[:, :row] = img.reshape(h, -1).view(np.uint8)
    header = {"v": SCHEMA_VERSION, "seq": 1, "stamp_ns": 2, "frame_id": "c", "encoding": enc,
              "height": h, "width": w, "step": row + pad}
    topic = {"mono8": b"segnet/mask", "bgr8": b"segnet/overlay", "32FC1": b"segnet/uncertainty"}[enc]
    msg = decode_message([topic, encode_header(header), buf.tobytes()], SMALL)
    assert np.array_equal(msg.data, img if channels == 3 else img[..., 0])
    _consume(msg)
