"""ROS 2 bags (MCAP storage, CDR encoding) from the node's streams, for ROS 2 tooling and Foxglove.

A bag is a folder, as ``ros2 bag record`` writes it: ``metadata.yaml`` plus ``<bag>_<i>.mcap``
files. Files are written with ``mcap`` (the ROS 2 profile), messages serialised to CDR by
``rosbags``, schemas are the standard ROS 2 message definitions below:

* ``mask`` -> ``sensor_msgs/msg/Image`` ``mono8`` (class ids)
* ``color_mask``, ``overlay`` -> ``sensor_msgs/msg/Image`` ``bgr8``, or ``sensor_msgs/msg/CompressedImage``
  (``jpeg``) when the node sends JPEG (``--image-encoding jpeg``): passed through, never re-encoded
* ``uncertainty`` -> ``sensor_msgs/msg/Image`` ``32FC1``
* ``info``, ``stats`` -> ``std_msgs/msg/String`` holding JSON
* ``label_info`` (from each info message whose class table changed) -> ``vision_msgs/msg/LabelInfo``:
  ``class_map`` of ``VisionClass {class_id, class_name}``, the mask's pixel values, on a latched
  (transient-local) topic beside the mask, as vision_msgs documents for semantic segmentation; its
  definition is stored in the file, so readers without vision_msgs decode it

``header.stamp`` is the frame's capture time, ``header.frame_id`` the node's frame id, and each
record's log time is the capture time (``stamp_ns``).

Crash safety: an MCAP file is readable only once its footer is written. With
``max_bag_duration`` the bag is split (like ``ros2 bag record --max-bag-duration``) and
``metadata.yaml`` is rewritten atomically after each finished file, so a recorder killed outright
(SIGKILL, power loss) leaves a bag that readers open, less the file in progress. That file is
recovered, up to its last complete chunk, by :func:`recover_bag` (``perception-record --recover DIR``).

A full disk: while recording, the bag folder holds a hidden reserve file (:class:`_SpaceReserve`, about two
chunks plus the summary's size, grown as the bag grows). When a write finds the disk full the reserve is
freed and the file in progress is finished into that space (its chunk, summary, footer, then
``metadata.yaml``), so the bag opens with every message written up to the failure, without ``--recover``.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perception.stream.protocol import json_text

__all__ = ["MSG_DEFINITIONS", "BagWriter", "BagError", "UnrecordableMessage", "ros_message", "recover_bag",
           "ros_topic", "label_info_message", "LABEL_INFO_STREAM"]

# Standard ROS 2 interface definitions, in the concatenated form ROS 2's bag recorder stores in MCAP
# schemas (the message, then each dependency after a line of '=').
_SEP = "=" * 80 + "\n"
_HEADER_DEPS = (
    _SEP + "MSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\nstring frame_id\n"
    + _SEP + "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n"
)
MSG_DEFINITIONS: dict[str, str] = {
    "sensor_msgs/msg/Image": (
        "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\n"
        "uint32 step\nuint8[] data\n" + _HEADER_DEPS
    ),
    "sensor_msgs/msg/CompressedImage": "std_msgs/Header header\nstring format\nuint8[] data\n" + _HEADER_DEPS,
    "std_msgs/msg/String": "string data\n",
    # vision_msgs (ROS 2): a segmentation's class names, on a latched topic beside its mono8 Image.
    "vision_msgs/msg/LabelInfo": (
        "std_msgs/Header header\nvision_msgs/VisionClass[] class_map\nfloat32 threshold\n"
        + _SEP + "MSG: vision_msgs/VisionClass\nuint16 class_id\nstring class_name\n" + _HEADER_DEPS
    ),
}
LABEL_INFO_STREAM = "label_info"  # <namespace>/label_info, written from each info message's class table

# rosbag2's offered_qos_profiles (rmw enums as integers: history 1 keep_last, reliability 1 reliable,
# durability 1 transient_local / 2 volatile, liveliness 1 automatic). info is latched by the node,
# so it is offered transient-local, as a latched ROS 2 topic would be.
_INFINITE = "{sec: 9223372036, nsec: 854775807}"


def _qos(durability: int) -> str:
    return (f"- history: 1\n  depth: 10\n  reliability: 1\n  durability: {durability}\n"
            f"  deadline: {_INFINITE}\n  lifespan: {_INFINITE}\n  liveliness: 1\n"
            f"  liveliness_lease_duration: {_INFINITE}\n  avoid_ros_namespace_conventions: false\n")


def _qos_for(topic: str) -> str:
    return _qos(1 if topic.endswith(("/info", "/" + LABEL_INFO_STREAM)) else 2)


class BagError(ValueError):
    """A bag that cannot be written or recovered."""


class UnrecordableMessage(BagError):
    """One message that has no ROS 2 form (e.g. a stamp beyond ROS 2's time range): skip it."""


def ros_topic(topic: str) -> str:
    """``segnet/mask`` -> ``/segnet/mask`` (ROS 2 names are absolute)."""
    return "/" + topic.strip("/")


def _typestore():
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    if "vision_msgs/msg/LabelInfo" not in store.types:  # not in the Humble core set: from its definition
        types = {}
        types.update(get_types_from_msg("uint16 class_id\nstring class_name\n", "vision_msgs/msg/VisionClass"))
        types.update(get_types_from_msg("std_msgs/Header header\nvision_msgs/VisionClass[] class_map\n"
                                        "float32 threshold\n", "vision_msgs/msg/LabelInfo"))
        store.register(types)
    return store


def label_info_message(msg, typestore) -> Any | None:
    """A ``vision_msgs/msg/LabelInfo`` from an info message's class table (None where it has none):
    class ids in order, as the mono8 mask's pixel values."""
    classes = msg.data.get("classes") if isinstance(msg.data, dict) else None
    if not isinstance(classes, list) or not classes or len(classes) > 255 or not all(isinstance(c, str) for c in classes):
        return None
    t = typestore.types
    sec, nsec = divmod(int(msg.header["stamp_ns"]), 1_000_000_000)
    header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec),
                                      frame_id=str(msg.header.get("frame_id", "")))
    return t["vision_msgs/msg/LabelInfo"](
        header=header, threshold=0.0,
        class_map=[t["vision_msgs/msg/VisionClass"](class_id=i, class_name=c) for i, c in enumerate(classes)])


