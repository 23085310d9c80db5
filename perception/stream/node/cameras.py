"""Several cameras in one node: one model, one backend, one socket.

Each camera keeps its own pipeline (:class:`~perception.stream.node.pipeline.Node`: capture thread,
reconnects, stalls, drops, seq, stats) under the topic prefix ``<namespace>/<name>/``; their
inference requests meet in a :class:`BatchingBackend`, which runs the frames that are ready from
several cameras as one batch. A dead camera ends its own pipeline only.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from perception.inference.base import Backend, Capabilities, InferenceResult

__all__ = ["CameraSpec", "parse_camera_specs", "BatchingBackend", "run_cameras"]

_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_-]{0,31})=(.+)$")


@dataclass(frozen=True)
class CameraSpec:
    """One camera of the node: its name (the topic segment ``segnet/<name>/...``) and source URI."""

    name: str
    uri: str


def parse_camera_specs(values: list[str]) -> list[CameraSpec]:
    """``NAME=URI`` or a bare URI (named ``cam0``, ``cam1``, ... by position). A URI's own ``=`` (a
    query string) is left alone: a name is letters, digits, ``_`` and ``-`` before the first ``=``."""
    specs = []
    for i, value in enumerate(values):
        m = _NAME.match(value)
        if m and "/" not in m.group(1) and ":" not in m.group(1):
            specs.append(CameraSpec(m.group(1), m.group(2)))
        else:
            specs.append(CameraSpec(f"cam{i}", value))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--source: camera name {dupes[0]!r} is used twice")
    return specs


class _Request:
    __slots__ = ("frames", "uncertainty", "done", "result", "error")

    def __init__(self, frames: np.ndarray, uncertainty: bool) -> None:
        self.frames, self.uncertainty = frames, uncertainty
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class BatchingBackend(Backend):
    """A :class:`Backend` shared by several callers (one per camera): requests that are pending
    together and share a frame size run as one batch on the wrapped backend; a backend whose batch is
    fixed at 1 runs them in turn. Card, capabilities, name and network size are the wrapped backend's."""

    def __init__(self, backend: Backend, *, max_batch: int = 8) -> None:
        super().__init__(backend.card)
        self.backend = backend
        self.name = backend.name
        fixed = backend.capabilities.batch  # a graph with a fixed batch: at most that many per run
        self.max_batch = max_batch if fixed is None else max(1, fixed)
        self._pending: list[_Request] = []
        self._cv = threading.Condition()
        self._closed = False
        self.batches: list[int] = []  # frames per batch run (the last 1000), for stats and tests
        self._worker = threading.Thread(target=self._run, name="batching-backend", daemon=True)
        self._worker.start()

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    def network_size(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        return self.backend.network_size(frame_hw)

    def _infer(self, frames: np.ndarray, *, probs: bool, uncertainty: bool) -> InferenceResult:
        return self.backend.infer(frames, probs=probs, uncertainty=uncertainty)  # (infer batches whole calls)

    def infer(self, frames: np.ndarray, *, probs: bool = False, uncertainty: bool = False):
        if probs:
            return self.backend.infer(frames, probs=True, uncertainty=uncertainty)
        req = _Request(frames, uncertainty)
        with self._cv:
            if self._closed:
                raise RuntimeError("backend closed")
            self._pending.append(req)
            self._cv.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _take(self) -> list[_Request]:
        """The oldest request and every pending one that can join its batch."""
        first = self._pending[0]
        group, rest, n = [], [], 0
        for r in self._pending:
            fits = (r.frames.shape[1:] == first.frames.shape[1:] and r.uncertainty == first.uncertainty
                    and n + len(r.frames) <= self.max_batch)
            if fits or r is first:
                group.append(r)
                n += len(r.frames)
            else:
                rest.append(r)
        self._pending = rest
        return group

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending:
                    return
                group = self._take()
            try:
                frames = group[0].frames if len(group) == 1 else np.concatenate([r.frames for r in group])
                res = self.backend.infer(frames, uncertainty=group[0].uncertainty)
                self.batches = (self.batches + [len(frames)])[-1000:]
                i = 0
                for r in group:
                    n = len(r.frames)
                    r.result = InferenceResult(
                        labels=res.labels[i : i + n],
                        uncertainty=None if res.uncertainty is None else res.uncertainty[i : i + n])
                    i += n
            except BaseException as e:  # noqa: BLE001 - handed to each caller, raised in its thread
                for r in group:
                    r.error = e
            for r in group:
                r.done.set()

    def stop(self) -> None:
        """Stop batching (the wrapped backend stays open: its owner closes it)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self.backend.close()


def run_cameras(
    cameras: list[tuple[CameraSpec, object]], backend, publisher, settings, *, namespace: str,
    frame_id_given: bool, log: Callable[[str], None], class_map=None, on_nodes=None,
) -> int:
    """Run one pipeline per (spec, source) on a shared backend and socket until all have ended;
    returns the worst exit code. ``on_nodes(nodes)`` receives the pipelines once built (to stop them)."""
    from perception.stream.node.pipeline import Node

    shared = BatchingBackend(backend)
    nodes = []
    for spec, source in cameras:
        cam_settings = settings if frame_id_given else replace(settings, frame_id=spec.name)
        nodes.append(Node(source, shared, publisher.view(f"{namespace}/{spec.name}"), cam_settings,
                          log=lambda m, n=spec.name: log(f"[{n}] {m}"), class_map=class_map))
    if on_nodes is not None:
        on_nodes(nodes)
    codes: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i, n=n: codes.setdefault(i, n.run()), name=f"camera-{i}",
                                daemon=True) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
    shared.stop()  # the wrapped backend is closed by the caller
    return max(codes.values(), default=1)
