"""Frame sources chosen by URI, in the spirit of jetson-inference's videoSource.

==========================  ==================================================================
``video.mp4`` (.avi, ...)   a video file (``file://`` prefix optional)
``image.png``               one image
``dir/`` or ``dir/*.png``   a folder or glob of images, in name order
``0`` or ``/dev/video0``    a camera (V4L2 where available)
``rtsp://``, ``http(s)://`` a network stream
``demo``                    the road clip bundled with the package (12 s of CamVid, ``perception/assets/``)
``synthetic://``            generated frames for smoke tests; query options ``width``, ``height``,
                            ``fps``, ``frames`` (e.g. ``synthetic://?width=480&height=360&frames=100``)
==========================  ==================================================================

Files are finite and never drop frames; cameras and network streams are *live*: they reconnect with
exponential backoff up to an attempt limit, and report ``stalled`` when no frame arrives for a while.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from perception.core.fileio import IMAGE_SUFFIXES, list_images  # IMAGE_SUFFIXES re-exported
from perception.stream.protocol import DEFAULT_LIMITS

__all__ = [
    "Frame",
    "Source",
    "SourceError",
    "SourceOptions",
    "open_source",
    "VIDEO_SUFFIXES",
    "IMAGE_SUFFIXES",
]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts")


class SourceError(RuntimeError):
    """A source that cannot be opened or has failed for good (message is one line, for users)."""


@dataclass
class Frame:
    """One captured frame, with its per-source sequence number, capture time and position in the source."""

    image: np.ndarray  # H x W x 3 uint8 BGR
    seq: int  # frame counter from 0 per source (after skipping)
    stamp_ns: int  # capture time, Unix epoch ns
    index: int  # position in the source (before skipping)


@dataclass
class SourceOptions:
    """How a source reads: field names are the node config's (``resize`` parsed to (height, width));
    ``reconnect_backoff_s`` is internal."""

    loop: bool = False  # files: start again at the end
    realtime: bool = False  # files: pace at the native frame rate
    resize: tuple[int, int] | None = None  # (height, width)
    skip: int = 0  # drop this many frames after each one kept
    max_frames: int | None = None
    reconnect_attempts: int = 5  # live sources
    reconnect_backoff_s: float = 0.5
    stall_timeout: float = 5.0


class Source(ABC):
    """Iterate to get :class:`Frame` objects; ``state`` is one of opening, streaming, reconnecting,
    stalled, ended, failed."""

    live: bool = False

    def __init__(self, uri: str, options: SourceOptions) -> None:
        self.uri = uri
        self.options = options
        self.state = "opening"
        self.fps: float | None = None
        self.reconnects = 0
        self.last_frame_time: float | None = None
        # Set by interrupt(): a source waiting to reconnect gives up at once (a prompt Ctrl-C).
        self.interrupted = threading.Event()

    def interrupt(self) -> None:
        """Stop waiting: the next reconnect wait returns at once and the iteration ends."""
        self.interrupted.set()

    @abstractmethod
    def _read(self) -> np.ndarray | None:
        """Next raw frame, or None at the end of a finite source."""

    def _rewind(self) -> bool:
        return False

    def close(self) -> None:  # noqa: B027
        pass

    def __iter__(self) -> Iterator[Frame]:
        o = self.options
        kept, index = 0, -1
        t_start = time.monotonic()
        try:
            while o.max_frames is None or kept < o.max_frames:
                img = self._read()
                if img is None:
                    if o.loop and self._rewind():
                        continue
                    self.state = "ended"
                    return
                index += 1
                self.state = "streaming"
                self.last_frame_time = time.monotonic()
                if o.skip and index % (o.skip + 1):
                    continue
                if o.realtime and self.fps and not self.live:
                    due = t_start + index / self.fps
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                stamp = time.time_ns()
                if img.ndim == 2:
                    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
                elif img.shape[2] == 4:
                    img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
                if o.resize is not None and img.shape[:2] != tuple(o.resize):
                    img = cv2.resize(img, (o.resize[1], o.resize[0]), interpolation=cv2.INTER_AREA)
                yield Frame(np.ascontiguousarray(img), kept, stamp, index)
                kept += 1
            self.state = "ended"  # --max-frames reached
        finally:
            self.close()


class _CaptureSource(Source):
    """Anything cv2.VideoCapture opens."""

    def __init__(self, uri: str, options: SourceOptions, target, api: int = cv2.CAP_ANY) -> None:
        super().__init__(uri, options)
        self._target, self._api = target, api
        self.cap: cv2.VideoCapture | None = None
        self._open_or_raise()

    def _open(self) -> bool:
        if self.cap is not None:
            self.cap.release()
        params = []
        if self.live:  # bound how long a dead stream can block open() and read()
            timeout_ms = int(self.options.stall_timeout * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        self.cap = cv2.VideoCapture(self._target, self._api, params)
        if not self.cap.isOpened():
            return False
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and 0 < fps < 1000 else None
        return True

    def _open_or_raise(self) -> None:
        if not self._open():
            raise SourceError(self._open_error())

    def _open_error(self) -> str:
        return f"cannot open {self.uri}"

    def _read(self) -> np.ndarray | None:
        assert self.cap is not None
        ok, img = self.cap.read()
        return img if ok else None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


MAX_FAILED_READS = 8  # failed reads in a row a video file may have before it counts as ended


class VideoFileSource(_CaptureSource):
    """A video file read with OpenCV's FFmpeg backend (pacing with ``realtime``, looping with ``loop``)."""

    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.path = path
        super().__init__(str(path), options, str(path), cv2.CAP_FFMPEG)
        # A file that "opens" but yields nothing (truncated, or not a video at all) is an error now,
        # not an empty stream later.
        first = super()._read()
        if first is None:
            self.close()
            raise SourceError(f"{path} is not a readable video (no frame could be decoded)")
        self._pending: np.ndarray | None = first
        self._decoded = 1  # frames decoded in this pass
        self.truncated = False
        self.unreadable = 0  # failed reads skipped because frames followed (a damaged packet)

    def _open(self) -> bool:
        ok = super()._open()
        # The container's own frame count (from its index): a file that ends well before it is damaged.
        self.expected_frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT)) if ok else 0
        return ok

    def _open_error(self) -> str:
        return f"{self.path} is not a video file OpenCV can open"

    def _read(self) -> np.ndarray | None:
        if self._pending is not None:
            img, self._pending = self._pending, None
            return img
        failed = 0
        while True:
            img = super()._read()
            if img is not None:
                self._decoded += 1
                self._skipped(failed)
                return img
            failed += 1
            # A damaged packet fails one read and the next ones decode again: go on while the container's
            # index says more frames follow, up to MAX_FAILED_READS in a row.
            if failed >= MAX_FAILED_READS or not (self.expected_frames > 0 and self._decoded < self.expected_frames - 1):
                break
        if self.expected_frames > 0 and self._decoded < self.expected_frames - 1 and not self.truncated:
            self.truncated = True
            print(f"warning: {str(self.path)!r} ended after {self._decoded} of the {self.expected_frames} frames "
                  "its index lists: the file is truncated or damaged", file=sys.stderr, flush=True)
        return None

    def _skipped(self, failed: int) -> None:
        if not failed:
            return
        if not self.unreadable:
            print(f"warning: skipping damaged frames of {str(self.path)!r} (counted in stats as frames_unreadable)",
                  file=sys.stderr, flush=True)
        self.unreadable += failed

    def _rewind(self) -> bool:
        self._decoded = 0
        return self._open()


