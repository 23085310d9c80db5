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
    # The final stats tell every consumer that the node has finished: held this long for a slow subscriber's
    # queue to make room, where a frame would be dropped (the publisher's linger then bounds the rest).
    final_timeout: float = 5.0


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
    def publish_map(self, stream: str, header: dict[str, Any], data: dict[str, Any], *,
                    deliver_within_s: float | None = None) -> None: ...


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

    @classmethod
    def of(cls, classes_from: Any, settings: NodeSettings) -> "StreamStyle":
        """The style for the classes and palette of ``classes_from`` (a backend, or a class map)."""
        palette = [tuple(c) for c in classes_from.palette]
        return cls(classes=list(classes_from.classes), palette=palette, lut=palette_lut(palette),
                   mask_encoding=settings.mask_encoding, image_encoding=settings.image_encoding,
                   overlay_alpha=settings.overlay_alpha, legend=settings.legend)


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


def _curve_of(pub: Any):
    """The CURVE server of a publisher (or of the publisher behind a camera's view), if it has one."""
    return getattr(getattr(pub, "publisher", pub), "curve", None)


class _Capture:
    """The capture thread: reads the source into a queue (a live source's newest frame replaces the one
    still waiting; a file's frames wait their turn), then puts the end marker; a source that fails keeps
    its error in :attr:`error`."""

    def __init__(self, source: Source, counters: _Counters, stop_event: threading.Event, queue_size: int) -> None:
        self.source, self.counters, self.stop_event = source, counters, stop_event
        self.queue: queue.Queue = queue.Queue(maxsize=1 if source.live else max(1, queue_size))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def _put(self, frame: Frame) -> None:
        if self.source.live:  # newest frame wins: replace whatever is still waiting
            try:
                self.queue.get_nowait()
                self.counters.dropped += 1
            except queue.Empty:
                pass
            self.queue.put_nowait(frame)
            return
        while not self.stop_event.is_set():
            try:
                self.queue.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            for frame in self.source:
                if self.stop_event.is_set():
                    break
                self.counters.captured += 1
                self._put(frame)
        except SourceError as e:
            self.error = e
        except Exception as e:  # a crashing decoder must not hang the node
            self.error = SourceError(f"{self.source.uri}: {type(e).__name__}: {e}")
        finally:
            while True:
                try:
                    self.queue.put(_END, timeout=0.1)
                    break
                except queue.Full:
                    if self.stop_event.is_set():
                        break