def ros_message(msg, typestore) -> tuple[str, Any]:
    """(ROS 2 type name, message object of ``typestore``) for one of the node's messages (a
    ``protocol.Message``; JPEG payloads undecoded, as ``Subscriber(decode_jpeg=False)`` returns them)."""
    t = typestore.types
    h = msg.header
    enc = h["encoding"]
    # Every record's log time is its stamp (stats and info too, which have no header): one outside
    # builtin_interfaces/Time's range (sec is an int32) has no ROS 2 form, and would make the bag's
    # metadata claim centuries of duration.
    sec, nsec = divmod(int(h["stamp_ns"]), 1_000_000_000)
    if not 0 <= sec < 2**31:
        raise UnrecordableMessage(f"{msg.topic}: stamp {h['stamp_ns']} ns is outside ROS 2's time range")
    if enc == "msgpack":  # strict JSON: non-finite numbers become null
        return "std_msgs/msg/String", t["std_msgs/msg/String"](data=json_text(msg.data, separators=(",", ":")))
    header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec),
                                      frame_id=str(h.get("frame_id", "")))
    if enc == "jpeg":
        return "sensor_msgs/msg/CompressedImage", t["sensor_msgs/msg/CompressedImage"](
            header=header, format="jpeg", data=np.frombuffer(msg.data, np.uint8))
    img = np.ascontiguousarray(msg.data)
    enc = "mono8" if enc == "png" else enc  # a PNG mask arrives decoded: class ids, one byte each
    return "sensor_msgs/msg/Image", t["sensor_msgs/msg/Image"](
        header=header, height=int(img.shape[0]), width=int(img.shape[1]), encoding=enc, is_bigendian=0,
        step=int(img.strides[0]), data=img.reshape(-1).view(np.uint8))


@dataclass
class _FileStats:
    path: str
    start_ns: int | None = None
    end_ns: int | None = None
    count: int = 0

    def add(self, t: int) -> None:
        self.start_ns = t if self.start_ns is None else min(self.start_ns, t)
        self.end_ns = t if self.end_ns is None else max(self.end_ns, t)
        self.count += 1


@dataclass
class _Topic:
    msgtype: str
    count: int = 0


@dataclass
class _BagState:
    files: list[_FileStats] = field(default_factory=list)
    topics: dict[str, _Topic] = field(default_factory=dict)


