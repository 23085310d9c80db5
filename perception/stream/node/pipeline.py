"""The node's pipeline: a capture thread feeding a bounded queue, and one worker that runs inference,
post-processing and publishing for the streams someone subscribes to.

Live sources keep only the newest frame (older ones are dropped and counted); files block the
capture thread instead, so nothing is lost.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from perception.core.card import ModelCard
from perception.inference.base import Capabilities, InferenceResult
from perception.inference.postprocess import class_pixels, classes_present, colorize, draw_legend, overlay, palette_lut
from perception.stream.protocol import FRAME_STREAMS, SCHEMA_VERSION, image_header, encode_image
from perception.stream.node.sources import Frame, Source, SourceError

__all__ = ["NodeSettings", "Node", "NodePublisher", "LatencyWindow", "StreamStyle", "Rendered", "render_streams"]

_END = object()


@dataclass
class NodeSettings:
    """How a :class:`Node` publishes: encodings, drawing, periods (seconds) and the wait for subscribers.

    Field names are :class:`~perception.stream.node.cli.NodeConfig`'s (the node CLI builds this with
    :func:`perception.core.options.project`); ``queue_size`` is internal."""

    frame_id: str = "camera"
    image_encoding: str = "bgr8"  # bgr8 | jpeg, for color_mask and overlay
    mask_encoding: str = "mono8"  # mono8 | png (lossless, several times smaller)
    overlay_alpha: float = 0.5
    legend: bool = True
    stats_period: float = 1.0
    info_period: float = 5.0
    queue_size: int = 2
    wait_for_subscribers: int = 0
    wait_timeout: float | None = None
    log_period: float | None = 10.0  # a one-line status on the log every so often (0 or None: never)


class LatencyWindow:
    """Recent per-stage latencies (ms) for percentiles."""

    def __init__(self, size: int = 300) -> None:
        self.values: dict[str, deque] = {}
        self.size = size

    def add(self, stage: str, ms: float) -> None:
        self.values.setdefault(stage, deque(maxlen=self.size)).append(ms)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, vals in self.values.items():
            a = np.fromiter(vals, float)
            out[stage] = {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
                          "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}
        return out


FPS_WINDOW_S = 10.0


@dataclass
class _Counters:
    captured: int = 0
    processed: int = 0  # frames run through the model
    skipped: int = 0  # frames read while nobody subscribed to a frame stream (not inferred)
    dropped: int = 0
    started: float = field(default_factory=time.monotonic)
    recent: deque = field(default_factory=lambda: deque(maxlen=120))  # completion times for fps


class NodePublisher(Protocol):
    """What a :class:`Node` needs from a publisher (:class:`~perception.stream.publisher.Publisher`, a
    camera's :class:`~perception.stream.publisher.PublisherView`, or a test's stand-in)."""

    endpoint: str
    peers: int

    def poll(self, timeout_ms: int = 0) -> None: ...
    def wants(self, stream: str) -> bool: ...
    def take_info_request(self) -> bool: ...
    def wait_for_subscribers(self, n: int, **kwargs: Any) -> bool: ...
    def publish(self, stream: str, header: dict[str, Any], payload: np.ndarray | bytes) -> None: ...
    def publish_map(self, stream: str, header: dict[str, Any], data: dict[str, Any]) -> None: ...


class NodeBackend(Protocol):
    """What a :class:`Node` needs from a backend: any :class:`~perception.inference.base.Backend`
    (the table's, or the cameras' shared ``BatchingBackend``), or a test's stand-in."""

    name: str
    card: ModelCard

    @property
    def classes(self) -> list[str]: ...
    @property
    def palette(self) -> list[list[int]]: ...
    @property
    def capabilities(self) -> Capabilities: ...
    def infer(self, frames: np.ndarray, *, probs: bool = False, uncertainty: bool = False) -> InferenceResult: ...


@dataclass(frozen=True)
class StreamStyle:
    """How a frame's streams are drawn and encoded (classes and colours after any class map)."""

    classes: list[str]
    palette: list[tuple[int, int, int]]
    lut: np.ndarray  # palette_lut(palette): class id -> BGR
    mask_encoding: str = "mono8"
    image_encoding: str = "bgr8"
    overlay_alpha: float = 0.5
    legend: bool = True


