"""The node's wire format, shared by the publisher and every subscriber so the two cannot drift.

A message is a ZeroMQ multipart message of three frames::

    [topic, header, payload]

* ``topic``: UTF-8 ``<namespace>/<stream>``, e.g. ``segnet/mask``.
* ``header``: a msgpack map; see :data:`REQUIRED_HEADER_KEYS` and docs/protocol.md.
* ``payload``: raw bytes. For raw image encodings, row-major ``step * height`` bytes; for ``jpeg`` a
  JPEG file; for ``info`` and ``stats`` (encoding ``msgpack``) a msgpack map.

Decoding is bounded: messages, maps, arrays and strings above fixed limits are rejected before they
are materialised, so a malformed or hostile peer cannot exhaust a consumer's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "STREAMS",
    "FRAME_STREAMS",
    "ENCODINGS",
    "REQUIRED_HEADER_KEYS",
    "Limits",
    "ProtocolError",
    "Message",
    "topic_for",
    "split_topic",
    "encode_header",
    "decode_header",
    "encode_map",
    "decode_map",
    "image_header",
    "encode_image",
    "decode_message",
    "jpeg_size",
    "png_size",
    "COMPRESSED_ENCODINGS",
    "payload_crc32",
    "REJECT_REASONS",
    "STREAM_ENCODINGS",
    "json_safe",
    "json_text",
    "encode_jpeg",
]

SCHEMA_VERSION = 1
FRAME_STREAMS = ("mask", "color_mask", "overlay", "uncertainty")
STREAMS = FRAME_STREAMS + ("stats", "info")

# encoding -> (numpy dtype, channels), ROS sensor_msgs/Image names.
ENCODINGS: dict[str, tuple[str, int]] = {
    "mono8": ("u1", 1),
    "bgr8": ("u1", 3),
    "32FC1": ("<f4", 1),
}
# Compressed image encodings: the payload is a file (JPEG for colour images; PNG, lossless, for
# class-id masks), and the header's step is 0.
COMPRESSED_ENCODINGS = ("jpeg", "png")
PNG_LEVEL = 6  # zlib level for PNG masks: most of the size gain at a sixth of level 9's cost (docs/benchmarks.md)
REQUIRED_HEADER_KEYS = ("v", "seq", "stamp_ns", "frame_id", "encoding")
IMAGE_HEADER_KEYS = ("height", "width", "step")


class ProtocolError(ValueError):
    """A message that does not follow the protocol (or exceeds the decoding limits).

    ``reason`` is a short category (one of :data:`REJECT_REASONS`) that consumers count rejections by.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


REJECT_REASONS = ("over a limit", "malformed msgpack", "bad header", "bad frames", "wrong stream",
                  "bad image", "bad jpeg", "bad png", "checksum", "malformed")


@dataclass(frozen=True)
class Limits:
    """Upper bounds a consumer applies when decoding network input (message, header, maps, arrays, strings,
    image pixels, nesting depth): nothing decoded from the wire is larger."""

    max_message_bytes: int = 64 << 20  # the whole multipart message
    max_header_bytes: int = 64 << 10
    max_map_len: int = 256
    max_array_len: int = 4096
    max_str_len: int = 64 << 10
    max_image_pixels: int = 64 << 20
    # Maps and arrays nested deeper than this are malformed (the node's deepest is 3): consumers walk
    # decoded values recursively (printing, JSON, CDR) and must not meet Python's recursion limit.
    max_depth: int = 16


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """One decoded message: its topic, stream name, header (ROS-style stamp, frame id, seq, ...) and data
    (an array for image streams, a dict for info and stats)."""

    topic: str
    stream: str
    header: dict[str, Any]
    data: Any  # numpy array for image streams, dict for info/stats, bytes for jpeg when not decoded


def topic_for(namespace: str, stream: str) -> str:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; streams: {STREAMS}")
    namespace = namespace.strip("/")
    return f"{namespace}/{stream}" if namespace else stream