def _metadata_yaml(state: _BagState) -> str:
    """rosbag2's metadata.yaml (version 5, read by ROS 2 Humble and later, and by rosbags)."""
    import yaml

    files = [f for f in state.files if f.count]
    start = min((f.start_ns for f in files), default=0)
    end = max((f.end_ns for f in files), default=0)
    info = {
        "version": 5,
        "storage_identifier": "mcap",
        "duration": {"nanoseconds": end - start if files else 0},
        "starting_time": {"nanoseconds_since_epoch": start},
        "message_count": sum(f.count for f in files),
        "topics_with_message_count": [
            {"topic_metadata": {"name": name, "type": t.msgtype, "serialization_format": "cdr",
                                "offered_qos_profiles": _qos_for(name)},
             "message_count": t.count}
            for name, t in state.topics.items()
        ],
        "compression_format": "",
        "compression_mode": "",
        "relative_file_paths": [f.path for f in state.files],
        "files": [{"path": f.path, "starting_time": {"nanoseconds_since_epoch": f.start_ns or 0},
                   "duration": {"nanoseconds": (f.end_ns or 0) - (f.start_ns or 0)}, "message_count": f.count}
                  for f in state.files],
    }
    return yaml.safe_dump({"rosbag2_bagfile_information": info}, sort_keys=False)


RESERVE_NAME = ".perception-record.reserve"  # in the bag folder while recording; removed on close and by recovery
_RESERVE_STEP = 64 << 10
_SUMMARY_BYTES_PER_CHUNK = 512  # a chunk index (~100 B + 10 B a channel) and its share of the statistics
_RESERVE_SLACK = 64 << 10  # header records, the footer and metadata.yaml


class _SpaceReserve:
    """Disk space set aside in the bag folder while recording, so that a bag can still be finished when
    the disk fills: :meth:`release` frees it for the chunk in flight, the summary and ``metadata.yaml``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def ensure(self, size: int) -> bool:
        """Grow the reserve to at least ``size`` bytes; False (and the reserve freed) where the disk has no
        room for it, which means that it is about to fill."""
        if self._fd is None:
            return False
        if size <= self.size:
            return True
        size = -(-size // _RESERVE_STEP) * _RESERVE_STEP
        try:
            os.posix_fallocate(self._fd, 0, size)  # real blocks (a sparse file would reserve nothing)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            self.release()
            return False
        self.size = size
        return True

    def release(self) -> bool:
        """Free the reserved space (once); True where there was space to free."""
        if self._fd is None:
            return False
        os.close(self._fd)
        self._fd = None
        self.path.unlink(missing_ok=True)
        return self.size > 0


class _ReservedStream:
    """The ``.mcap`` file as the MCAP writer sees it: unbuffered writes that, when the disk fills, free the
    reserve once and carry on, and say so (``disk_full``), so that the writer's state stays whole."""

    def __init__(self, path: Path, reserve: _SpaceReserve) -> None:
        self._file = open(path, "wb", buffering=0)
        self.reserve = reserve
        self.disk_full = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += self._file.write(view[done:]) or 0
            except OSError as e:
                if e.errno != errno.ENOSPC or not self.reserve.release():
                    raise
                self.disk_full = True
        return done

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        """Nothing to flush: every write went to the OS."""

    def close(self) -> None:
        self._file.close()


