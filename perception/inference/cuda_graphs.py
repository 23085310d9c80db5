"""CUDA graphs for a fixed-size inference step: capture once per input shape, then replay.

A segmentation network at batch 1 launches a few hundred small kernels per frame; on a fast GPU the
launches, not the arithmetic, set the latency. A CUDA graph records the launches once and replays them as
one. :class:`GraphedStep` keeps one captured graph per (input shape, dtype, options), with static input and
output buffers, as ``torch.cuda.graphs`` asks: warm-up iterations on a side stream, capture, then per call
copy the input into the static buffer and replay. The CUDA calls go through a small interface
(:class:`GraphApi`), so the bookkeeping (keys, eviction, warm-up, fall back to eager on a failed capture)
is tested on a CPU with a stand-in that replays by re-running the step.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # PyTorch is imported where it runs: a runtime module (tests/test_architecture.py)
    import torch

__all__ = ["GraphApi", "TorchCudaGraphs", "GraphedStep"]

Step = Callable[..., Sequence[Any]]  # frames -> tensors


class GraphApi(Protocol):
    """The three CUDA-graph operations :class:`GraphedStep` needs."""

    def warm_up(self, fn: Callable[[], Any], iterations: int) -> None:
        """Run ``fn`` a few times before capture (on a side stream, so that lazy initialisation and cuDNN's
        algorithm choice happen outside the graph)."""

    def capture(self, fn: Callable[[], Sequence[torch.Tensor]]) -> tuple[Any, Sequence[torch.Tensor]]:
        """Record ``fn`` into a new graph; returns the graph and ``fn``'s outputs (the static output buffers)."""

    def replay(self, graph: Any) -> None:
        """Launch a recorded graph (it reads the static inputs and writes the static outputs)."""


class TorchCudaGraphs:
    """:class:`GraphApi` on ``torch.cuda`` (one memory pool per graph)."""

    def __init__(self, device: torch.device | str) -> None:
        import torch

        self.device = torch.device(device)

    def warm_up(self, fn: Callable[[], Any], iterations: int) -> None:
        import torch

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(iterations):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn: Callable[[], Sequence[torch.Tensor]]) -> tuple[Any, Sequence[torch.Tensor]]:
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph, out

    def replay(self, graph: Any) -> None:
        graph.replay()


@dataclass
class _Captured:
    graph: Any
    static_in: torch.Tensor
    static_out: Sequence[torch.Tensor]


class GraphedStep:
    """``step(x, **options) -> tensors``, replayed from a CUDA graph captured per (shape, dtype, options).

    The tensors returned are the graph's static outputs: valid until the next call with the same key
    (copy them out, e.g. ``.cpu()``, before calling again). At most ``max_graphs`` graphs are kept (least
    recently used dropped: each holds its activations' memory). A capture that fails (an op that cannot be
    captured) warns once and runs that key eagerly from then on.
    """

    def __init__(self, step: Step, api: GraphApi, *, warmup: int = 3, max_graphs: int = 4) -> None:
        self.step, self.api, self.warmup, self.max_graphs = step, api, warmup, max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._eager: set[tuple] = set()
        self.captures = 0  # graphs captured so far (a new shape, or one evicted and seen again)

    def __call__(self, x: torch.Tensor, **options: Any) -> Sequence[torch.Tensor]:
        key = (tuple(x.shape), x.dtype, tuple(sorted(options.items())))
        if key in self._eager:
            return self.step(x, **options)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(x, options)
            except RuntimeError as e:
                self._eager.add(key)
                warnings.warn(f"CUDA graph capture failed for input {tuple(x.shape)} ({str(e).splitlines()[0]}); "
                              "running it eagerly", RuntimeWarning, stacklevel=2)
                return self.step(x, **options)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            captured.static_in.copy_(x)
        self.api.replay(captured.graph)
        return captured.static_out

    def _capture(self, x: torch.Tensor, options: dict[str, Any]) -> _Captured:
        static_in = x.clone()
        self.api.warm_up(lambda: self.step(static_in, **options), self.warmup)
        graph, static_out = self.api.capture(lambda: self.step(static_in, **options))
        self.captures += 1
        return _Captured(graph, static_in, tuple(static_out))