def split_topic(topic: str) -> tuple[str, str]:
    ns, _, stream = topic.rpartition("/")
    return ns, stream


def _unpack(data: bytes, limits: Limits) -> Any:
    try:
        out = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_map_len=limits.max_map_len,
            max_array_len=limits.max_array_len, max_str_len=limits.max_str_len,
            # Headers and maps carry no binary values (payloads travel in their own frame): a bin
            # value is malformed, and would break every consumer that prints or re-encodes a header.
            max_bin_len=0, max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as e:
        raise ProtocolError(f"malformed msgpack: {e}", reason="malformed msgpack") from None
    if _holds_bytes(out, limits.max_depth):  # max_bin_len=0 still lets an empty bin through
        raise ProtocolError("malformed msgpack: binary values are not allowed in headers and maps", reason="malformed msgpack")
    return out


def _holds_bytes(obj: Any, max_depth: int) -> bool:
    """Whether a decoded value holds a bin anywhere; iterative (a deep value cannot exhaust Python's
    recursion limit) and bounded: nesting deeper than ``max_depth`` is malformed."""
    stack = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, bytes):
            return True
        if isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise ProtocolError(f"malformed msgpack: nested deeper than {max_depth} levels", reason="malformed msgpack")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def encode_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def decode_header(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    if len(data) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(data)} bytes exceeds the limit of {limits.max_header_bytes}", reason="over a limit")
    header = _unpack(data, limits)
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map", reason="bad header")
    missing = [k for k in REQUIRED_HEADER_KEYS if k not in header]
    if missing:
        raise ProtocolError(f"header lacks {missing}", reason="bad header")
    if not _is_int(header["v"]) or header["v"] > SCHEMA_VERSION:
        raise ProtocolError(f"schema version {header['v']!r} is not supported (this side speaks {SCHEMA_VERSION})",
                            reason="bad header")
    for key, ok, what in _HEADER_TYPES:
        if key in header and not ok(header[key]):
            raise ProtocolError(f"header field {key!r} must be {what}, got {type(header[key]).__name__}", reason="bad header")
    return header


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number_map(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, (int, float)) and not isinstance(x, bool) for k, x in v.items()
    )


# The types every consumer may rely on, checked where a key is present.
_HEADER_TYPES = (
    ("seq", lambda v: _is_int(v) and 0 <= v < 2**63, "an integer in [0, 2^63)"),
    ("stamp_ns", lambda v: _is_int(v) and 0 <= v < 2**63, "an integer in [0, 2^63)"),
    ("frame_id", lambda v: isinstance(v, str), "a string"),
    ("encoding", lambda v: isinstance(v, str), "a string"),
    ("height", _is_int, "an integer"),
    ("width", _is_int, "an integer"),
    ("step", _is_int, "an integer"),
    ("latency_ms", _is_number_map, "a map of stage name to milliseconds"),
    ("model_id", lambda v: isinstance(v, str), "a string"),
    ("class_pixels", lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
     "a list of non-negative integers"),
    ("crc32", lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2^32)"),
)


def payload_crc32(payload: bytes | memoryview | np.ndarray) -> int:
    """The ``crc32`` header field: zlib's CRC-32 of the payload frame's bytes, as sent."""
    import zlib

    return zlib.crc32(memoryview(payload).cast("B") if isinstance(payload, np.ndarray) else payload)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header (SOF), read without decoding; None when the data
    is not a JPEG or has no frame header before its scan data."""
    b = bytes(data[: 1 << 20]) if len(data) > 1 << 20 else bytes(data)  # the SOF sits near the start
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        length = int.from_bytes(b[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if i + 9 > len(b):
                return None
            return int.from_bytes(b[i + 5 : i + 7], "big"), int.from_bytes(b[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def png_size(data: bytes | memoryview) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) from a PNG's IHDR chunk, read without decoding; None
    when the data is not a PNG."""
    b = bytes(data[:33])
    if len(b) < 33 or b[:8] != b"\x89PNG\r\n\x1a\n" or b[12:16] != b"IHDR":
        return None
    return int.from_bytes(b[20:24], "big"), int.from_bytes(b[16:20], "big"), b[24], b[25]