class BagWriter:
    """Write the node's messages into a ROS 2 bag folder.

    ``max_bag_duration``: start a new ``.mcap`` file after this many seconds of wall time (None: one
    file). ``metadata.yaml`` always lists only finished files, so the folder opens at any moment.
    When the disk fills, the bag is finished with the messages written so far and :attr:`disk_full` turns
    True; later writes raise ``OSError`` (ENOSPC).
    """

    def __init__(self, out: str | Path, *, max_bag_duration: float | None = None,
                 chunk_size: int = 1 << 20) -> None:
        try:
            import mcap.writer  # noqa: F401

            self.typestore = _typestore()
        except ImportError as e:
            raise BagError("MCAP recording needs mcap and rosbags: pip install 'segnet-perception[viz]'") from e
        self.out = Path(out)
        if (self.out / "metadata.yaml").exists() or any(self.out.glob("*.mcap")):
            raise BagError(f"{self.out} already holds a bag; choose a new --out folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.name = self.out.resolve().name
        self.max_bag_duration = max_bag_duration
        self.chunk_size = chunk_size
        self.state = _BagState()
        self._file = None
        self._writer = None
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self._opened_at = 0.0
        self._label_tables: dict[str, list[str]] = {}  # namespace -> the class table last written
        self.messages = 0
        self.disk_full = False
        self._largest = 0  # the largest serialised message so far: the chunk in flight can hold one more
        self._bytes = 0
        self._reserve = _SpaceReserve(self.out / RESERVE_NAME)
        if not self._reserve.ensure(self._reserve_needed()):
            self._reserve.release()
            raise BagError(f"{self.out} has no room for a bag (less than {self._reserve_needed() >> 10} KiB free)")

    def _reserve_needed(self) -> int:
        """Room to finish the file in progress: the chunk in flight (up to a chunk plus one message, and its
        message index) twice over, the summary of every chunk so far, headers and metadata.yaml."""
        chunks = self._bytes // self.chunk_size + 1
        return 2 * (self.chunk_size + self._largest) + chunks * _SUMMARY_BYTES_PER_CHUNK + _RESERVE_SLACK

    def _open_file(self) -> None:
        from mcap.writer import CompressionType, Writer

        stats = _FileStats(f"{self.name}_{len(self.state.files)}.mcap")
        self._file = _ReservedStream(self.out / stats.path, self._reserve)
        self._writer = Writer(self._file, chunk_size=self.chunk_size, compression=CompressionType.ZSTD)
        self._writer.start(profile="ros2", library="segnet-perception")
        self._schemas, self._channels = {}, {}
        self.state.files.append(stats)
        self._opened_at = time.monotonic()

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.finish()
        self._file.close()
        self._writer = self._file = None
        from perception.core.fileio import atomic_write_bytes

        atomic_write_bytes(self.out / "metadata.yaml", _metadata_yaml(self.state).encode())

    def write(self, msg) -> None:
        """Write one ``protocol.Message``."""
        if self.disk_full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.out))
        if self._writer is not None and self.max_bag_duration is not None \
                and time.monotonic() - self._opened_at >= self.max_bag_duration:
            self._close_file()
        if self._writer is None:
            self._open_file()
        msgtype, message = ros_message(msg, self.typestore)
        self._add(ros_topic(msg.topic), msgtype, message, msg.header)
        if msg.stream == "info" and not self.disk_full:  # the class table, as ROS 2 tools look for it (vision_msgs, latched)
            label_info = label_info_message(msg, self.typestore)
            ns = msg.topic.rsplit("/", 1)[0]
            if label_info is not None and self._label_tables.get(ns) != msg.data["classes"]:
                self._label_tables[ns] = list(msg.data["classes"])
                self._add(ros_topic(f"{ns}/{LABEL_INFO_STREAM}"), "vision_msgs/msg/LabelInfo", label_info, msg.header)

    def _add(self, topic: str, msgtype: str, message: Any, header: dict) -> None:
        known = self.state.topics.get(topic)
        if known is not None and known.msgtype != msgtype:
            raise BagError(f"{topic} changed type from {known.msgtype} to {msgtype} mid-recording "
                           "(the node's --image-encoding changed); record into a new bag")
        channel = self._channels.get(topic)
        if channel is None:
            schema = self._schemas.get(msgtype)
            if schema is None:
                schema = self._schemas[msgtype] = self._writer.register_schema(
                    msgtype, "ros2msg", MSG_DEFINITIONS[msgtype].encode())
            # The channel carries its QoS too, as rosbag2 writes it (readers match it to metadata.yaml).
            channel = self._channels[topic] = self._writer.register_channel(
                topic, "cdr", schema, {"offered_qos_profiles": _qos_for(topic)})
        stamp = int(header["stamp_ns"])
        data = bytes(self.typestore.serialize_cdr(message, msgtype))
        self._largest = max(self._largest, len(data))
        if not self._reserve.ensure(self._reserve_needed()):  # the disk is all but full: finish the bag now
            self._finish_full()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.out))
        # Each finished chunk goes to the OS at once (unbuffered), so a killed recorder loses at most the
        # chunk it was filling.
        self._writer.add_message(channel, log_time=stamp, data=data, publish_time=stamp,
                                 sequence=int(header["seq"]) & 0xFFFFFFFF)
        self._bytes += len(data)
        self.state.topics.setdefault(topic, _Topic(msgtype)).count += 1
        self.state.files[-1].add(stamp)
        self.messages += 1
        if self._file.disk_full:  # written into the freed reserve: finish the bag while there is room
            self._finish_full()

    def _finish_full(self) -> None:
        self.disk_full = True
        self._close_file()

    def close(self) -> None:
        try:
            self._close_file()
        finally:
            self._reserve.release()
        if not self.state.files:  # nothing arrived: still a valid, empty bag
            from perception.core.fileio import atomic_write_bytes

            atomic_write_bytes(self.out / "metadata.yaml", _metadata_yaml(self.state).encode())

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_records(path: Path) -> tuple[list, bool]:
    """The complete records of an MCAP file, and whether the file ended cleanly (a footer and the closing
    magic: a file missing only its last bytes has a footer, yet no reader opens it)."""
    import struct

    from mcap.exceptions import McapError
    from mcap.records import Footer
    from mcap.stream_reader import StreamReader

    records = []
    footer = False
    with open(path, "rb") as f:
        try:
            for rec in StreamReader(f, skip_magic=False).records:
                records.append(rec)
                footer = footer or isinstance(rec, Footer)
        # Cut inside a record or chunk: keep what came before. The reader raises struct.error on a record
        # cut inside its fixed fields, and others on cuts elsewhere; any of them ends the reading here.
        except (McapError, EOFError, ValueError, OSError, struct.error, IndexError, KeyError, UnicodeDecodeError):
            pass
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - len(MCAP_MAGIC)))
        ends_with_magic = size >= 2 * len(MCAP_MAGIC) and f.read() == MCAP_MAGIC
    return records, footer and ends_with_magic