@dataclass(frozen=True)
class Rendered:
    """One stream of one frame, ready to send: its payload, the image the header describes, the
    encoding, and header fields of its own (the mask's ``class_pixels``)."""

    payload: np.ndarray | bytes
    image: np.ndarray
    encoding: str
    extra: dict


def render_streams(image_bgr: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray | None,
                   wanted: list[str], style: StreamStyle) -> dict[str, Rendered]:
    """The per-frame step, a pure function: a frame, its labels (class ids, after any class map) and
    uncertainty, and the streams someone wants -> each stream's payload (no ZeroMQ, no clock).
    One histogram of the labels serves the mask's ``class_pixels`` and the overlay's legend."""
    counts = class_pixels(labels, len(style.classes))
    images: dict[str, tuple[np.ndarray, str]] = {}
    if "mask" in wanted:
        images["mask"] = (labels, style.mask_encoding)
    color = colorize(labels, style.lut) if ("color_mask" in wanted or "overlay" in wanted) else None
    if "color_mask" in wanted:
        images["color_mask"] = (color, style.image_encoding)
    if "overlay" in wanted:
        over = overlay(image_bgr, color, style.overlay_alpha)
        if style.legend:
            draw_legend(over, style.classes, style.palette,
                        present=classes_present(labels, len(style.classes), counts), in_place=True)
        images["overlay"] = (over, style.image_encoding)
    if "uncertainty" in wanted and uncertainty is not None:
        images["uncertainty"] = (uncertainty.astype(np.float32), "32FC1")
    return {stream: Rendered(encode_image(img, enc), img, enc,
                             {"class_pixels": counts.tolist()} if stream == "mask" else {})
            for stream, (img, enc) in images.items()}


