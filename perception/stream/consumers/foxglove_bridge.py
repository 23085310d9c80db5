"""``perception-foxglove``: a live bridge from a node to the Foxglove app, over Foxglove's WebSocket
protocol (``foxglove-sdk``).

    perception-foxglove tcp://127.0.0.1:5555            # then, in Foxglove: Open connection ->
                                                        # Foxglove WebSocket -> ws://127.0.0.1:8765

Channels (``<ns>`` is the node's namespace):

=======================  ==========================================================================
``/<ns>/mask``           ``foxglove.RawImage`` mono8, class ids
``/<ns>/color_mask``     ``foxglove.CompressedImage`` jpeg (``--image-format raw``: ``RawImage`` bgr8)
``/<ns>/overlay``        as ``color_mask``
``/<ns>/uncertainty``    ``foxglove.RawImage`` 32FC1 (Bayesian models)
``/<ns>/stats``          JSON, the node's stats map
``/<ns>/info``           JSON, the node's info map (classes, palette, model)
``/<ns>/label_info``     JSON, the class table as vision_msgs/LabelInfo's fields (``class_map`` of
                         ``{class_id, class_name}``: the mask's pixel values; ``threshold``)
=======================  ==========================================================================

Messages carry the node's capture time (``timestamp`` and log time) and ``frame_id``. The bridge
subscribes upstream only to the streams some Foxglove client is watching, and drops a stream when the
last one stops, so the node computes only what is looked at.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from typing import Any

from dataclasses import dataclass

from perception.core.cli import fail
from perception.core.options import add_arguments, at_least, opt, parse_into, positive
from perception.stream.consumers.gate import ConnectionGate
from perception.stream.ondemand import OnDemandTopics
from perception.stream.protocol import json_safe
from perception.stream.security import ClientKeyOptions

__all__ = ["FoxgloveBridge", "FoxgloveOptions", "build_parser", "main"]

_IMAGE_STREAMS = ("color_mask", "overlay")
MAX_CONNECTIONS = 64  # open connections (Foxglove clients, handshakes in progress); more are closed at once
REQUEST_TIMEOUT_S = 10.0  # a connection must send its whole WebSocket upgrade request within this
DEFAULT_BACKLOG = 16  # messages queued per Foxglove client (a few frames of each stream it watches)
# JSON schemas so Foxglove's panels know the fields (they accept any object beyond these).
_STATS_SCHEMA = {"type": "object", "properties": {
    "fps": {"type": "number"}, "frames_processed": {"type": "integer"}, "frames_dropped": {"type": "integer"},
    "source_state": {"type": "string"}, "source_reconnects": {"type": "integer"},
    "latency_ms": {"type": "object"}, "uptime_s": {"type": "number"}, "final": {"type": "boolean"}}}
_INFO_SCHEMA = {"type": "object", "properties": {
    "model_id": {"type": "string"}, "architecture": {"type": "string"},
    "classes": {"type": "array", "items": {"type": "string"}},
    "palette": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    "backend": {"type": "string"}, "source": {"type": "string"}, "frame_id": {"type": "string"}}}


_LABEL_INFO_SCHEMA = {"type": "object", "properties": {
    "class_map": {"type": "array", "items": {"type": "object", "properties": {
        "class_id": {"type": "integer"}, "class_name": {"type": "string"}}}},
    "threshold": {"type": "number"}}}


def _upstream(channel_key: str) -> str:
    """The node topic that feeds a channel: ``<prefix>/label_info`` is made from ``<prefix>/info``."""
    return channel_key[: -len("label_info")] + "info" if channel_key.endswith("/label_info") else channel_key


class FoxgloveBridge:
    """Forward a node's streams to Foxglove clients. ``port=0`` picks a free port (see ``.port``).

    Foxglove calls ``on_subscribe``/``on_unsubscribe`` from its own threads; they only queue the
    change, and :meth:`run` applies it to the ZeroMQ socket, which belongs to one thread.
    """

    def __init__(self, endpoint: str, *, namespace: str = "segnet", host: str = "127.0.0.1", port: int = 8765,
                 image_format: str = "jpeg", name: str = "segnet-perception",
                 curve: tuple[str, str] | None = None, cameras: list[str] | None = None,
                 backlog: int = DEFAULT_BACKLOG, max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        import foxglove
        from foxglove.channels import CompressedImageChannel, RawImageChannel

        from perception.stream.client import Subscriber

        if image_format not in ("jpeg", "raw"):
            raise ValueError("image_format must be 'jpeg' or 'raw'")
        self.namespace = namespace.strip("/")
        self.image_format = image_format
        self.context = foxglove.Context()
        self._changes: queue.SimpleQueue[tuple[str, int, bool]] = queue.SimpleQueue()
        self._on_demand = OnDemandTopics(_upstream)  # upstream subscriptions while a client watches
        self.forwarded: dict[str, int] = {}
        self.skipped = 0
        # Channels by the node's topic: one set per camera of a node that runs several (cameras=[...]).
        prefixes = [f"{self.namespace}/{c}".strip("/") for c in cameras] if cameras else [self.namespace]
        self.channels: dict[str, Any] = {}
        for prefix in prefixes:
            def topic(stream: str) -> str:
                return f"{prefix}/{stream}" if prefix else stream

            for stream in ("mask", "uncertainty"):
                self.channels[topic(stream)] = RawImageChannel("/" + topic(stream), context=self.context)
            for stream in _IMAGE_STREAMS:
                cls = CompressedImageChannel if image_format == "jpeg" else RawImageChannel
                self.channels[topic(stream)] = cls("/" + topic(stream), context=self.context)
            self.channels[topic("stats")] = foxglove.Channel("/" + topic("stats"), schema=_STATS_SCHEMA,
                                                             context=self.context)
            self.channels[topic("info")] = foxglove.Channel("/" + topic("info"), schema=_INFO_SCHEMA,
                                                            context=self.context)
            # The class table as vision_msgs/LabelInfo's fields, from the node's info messages.
            self.channels[topic("label_info")] = foxglove.Channel("/" + topic("label_info"),
                                                                  schema=_LABEL_INFO_SCHEMA, context=self.context)
        self._by_id = {ch.id(): key for key, ch in self.channels.items()}
        # Nothing subscribed upstream until a Foxglove client asks; JPEG passes through undecoded.
        self.sub = Subscriber(endpoint, topics=[], decode_jpeg=False, curve=curve)
        self.server = None
        try:
            # The SDK queues up to message_backlog_size messages per client (default 1024: a client that
            # never reads holds 1024 frames, hundreds of MB); past it the oldest frames are dropped. It has
            # no cap on connections nor a time limit on handshakes: it listens on loopback, behind a gate.
            self.server = foxglove.start_server(name=name, host="127.0.0.1", port=0, server_listener=self,
                                                context=self.context, message_backlog_size=backlog)
            self.gate = ConnectionGate(host, port, ("127.0.0.1", self.server.port), max_connections=max_connections,
                                       request_timeout_s=request_timeout_s)
        except BaseException:
            if self.server is not None:
                self.server.stop()
            self.sub.close()  # a port in use: the caller gets the error, not a subscriber left running
            raise
        self.port = self.gate.port
        self.host = host

    # foxglove.websocket.ServerListener (called from the SDK's threads)
    def on_subscribe(self, client, channel) -> None:
        self._changes.put((self._by_id.get(channel.id, ""), client.id, True))

    def on_unsubscribe(self, client, channel) -> None:
        self._changes.put((self._by_id.get(channel.id, ""), client.id, False))

    def watched(self) -> set[str]:
        """The node's topics subscribed upstream now (some Foxglove client watches a channel fed by them)."""
        return self._on_demand.wanted()

    def _apply_changes(self) -> None:
        while True:
            try:
                key, client, on = self._changes.get_nowait()
            except queue.Empty:
                return
            if not key:
                continue
            start, stop = (self._on_demand.watch if on else self._on_demand.unwatch)(key, client)
            for topic in start:
                self.sub.subscribe(topic)
            for topic in stop:
                self.sub.unsubscribe(topic)

    def forward(self, msg) -> None:
        """Log one node message on its Foxglove channel."""
        from foxglove.messages import CompressedImage, RawImage, Timestamp

        channel = self.channels.get(msg.topic)
        if channel is None:
            return
        h = msg.header
        stamp = int(h["stamp_ns"])
        if h["encoding"] == "msgpack":
            channel.log(json_safe(msg.data), log_time=stamp)  # JSON: non-finite numbers as null
            labels = self.channels.get(msg.topic.rsplit("/", 1)[0] + "/label_info") if msg.stream == "info" else None
            classes = msg.data.get("classes")
            if labels is not None and isinstance(classes, list) and all(isinstance(c, str) for c in classes):
                labels.log({"class_map": [{"class_id": i, "class_name": c} for i, c in enumerate(classes)],
                            "threshold": 0.0}, log_time=stamp)
                self.forwarded["label_info"] = self.forwarded.get("label_info", 0) + 1
        else:
            ts = Timestamp(*divmod(stamp, 1_000_000_000))
            frame_id = str(h.get("frame_id", ""))
            if msg.stream in _IMAGE_STREAMS and self.image_format == "jpeg":
                data = msg.data if h["encoding"] == "jpeg" else _jpeg(msg.data)
                channel.log(CompressedImage(timestamp=ts, frame_id=frame_id, data=bytes(data), format="jpeg"),
                            log_time=stamp)
            else:
                import numpy as np

                img = _bgr(msg.data) if h["encoding"] == "jpeg" else np.ascontiguousarray(msg.data)
                enc = {"jpeg": "bgr8", "png": "mono8"}.get(h["encoding"], h["encoding"])  # as decoded
                channel.log(RawImage(timestamp=ts, frame_id=frame_id, width=int(img.shape[1]),
                                     height=int(img.shape[0]), encoding=enc, step=int(img.strides[0]),
                                     data=img.tobytes()), log_time=stamp)
        self.forwarded[msg.stream] = self.forwarded.get(msg.stream, 0) + 1

    def run(self, stop: threading.Event) -> str | None:
        """Forward until ``stop`` is set or the node refuses this client's CURVE handshake; returns why it
        ended (:func:`~perception.stream.client.follow`'s reason)."""
        from perception.stream.client import Follow

        following = Follow(self.sub, until_final=False, stopped=stop, idle=True, poll_s=0.05,
                           warn=lambda m: print(f"perception-foxglove: warning: {m}", file=sys.stderr, flush=True))
        for msg in following:
            self._apply_changes()
            if msg is None:
                continue
            try:
                self.forward(msg)
            except Exception as e:  # noqa: BLE001  (e.g. a stamp beyond Foxglove's u32 seconds: one message lost, not the bridge)
                self.skipped += 1
                self.sub.rejected["unusable"] += 1
                if self.skipped == 1:
                    print(f"perception-foxglove: warning: skipping messages Foxglove cannot take "
                          f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return following.end

    def close(self) -> None:
        self.gate.close()
        self.server.stop()
        self.sub.close()


def _jpeg(img) -> bytes:
    from perception.stream.protocol import encode_jpeg

    return encode_jpeg(img)


def _bgr(data: bytes):
    import cv2
    import numpy as np

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


@dataclass(kw_only=True)
class FoxgloveOptions(ClientKeyOptions):
    """perception-foxglove's options: its arguments come from these fields (core.options)."""

    endpoint: str = opt(flag="endpoint", help="the node's endpoint, e.g. tcp://127.0.0.1:5555")
    host: str = opt("127.0.0.1", help="address to serve on (default: loopback only)")
    port: int = opt(8765, check=(lambda v: 0 <= v <= 65535, "a port number (0-65535)"),
                    help="WebSocket port (Foxglove's default 8765; 0: any free)")
    namespace: str = opt("segnet", help="topic prefix of the node")
    camera: list[str] | None = opt(None, repeat=True, metavar="NAME",
                                   help="a node running several cameras: bridge this one (repeatable; channels "
                                        "/<namespace>/<camera>/...)")
    backlog: int = opt(DEFAULT_BACKLOG, check=at_least(1), metavar="N",
                       help="messages queued per Foxglove client; a client that reads slower loses the oldest, so "
                            "its memory stays bounded")
    image_format: str = opt("jpeg", choices=("jpeg", "raw"),
                            help="colour mask and overlay as CompressedImage jpeg (default) or RawImage bgr8")
    max_connections: int = opt(MAX_CONNECTIONS, check=at_least(1), metavar="N",
                               help="open connections at most; more are closed at once")
    request_timeout: float = opt(REQUEST_TIMEOUT_S, check=positive, metavar="SECONDS",
                                 help="close a connection that has not sent its whole WebSocket request in this time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-foxglove", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, FoxgloveOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_into(build_parser(), FoxgloveOptions, argv)
    except ValueError as e:
        return fail("perception-foxglove", str(e))
    try:
        import foxglove  # noqa: F401
    except ImportError:
        return fail("perception-foxglove", "needs foxglove-sdk: pip install 'segnet-perception[viz]'")
    import zmq

    from perception.core.cli import stop_on_signals
    from perception.core.logs import configure_service_logging
    from perception.stream.security import CurveError, client_keys_from_args

    configure_service_logging()  # the SDK logs through Python's logging: bogus clients are summarised
    try:
        curve = client_keys_from_args(args)
    except CurveError as e:
        return fail("perception-foxglove", str(e))
    try:
        bridge = FoxgloveBridge(args.endpoint, namespace=args.namespace, host=args.host, port=args.port,
                                image_format=args.image_format, curve=curve, cameras=args.camera,
                                backlog=args.backlog, max_connections=args.max_connections,
                                request_timeout_s=args.request_timeout)
    except zmq.ZMQError as e:
        return fail("perception-foxglove", f"cannot connect to {args.endpoint!r} ({e})")
    except (RuntimeError, OSError) as e:  # the SDK reports a port in use as a RuntimeError
        return fail("perception-foxglove", f"cannot serve on {args.host}:{args.port} ({e})")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"perception-foxglove: warning: serving on {args.host}, reachable beyond this machine",
              file=sys.stderr)
    print(f"perception-foxglove: ws://{args.host}:{bridge.port} (Foxglove: Open connection -> "
          "Foxglove WebSocket)", file=sys.stderr, flush=True)
    stop = stop_on_signals()
    try:
        end = bridge.run(stop)
    finally:
        bridge.close()
    if bridge.sub.losses():
        print(f"perception-foxglove: {bridge.sub.losses()}", file=sys.stderr)
    if end == "handshake":  # a wrong --curve-server-key, or this client's key is not allowed
        from perception.stream.security import handshake_failed

        return fail("perception-foxglove", handshake_failed(args.endpoint), status=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