MCAP_MAGIC = b"\x89MCAP0\r\n"


def _keep_original(path: Path) -> None:
    """Keep ``path`` as ``<name>.orig`` (a name readers do not pick up) before it is replaced."""
    original = path.with_name(path.name + ".orig")
    if original.exists():
        raise BagError(f"{original} exists (an earlier recovery's original): move it away first")
    try:
        os.link(path, original)
    except OSError:  # a file system without hard links
        shutil.copy2(path, original)


def recover_bag(folder: str | Path) -> dict[str, int]:
    """Make a bag whose recorder was killed readable again: every ``.mcap`` file without a footer is
    rewritten (atomically) from its complete records, the original kept beside it as ``<name>.orig``,
    and ``metadata.yaml`` is rebuilt from the files. Returns ``{file name: messages kept}`` for the
    files it rewrote. A folder holding a ``.mcap`` file that is not MCAP (no magic) is refused before
    anything is written."""
    from mcap.records import Channel, Message, Schema
    from mcap.writer import Writer

    from perception.core.fileio import atomic_write_bytes

    folder = Path(folder)
    paths = sorted(folder.glob("*.mcap"), key=lambda p: (len(p.name), p.name))
    if folder.exists() and not folder.is_dir():
        raise BagError(f"{folder} is a file; a bag is a folder of .mcap files and metadata.yaml")
    if not paths:
        raise BagError(f"{folder} holds no .mcap files")
    empty = [p for p in paths if p.stat().st_size < len(MCAP_MAGIC)]  # killed right after a split
    for path in paths:
        with open(path, "rb") as f:
            if path not in empty and f.read(len(MCAP_MAGIC)) != MCAP_MAGIC:
                raise BagError(f"{path} is not an MCAP file (no MCAP magic at its start); nothing was changed")
    state = _BagState()
    rewritten: dict[str, int] = {}
    for path in empty:  # nothing to recover: set aside (kept, as every original is) so readers skip it
        _keep_original(path)
        path.unlink()
        rewritten[path.name] = 0
    for path in (p for p in paths if p not in empty):
        records, complete = _read_records(path)
        schemas = {r.id: r for r in records if isinstance(r, Schema)}
        channels = {r.id: r for r in records if isinstance(r, Channel)}
        messages = [r for r in records if isinstance(r, Message) and r.channel_id in channels]
        if not complete:
            tmp = path.with_name(f".{path.name}.recovering")
            with open(tmp, "wb") as f:
                w = Writer(f)
                w.start(profile="ros2", library="segnet-perception recover")
                schema_ids = {sid: w.register_schema(s.name, s.encoding, s.data) for sid, s in schemas.items()}
                channel_ids = {cid: w.register_channel(c.topic, c.message_encoding,
                                                       schema_ids.get(c.schema_id, 0), c.metadata)
                               for cid, c in channels.items()}
                for m in messages:
                    w.add_message(channel_ids[m.channel_id], m.log_time, m.data, m.publish_time, m.sequence)
                w.finish()
            _keep_original(path)
            tmp.replace(path)
            rewritten[path.name] = len(messages)
        stats = _FileStats(path.name)
        for m in messages:
            stats.add(m.log_time)
            c = channels[m.channel_id]
            s = schemas.get(c.schema_id)
            state.topics.setdefault(c.topic, _Topic(s.name if s else "")).count += 1
        state.files.append(stats)
    atomic_write_bytes(folder / "metadata.yaml", _metadata_yaml(state).encode())
    (folder / RESERVE_NAME).unlink(missing_ok=True)  # a killed recorder's reserve
    return rewritten