class Node:
    """One camera's streaming loop: frames from a source, through a backend, out as messages.

    :meth:`run` waits for subscribers if asked, then for each frame: skip it when nobody subscribes to
    any frame stream, else infer, and publish only the streams someone wants (``mask``, ``color_mask``,
    ``overlay``, ``uncertainty``), with ROS-style headers (``seq``, ``stamp_ns`` = capture time,
    ``frame_id``); ``stats`` every ``stats_period`` and the latched ``info`` on every new subscriber.
    It ends at the end of the source, on :meth:`stop` (a signal), or when a live source is gone for
    good, and always publishes final stats (``final: true``). Returns the exit status (0, or 1 when
    the source failed). ``class_map`` relabels the model's classes into groups before anything is
    drawn or sent.
    """

    def __init__(
        self, source: Source, backend: NodeBackend, publisher: NodePublisher, settings: NodeSettings | None = None,
        *, model_id: str = "", log: Callable[[str], None] = print, class_map=None,
    ) -> None:
        self.source = source
        self.backend = backend
        self.pub = publisher
        self.s = settings or NodeSettings()
        self.model_id = model_id or backend.card.id
        self.log = log
        # The classes the node publishes: the model's, or a class map's groups of them.
        self.class_map = class_map
        self.classes = list(class_map.classes) if class_map is not None else list(backend.classes)
        self.palette = [tuple(c) for c in (class_map.palette if class_map is not None else backend.palette)]
        self.lut = palette_lut(self.palette)
        self.style = StreamStyle(classes=self.classes, palette=self.palette, lut=self.lut,
                                 mask_encoding=self.s.mask_encoding, image_encoding=self.s.image_encoding,
                                 overlay_alpha=self.s.overlay_alpha, legend=self.s.legend)
        self.bayesian = backend.capabilities.uncertainty
        self.stop_event = threading.Event()
        self.counters = _Counters()
        self.latency = LatencyWindow()
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=1 if source.live else max(1, self.s.queue_size))
        self._capture_done = threading.Event()
        self._oversize_warned: set[str] = set()
        if getattr(publisher, "on_oversize", False) is None:  # a publisher that reports withheld messages
            publisher.on_oversize = self._warn_oversize

    def _warn_oversize(self, stream: str, nbytes: int) -> None:
        if stream not in self._oversize_warned:
            self._oversize_warned.add(stream)
            limit = self.pub.limits.max_message_bytes
            self.log(f"warning: {stream} messages of {nbytes / 2**20:.1f} MiB exceed the {limit / 2**20:.0f} MiB "
                     "every consumer accepts; they are not sent (counted in stats as messages_oversize); "
                     "use --resize or --image-encoding jpeg")

    # -- capture thread ---------------------------------------------------------------------------

    def _capture(self) -> None:
        try:
            for frame in self.source:
                if self.stop_event.is_set():
                    break
                self.counters.captured += 1
                if self.source.live:
                    # Newest frame wins: replace whatever is still waiting.
                    try:
                        self._queue.get_nowait()
                        self.counters.dropped += 1
                    except queue.Empty:
                        pass
                    self._queue.put_nowait(frame)
                else:
                    while not self.stop_event.is_set():
                        try:
                            self._queue.put(frame, timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except SourceError as e:
            self.error = e
        except Exception as e:  # a crashing decoder must not hang the node
            self.error = SourceError(f"{self.source.uri}: {type(e).__name__}: {e}")
        finally:
            self._capture_done.set()
            while True:
                try:
                    self._queue.put(_END, timeout=0.1)
                    break
                except queue.Full:
                    if self.stop_event.is_set():
                        break

    # -- info and stats ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        card = self.backend.card
        return {
            "model_id": self.model_id,
            "architecture": card.architecture.get("name"),
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
            **({"model_classes": list(card.classes)} if self.class_map is not None else {}),
            # Pixels no output class takes carry this id (vision_msgs' UNLABELED for mono8).
            **({"unlabeled": self.class_map.unlabeled}
               if self.class_map is not None and self.class_map.unlabeled is not None else {}),
            "input_size": [card.input.height, card.input.width],
            "backend": self.backend.name,
            "bayesian": self.bayesian,
            "streams": [s for s in FRAME_STREAMS if s != "uncertainty" or self.bayesian] + ["stats", "info"],
            "source": self.source.uri,
            "frame_id": self.s.frame_id,
            "schema": SCHEMA_VERSION,
        }

    def _publish_info(self) -> None:
        self.pub.publish_map("info", self._map_header(), self.info())

    def _map_header(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, "seq": self.counters.processed, "stamp_ns": time.time_ns(),
                "frame_id": self.s.frame_id}

    def stats(self) -> dict[str, Any]:
        c = self.counters
        now = time.monotonic()
        # Frames completed over the last FPS_WINDOW_S, measured up to now: a stalled source's fps
        # falls to 0 instead of keeping its last value.
        recent = [t for t in c.recent if now - t <= FPS_WINDOW_S]
        fps = (len(recent) - 1) / (now - recent[0]) if len(recent) > 1 and now > recent[0] else 0.0
        state = self.source.state
        # "stalled" refines "streaming" only: reconnecting, failed and ended say more.
        if state == "streaming" and getattr(self.source, "stalled", None) and self.source.stalled():
            state = "stalled"
        return {
            "fps": round(fps, 3),
            "frames_captured": c.captured,
            "frames_processed": c.processed,
            "frames_skipped_no_subscribers": c.skipped,
            "frames_dropped": c.dropped,
            "latency_ms": self.latency.summary(),
            "source_state": state,
            "source_reconnects": self.source.reconnects,
            "frames_unreadable": getattr(self.source, "unreadable", 0),
            "subscribers": self.pub.peers,
            "messages_oversize": sum(getattr(self.pub, "oversize", {}).values()),
            "uptime_s": round(time.monotonic() - c.started, 3),
        }

    # -- per frame --------------------------------------------------------------------------------

    def _process(self, frame: Frame) -> bool:
        """Infer and publish what is subscribed; False (nothing inferred) when no frame stream is wanted."""
        wanted = [s for s in FRAME_STREAMS if self.pub.wants(s)]
        if "uncertainty" in wanted and not self.bayesian:
            wanted.remove("uncertainty")
        t0 = time.perf_counter()
        queue_ms = max(0.0, (time.time_ns() - frame.stamp_ns) / 1e6)
        if not wanted:
            return False
        res = self.backend.infer(frame.image[None], uncertainty="uncertainty" in wanted)
        t1 = time.perf_counter()
        labels = res.labels[0] if self.class_map is None else self.class_map.apply(res.labels[0])
        rendered = render_streams(frame.image, labels, None if res.uncertainty is None else res.uncertainty[0],
                                  wanted, self.style)
        t2 = time.perf_counter()
        latency = {"queue_ms": round(queue_ms, 3), "infer_ms": round((t1 - t0) * 1e3, 3),
                   "post_ms": round((t2 - t1) * 1e3, 3)}
        for stream, r in rendered.items():
            header = image_header(seq=frame.seq, stamp_ns=frame.stamp_ns, frame_id=self.s.frame_id, image=r.image,
                                  encoding=r.encoding, latency_ms=latency, model_id=self.model_id, **r.extra)
            self.pub.publish(stream, header, r.payload)
        t3 = time.perf_counter()
        for k, v in latency.items():
            self.latency.add(k.removesuffix("_ms"), v)
        self.latency.add("publish", (t3 - t2) * 1e3)
        self.latency.add("total", queue_ms + (t3 - t0) * 1e3)
        return True

    # -- main loop --------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until the source ends or :meth:`stop` is called; returns an exit code."""
        if not self._start():
            return 0  # stopped while waiting for subscribers
        capture = threading.Thread(target=self._capture, name="capture", daemon=True)
        capture.start()
        try:
            for frame in self._frames():  # from the capture thread, until the source ends or stop()
                if self._process(frame):  # infer -> render -> publish the streams someone wants
                    self.counters.processed += 1
                    self.counters.recent.append(time.monotonic())
                else:
                    self.counters.skipped += 1
        finally:
            self._finish(capture)
        if self.error is not None:
            self.log(f"perception-node: error: {self.error}")
            return 1
        return 0

    def _start(self) -> bool:
        """Latch ``info``, then wait for subscribers if asked; False when stopped while waiting."""
        self.pub.poll(0)
        self._publish_info()
        if self.s.wait_for_subscribers > 0:
            self.log(f"waiting for {self.s.wait_for_subscribers} subscriber(s) on {self.pub.endpoint} ...")
            if not self.pub.wait_for_subscribers(
                self.s.wait_for_subscribers, timeout_s=self.s.wait_timeout, should_stop=self.stop_event.is_set
            ):
                if self.stop_event.is_set():
                    return False
                self.log("no subscribers in time; starting anyway")
        self._publish_info()
        return True

    def _frames(self) -> Iterator[Frame]:
        """The frames the capture thread queues, with the periodic work (``info``, ``stats``, the status
        line) done between them, so it runs while the source is stalled too."""
        now = time.monotonic()
        self._next = {"stats": now + self.s.stats_period, "info": now + self.s.info_period,
                      "log": now + (self.s.log_period or float("inf"))}
        while not self.stop_event.is_set():
            self._periodic()
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is _END:
                return
            yield item

    def _periodic(self) -> None:
        self.pub.poll(0)
        due = self._next
        if self.pub.take_info_request() or time.monotonic() >= due["info"]:
            self._publish_info()
            due["info"] = time.monotonic() + self.s.info_period
        now = time.monotonic()
        if now >= due["stats"]:
            if self.pub.wants("stats"):
                self.pub.publish_map("stats", self._map_header(), self.stats())
            due["stats"] = now + self.s.stats_period
        if now >= due["log"]:
            st = self.stats()
            infer = st["latency_ms"].get("infer", {}).get("p50")
            self.log(f"{st['frames_processed']} frames, {st['fps']:.2f} fps"
                     + (f", inference p50 {infer:.0f} ms" if infer is not None else "")
                     + f", {st['frames_dropped']} dropped, {st['subscribers']} subscriber(s), "
                     f"source {st['source_state']}")
            due["log"] = now + (self.s.log_period or float("inf"))

    def _finish(self, capture: threading.Thread) -> None:
        """Stop capturing and publish the final stats (``final: true``)."""
        self.stop_event.set()
        self.source.interrupt()  # a source waiting to reconnect stops waiting
        # A capture thread blocked inside OpenCV (opening a dead stream) is a daemon: do not wait it out.
        capture.join(timeout=1.0)
        if self.pub.wants("stats"):
            self.pub.publish_map("stats", self._map_header(), {**self.stats(), "final": True})

    def stop(self) -> None:
        self.stop_event.set()
        self.source.interrupt()