class NodeReport:
    """What a node says about itself: the latched ``info`` (model, classes, palette, streams, source) and
    the ``stats`` (rates, counters, latency, source state), and the status line of its log."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self._oversize_warned: set[str] = set()

    def info(self) -> dict[str, Any]:
        n = self.node
        card, cmap = n.backend.card, n.class_map
        return {
            "model_id": n.model_id,
            "architecture": card.architecture.get("name"),
            "classes": list(n.classes),
            "palette": [list(c) for c in n.palette],
            **({"model_classes": list(card.classes)} if cmap is not None else {}),
            # Pixels no output class takes carry this id (vision_msgs' UNLABELED for mono8).
            **({"unlabeled": cmap.unlabeled} if cmap is not None and cmap.unlabeled is not None else {}),
            "input_size": [card.input.height, card.input.width],
            "backend": n.backend.name,
            "bayesian": n.bayesian,
            # What the uncertainty stream's values are (entropy in nats, or the paper's class variance).
            **({"uncertainty_measure": measure}
               if n.bayesian and (measure := getattr(n.backend, "uncertainty_measure", None)) else {}),
            "streams": [s for s in FRAME_STREAMS if s != "uncertainty" or n.bayesian] + ["stats", "info"],
            "source": n.source.uri,
            "frame_id": n.s.frame_id,
            "schema": SCHEMA_VERSION,
        }

    def stats(self) -> dict[str, Any]:
        n, c = self.node, self.node.counters
        now = time.monotonic()
        # Frames completed over the last FPS_WINDOW_S, measured up to now: a stalled source's fps
        # falls to 0 instead of keeping its last value.
        recent = [t for t in c.recent if now - t <= FPS_WINDOW_S]
        fps = (len(recent) - 1) / (now - recent[0]) if len(recent) > 1 and now > recent[0] else 0.0
        state = n.source.state
        # "stalled" refines "streaming" only: reconnecting, failed and ended say more.
        if state == "streaming" and getattr(n.source, "stalled", None) and n.source.stalled():
            state = "stalled"
        return {
            "fps": round(fps, 3),
            "frames_captured": c.captured,
            "frames_processed": c.processed,
            "frames_skipped_no_subscribers": c.skipped,
            "frames_dropped": c.dropped,
            "latency_ms": n.latency.summary(),
            "source_state": state,
            "source_reconnects": n.source.reconnects,
            "frames_unreadable": getattr(n.source, "unreadable", 0),
            "subscribers": n.pub.peers,
            "messages_oversize": sum(getattr(n.pub, "oversize", {}).values()),
            # Times a subscriber fell behind (its queue was full): it misses messages until it has caught up
            # (the publisher drops for it alone, as a live stream should); consumers count the frames they
            # missed from the gaps in ``seq``.
            "slow_subscriber_events": getattr(n.pub, "lagged", 0),
            # CURVE: handshakes the node refused (a client key not, or no longer, in --curve-allow).
            **({"curve_handshakes_refused": curve.rejected} if (curve := _curve_of(n.pub)) is not None else {}),
            "uptime_s": round(time.monotonic() - c.started, 3),
        }

    def warn_oversize(self, stream: str, nbytes: int) -> None:
        """Say once per stream that its messages exceed what consumers accept (so they are withheld)."""
        if stream in self._oversize_warned:
            return
        self._oversize_warned.add(stream)
        limit = self.node.pub.limits.max_message_bytes
        self.node.log(f"warning: {stream} messages of {nbytes / 2**20:.1f} MiB exceed the {limit / 2**20:.0f} MiB "
                      "every consumer accepts; they are not sent (counted in stats as messages_oversize); "
                      "use --resize or --image-encoding jpeg")

    def status_line(self) -> str:
        st = self.stats()
        infer = st["latency_ms"].get("infer", {}).get("p50")
        return (f"{st['frames_processed']} frames, {st['fps']:.2f} fps"
                + (f", inference p50 {infer:.0f} ms" if infer is not None else "")
                + f", {st['frames_dropped']} dropped, {st['subscribers']} subscriber(s), source {st['source_state']}")


class _Periodic:
    """The node's work between frames: the latched ``info`` on request and every ``info_period``, ``stats``
    every ``stats_period`` (when someone listens), and the status line every ``log_period``."""

    def __init__(self, node: "Node") -> None:
        self.node, s = node, node.s
        now = time.monotonic()
        self.due = {"stats": now + s.stats_period, "info": now + s.info_period, "log": now + (s.log_period or float("inf"))}

    def __call__(self) -> None:
        node, due = self.node, self.due
        node.pub.poll(0)
        if node.pub.take_info_request() or time.monotonic() >= due["info"]:
            node._publish_info()
            due["info"] = time.monotonic() + node.s.info_period
        now = time.monotonic()
        if now >= due["stats"]:
            if node.pub.wants("stats"):
                node.pub.publish_map("stats", node._map_header(), node.stats())
            due["stats"] = now + node.s.stats_period
        if now >= due["log"]:
            node.log(node.report.status_line())
            due["log"] = now + (node.s.log_period or float("inf"))


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
        self.class_map = class_map  # the classes the node publishes: the model's, or a class map's groups of them
        self.style = StreamStyle.of(class_map or backend, self.s)
        self.classes, self.palette, self.lut = self.style.classes, self.style.palette, self.style.lut
        self.bayesian = backend.capabilities.uncertainty
        self.stop_event = threading.Event()
        self.counters = _Counters()
        self.latency = LatencyWindow()
        self._capture = _Capture(source, self.counters, self.stop_event, self.s.queue_size)
        self.report = NodeReport(self)
        if getattr(publisher, "on_oversize", False) is None:  # a publisher that reports withheld messages
            publisher.on_oversize = self.report.warn_oversize

    @property
    def error(self) -> BaseException | None:
        """Why the source failed, once it has."""
        return self._capture.error

    def info(self) -> dict[str, Any]:
        """The latched ``info`` message (:class:`NodeReport`)."""
        return self.report.info()

    def stats(self) -> dict[str, Any]:
        """The ``stats`` message now (:class:`NodeReport`)."""
        return self.report.stats()

    def _publish_info(self) -> None:
        self.pub.publish_map("info", self._map_header(), self.info())

    def _map_header(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, "seq": self.counters.processed, "stamp_ns": time.time_ns(),
                "frame_id": self.s.frame_id}

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
        capture = self._capture.thread
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
        periodic = _Periodic(self)
        while not self.stop_event.is_set():
            periodic()
            try:
                item = self._capture.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is _END:
                return
            yield item

    def _finish(self, capture: threading.Thread) -> None:
        """Stop capturing and publish the final stats (``final: true``)."""
        self.stop_event.set()
        self.source.interrupt()  # a source waiting to reconnect stops waiting
        # A capture thread blocked inside OpenCV (opening a dead stream) is a daemon: do not wait it out.
        capture.join(timeout=1.0)
        if self.pub.wants("stats"):  # held for slow consumers (up to final_timeout): it tells them the node is done
            self.pub.publish_map("stats", self._map_header(), {**self.stats(), "final": True},
                                 deliver_within_s=self.s.final_timeout)

    def stop(self) -> None:
        """End the run (from another thread or a signal handler): final stats are still published."""
        self.stop_event.set()
        self.source.interrupt()