class LiveCaptureSource(_CaptureSource):
    """Camera or network stream: reconnect with backoff; report stalls.

    The same policy holds at start: a stream that is not up yet (a node started before its camera)
    is retried like one lost later, while the node already publishes info and stats saying
    ``reconnecting``; with ``reconnect_attempts=0`` it is an error at once."""

    live = True
    _never_opened = False  # down since start (for the final error message)

    def _open_or_raise(self) -> None:
        if not self._open():
            if self.options.reconnect_attempts <= 0:
                raise SourceError(self._open_error())
            self._never_opened = True
            self.state = "reconnecting"
            if self.cap is not None:
                self.cap.release()
                self.cap = None

    def _read(self) -> np.ndarray | None:
        o = self.options
        while True:
            img = super()._read() if self.cap is not None else None
            if img is not None:
                self._never_opened = False
                return img
            # read() failed or timed out: the device or stream is gone (for now), or not up yet.
            self.state = "reconnecting"
            for attempt in range(1, o.reconnect_attempts + 1):
                if self.interrupted.wait(min(o.reconnect_backoff_s * 2 ** (attempt - 1), 10.0)):
                    return None  # stopping: end the iteration now
                self.reconnects += 1
                if self._open():
                    break
            else:
                self.state = "failed"
                what = "never opened" if self._never_opened else "lost"
                raise SourceError(f"{self.uri}: {what}, and {o.reconnect_attempts} reconnect attempts failed")

    def stalled(self) -> bool:
        return (
            self.last_frame_time is not None
            and time.monotonic() - self.last_frame_time > self.options.stall_timeout
        )


class ImageListSource(Source):
    """A folder (or list) of image files read in order; files that do not decode are skipped and counted."""

    def __init__(self, paths: list[Path], options: SourceOptions) -> None:
        super().__init__(str(paths[0].parent), options)
        self.paths = paths
        self._i = 0
        self.unreadable = 0  # files skipped because they do not decode

    def _read(self) -> np.ndarray | None:
        while True:
            if self._i >= len(self.paths):
                return None
            path = self.paths[self._i]
            self._i += 1
            problem = image_file_problem(path)
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if problem is None else None
            if img is not None:
                break
            # One corrupt file does not end a folder run: skip it, say so, count it. repr: a file name
            # can hold a newline, which would forge a log line.
            self.unreadable += 1
            print(f"warning: skipping {str(path)!r}: {problem or 'not a readable image'}", file=sys.stderr, flush=True)
        if img.dtype != np.uint8:
            img = cv2.convertScaleAbs(img, alpha=255.0 / max(1, int(img.max())))
        return img

    def _rewind(self) -> bool:
        self._i = 0
        return True