def encode_map(data: dict[str, Any]) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def decode_map(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    if len(data) > limits.max_header_bytes * 16:
        raise ProtocolError(f"map payload of {len(data)} bytes is too large", reason="over a limit")
    out = _unpack(data, limits)
    if not isinstance(out, dict):
        raise ProtocolError("payload is not a map", reason="malformed msgpack")
    return out


def image_header(
    *, seq: int, stamp_ns: int, frame_id: str, image: np.ndarray | None = None, encoding: str,
    height: int | None = None, width: int | None = None, **extra: Any,
) -> dict[str, Any]:
    """Header for an image stream; ``step`` is derived from the raw array when one is given."""
    h: dict[str, Any] = {"v": SCHEMA_VERSION, "seq": int(seq), "stamp_ns": int(stamp_ns), "frame_id": frame_id,
                         "encoding": encoding}
    if image is not None:
        h["height"], h["width"] = int(image.shape[0]), int(image.shape[1])
        h["step"] = int(image.strides[0]) if encoding not in COMPRESSED_ENCODINGS else 0
    else:
        h["height"], h["width"], h["step"] = int(height or 0), int(width or 0), 0
    h.update(extra)
    return h


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """``image`` (BGR or grey uint8) as JPEG bytes: the one JPEG encoder of the node and its consumers."""
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def encode_image(image: np.ndarray, encoding: str) -> np.ndarray | bytes:
    """The payload for ``image`` in ``encoding``: a C-contiguous array (sent without copying) or JPEG bytes."""
    if encoding == "jpeg":
        return encode_jpeg(image)
    if encoding == "png":  # class-id masks only: 8-bit, one channel, lossless
        import cv2

        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"png masks need uint8 with 1 channel, got {image.dtype} {image.shape}")
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
        if not ok:
            raise ValueError("PNG encoding failed")
        return buf.tobytes()
    dtype, channels = ENCODINGS[encoding]
    if image.dtype != np.dtype(dtype) or (image.ndim == 3) != (channels > 1):
        raise ValueError(f"{encoding} needs {dtype} with {channels} channel(s), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _decode_image(header: dict[str, Any], payload: memoryview | bytes, limits: Limits, decode_jpeg: bool) -> Any:
    enc = header["encoding"]
    for k in IMAGE_HEADER_KEYS:
        if not isinstance(header.get(k), int) or header[k] < 0:
            raise ProtocolError(f"image header field {k!r} missing or invalid", reason="bad image")
    h, w, step = header["height"], header["width"], header["step"]
    if h * w > limits.max_image_pixels:
        raise ProtocolError(f"{w}x{h} image exceeds the pixel limit", reason="over a limit")
    if enc == "jpeg":
        # Check the JPEG's own size before decoding (a small header over a huge JPEG is a decompression
        # bomb), and also where it is passed on undecoded (to browsers, Foxglove, bags).
        size = jpeg_size(payload)
        if size != (h, w):
            raise ProtocolError(f"JPEG payload is {size[1]}x{size[0]}, header says {w}x{h}" if size
                                else "JPEG payload has no readable frame header", reason="bad jpeg")
        if not decode_jpeg:
            return bytes(payload)
        import cv2

        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if img is None or img.shape[:2] != (h, w):
            raise ProtocolError("JPEG payload does not decode to the header's size", reason="bad jpeg")
        return img
    if enc == "png":
        import cv2

        # As for JPEG: the PNG's own header must match before anything is inflated.
        info = png_size(payload)
        if info is None or info[:2] != (h, w):
            raise ProtocolError(f"PNG payload is {info[1]}x{info[0]}, header says {w}x{h}" if info
                                else "PNG payload has no readable IHDR", reason="bad png")
        if info[2:] != (8, 0):
            raise ProtocolError("PNG masks must be 8-bit greyscale", reason="bad png")
        img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None or img.shape != (h, w) or img.dtype != np.uint8:
            raise ProtocolError("PNG payload does not decode to the header's size", reason="bad png")
        return img
    if enc not in ENCODINGS:
        raise ProtocolError(f"unknown encoding {enc!r}", reason="bad image")
    dtype, channels = ENCODINGS[enc]
    itemsize = np.dtype(dtype).itemsize
    if step < w * channels * itemsize:
        raise ProtocolError(f"step {step} is smaller than a row ({w * channels * itemsize} bytes)", reason="bad image")
    if len(payload) != step * h:
        raise ProtocolError(f"payload is {len(payload)} bytes, header says {step} x {h}", reason="bad image")
    flat = np.frombuffer(payload, np.uint8).reshape(h, step)[:, : w * channels * itemsize]
    arr = flat.view(dtype).reshape((h, w, channels) if channels > 1 else (h, w))
    return arr


# What each stream may carry: consumers (echo, record, the view, the Foxglove bridge) rely on it, so a
# message that does not fit its stream is rejected here, once, rather than met by each of them.
STREAM_ENCODINGS: dict[str, tuple[str, ...]] = {
    "mask": ("mono8", "png"),
    "color_mask": ("bgr8", "jpeg"),
    "overlay": ("bgr8", "jpeg"),
    "uncertainty": ("32FC1",),
    "stats": ("msgpack",),
    "info": ("msgpack",),
}


def _check_stream(stream: str, header: dict[str, Any]) -> None:
    allowed = STREAM_ENCODINGS.get(stream)
    if allowed is None:
        raise ProtocolError(f"unknown stream {stream!r}", reason="wrong stream")
    if header["encoding"] not in allowed:
        raise ProtocolError(f"{stream} carries {', '.join(allowed)}, not {header['encoding']!r}", reason="wrong stream")
    if stream in FRAME_STREAMS and not (_is_int(header.get("height")) and _is_int(header.get("width"))
                                        and header["height"] > 0 and header["width"] > 0):
        raise ProtocolError(f"{stream} image of {header.get('width')}x{header.get('height')} pixels: must be at "
                            "least 1x1", reason="bad image")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: JSON has no NaN or Infinity (browsers'
    JSON.parse and ROS String readers reject them). Iterative, for maps of any decoded depth."""
    import math

    def fix(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    if not isinstance(value, (dict, list)):
        return fix(value)
    root: Any = {} if isinstance(value, dict) else []
    stack = [(value, root)]
    while stack:
        src, dst = stack.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for k, v in items:
            if isinstance(v, (dict, list)):
                child: Any = {} if isinstance(v, dict) else []
                stack.append((v, child))
                v = child
            else:
                v = fix(v)
            if isinstance(dst, dict):
                dst[k] = v
            else:
                dst.append(v)
    return root


def json_text(value: Any, **kwargs: Any) -> str:
    """Strict JSON of a decoded map (non-finite floats as null): what consumers write to pages and files."""
    import json

    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def decode_message(frames: list, limits: Limits = DEFAULT_LIMITS, *, decode_jpeg: bool = True) -> Message:
    """Decode one received multipart message (a list of bytes / zmq.Frame / memoryview)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames [topic, header, payload], got {len(frames)}", reason="bad frames")
    parts = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    total = sum(len(p) for p in parts)
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {limits.max_message_bytes}", reason="over a limit")
    try:
        topic = bytes(parts[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("topic is not UTF-8", reason="bad frames") from None
    _, stream = split_topic(topic)
    header = decode_header(bytes(parts[1]), limits)
    _check_stream(stream, header)
    payload = parts[2]
    if "crc32" in header and payload_crc32(payload) != header["crc32"]:
        raise ProtocolError("payload does not match the header's crc32 (corrupted in flight)", reason="checksum")
    if header["encoding"] == "msgpack":
        data: Any = decode_map(bytes(payload), limits)
    else:
        data = _decode_image(header, payload, limits, decode_jpeg)
    return Message(topic, stream, header, data)