class SyntheticSource(Source):
    """Moving coloured shapes over a gradient: deterministic frames without any file."""

    def __init__(self, uri: str, options: SourceOptions, *, width: int = 480, height: int = 360,
                 fps: float = 30.0, frames: int | None = None) -> None:
        super().__init__(uri, options)
        if width < 8 or height < 8:
            raise SourceError(f"{uri}: width and height must be at least 8")
        self.width, self.height, self.fps, self.frames = width, height, fps, frames
        self._i = 0
        yy, xx = np.mgrid[0:height, 0:width]
        self._base = np.stack([xx * 200 // width, yy * 200 // height, np.full_like(xx, 90)], -1).astype(np.uint8)

    def _read(self) -> np.ndarray | None:
        if self.frames is not None and self._i >= self.frames:
            return None
        i = self._i
        self._i += 1
        img = self._base.copy()
        w, h = self.width, self.height
        cx = int((i * 7) % w)
        cv2.rectangle(img, (cx, h // 2), (min(w - 1, cx + w // 5), h - 1), (40, 40, 200), -1)
        cv2.circle(img, (w // 3, int(h / 3 + (h / 6) * np.sin(i / 10))), max(3, h // 10), (30, 200, 30), -1)
        return img

    def _rewind(self) -> bool:
        self._i = 0
        return True


def image_file_problem(path: Path, max_pixels: int = DEFAULT_LIMITS.max_image_pixels) -> str | None:
    """Why an image file must not be decoded, or None: not a regular file (a FIFO would block for ever),
    or a PNG/JPEG whose header declares more than ``max_pixels`` (a decompression bomb: a 157 KB PNG of
    12000x12000 took the node to 2 GB), read from the header before anything is decoded."""
    from perception.stream.protocol import jpeg_size, png_size

    if not path.is_file():
        return "not a regular file"
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    size = png_size(head) or jpeg_size(head)
    if size and size[0] * size[1] > max_pixels:
        return f"{size[1]}x{size[0]} pixels, over the {max_pixels} a frame may have"
    return None


def _parse_synthetic(uri: str) -> dict:
    q = parse_qs(urlparse(uri).query)
    out: dict = {}
    for key, cast in (("width", int), ("height", int), ("fps", float), ("frames", int)):
        if key in q:
            try:
                out[key] = cast(q[key][0])
            except ValueError:
                raise SourceError(f"{uri}: {key} must be a number") from None
    return out


# ``--source demo``: the road clip bundled with every install (CamVid frames; see its DEMO_CLIP.md).
DEMO_SOURCE = "demo"
DEMO_CLIP = Path(__file__).resolve().parents[2] / "assets" / "demo_camvid_0016E5.mp4"


def open_source(uri: str, options: SourceOptions | None = None) -> Source:
    """Open the source a URI names; raises :class:`SourceError` with a one-line reason."""
    options = options or SourceOptions()
    uri = str(uri)
    if uri == DEMO_SOURCE and not Path(uri).exists():  # a file named "demo" in the working folder wins
        uri = str(DEMO_CLIP)
    if uri.startswith("synthetic://"):
        return SyntheticSource(uri, options, **_parse_synthetic(uri))
    if re.match(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://", uri):
        return LiveCaptureSource(uri, options, uri, cv2.CAP_FFMPEG)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if re.fullmatch(r"\d+", uri) or re.fullmatch(r"/dev/video\d+", uri):
        index = int(re.sub(r"\D", "", uri))
        if uri.startswith("/dev/") and not Path(uri).exists():
            raise SourceError(f"camera {uri} is not there")
        api = cv2.CAP_V4L2 if hasattr(cv2, "CAP_V4L2") else cv2.CAP_ANY
        try:
            return LiveCaptureSource(uri, options, index, api)
        except SourceError:
            raise SourceError(f"camera {uri} is not there or cannot be opened") from None
    if any(ch in uri for ch in "*?["):
        paths = list_images(uri)
        if not paths:
            raise SourceError(f"no images match {uri}")
        return ImageListSource(paths, options)
    path = Path(uri)
    if not path.exists():
        raise SourceError(f"source not found: {uri}")
    if path.is_dir():
        paths = list_images(path)
        if not paths:
            raise SourceError(f"no images in folder {uri}")
        return ImageListSource(paths, options)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        if problem := image_file_problem(path):
            raise SourceError(f"{uri}: {problem}")
        if cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None:
            raise SourceError(f"{uri} is not a readable image")
        return ImageListSource([path], options)
    if suffix in VIDEO_SUFFIXES or suffix == "":
        return VideoFileSource(path, options)
    raise SourceError(f"{uri} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor an image file")
