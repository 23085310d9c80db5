"""TensorRT backend: runs an engine built by ``tools/build_engine.py`` (TensorRT 10/11 tensor API, pycuda).

Pinned host buffers, device buffers and one CUDA stream are allocated once; each call copies frames
host-to-device, enqueues the engine and copies results back asynchronously, then synchronises.
The JSON sidecar written by the builder is checked against the engine before anything runs: a
mismatched engine (other file, other TensorRT version, other GPU architecture) is refused.

tensorrt and pycuda are imported when this backend is created, never by ``import perception``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from perception.export.tensorrt import TENSORRT_INSTALL
from perception.core.fileio import sha256_file
from perception.core.card import ModelCard
from perception.inference.base import Backend, Capabilities, InferenceResult

__all__ = ["TensorRTBackend", "check_sidecar"]


def check_sidecar(engine_path: Path, sidecar: dict[str, Any], *, trt_version: str, compute_capability: str) -> None:
    """Raise ValueError naming the first mismatch between an engine, its sidecar and this machine."""
    if sidecar.get("engine_sha256") != sha256_file(engine_path):
        raise ValueError(f"{engine_path} does not match its sidecar (the engine file was replaced or corrupted)")
    built = str(sidecar.get("tensorrt", ""))
    if built.split(".")[:2] != trt_version.split(".")[:2]:
        raise ValueError(f"{engine_path} was built with TensorRT {built}; this machine has {trt_version}: rebuild it")
    if sidecar.get("compute_capability") != compute_capability:
        raise ValueError(
            f"{engine_path} was built for compute capability {sidecar.get('compute_capability')} "
            f"({sidecar.get('gpu')}); this GPU is {compute_capability}: rebuild it here"
        )


class TensorRTBackend(Backend):
    """A TensorRT engine built by ``tools/build_engine.py`` (its ``.json`` sidecar says the input size, the
    unpooling form and the card), run through pycuda on a CUDA GPU."""

    name = "tensorrt"

    def __init__(self, path: str | Path, *, device: str = "cuda") -> None:
        path = Path(path)
        sidecar_file = Path(str(path) + ".json")
        if not sidecar_file.is_file():
            raise FileNotFoundError(f"{path} has no sidecar {sidecar_file.name} (build engines with tools/build_engine.py)")
        sidecar = json.loads(sidecar_file.read_text())
        super().__init__(ModelCard.from_dict(sidecar["model_card"]))
        try:
            import tensorrt as trt
        except ImportError:
            raise RuntimeError(f"the tensorrt backend needs TensorRT ({TENSORRT_INSTALL})") from None
        try:
            import pycuda.driver as cuda
        except ImportError:
            raise RuntimeError(f"the tensorrt backend needs pycuda ({TENSORRT_INSTALL})") from None
        cuda.init()
        dev = cuda.Device(int(device.split(":")[1]) if ":" in device else 0)
        self._ctx = dev.retain_primary_context()
        self._ctx.push()
        made = False
        try:
            major, minor = dev.compute_capability()
            check_sidecar(path, sidecar, trt_version=trt.__version__, compute_capability=f"{major}.{minor}")
            if sidecar.get("unpool") == "plugin" and sidecar.get("plugin_impl") == "jit":
                # Only a JIT engine calls back into Python (and PyTorch) at run time. The builder makes AOT
                # engines: their PTX is inside the engine, which runs without any Python definitions.
                from perception.export.tensorrt.plugins import register_plugins

                register_plugins()
            self._cuda, self._trt = cuda, trt
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ValueError(f"TensorRT could not deserialize {path}")
            self.context = self.engine.create_execution_context()
            self.stream = cuda.Stream()
            self.sidecar = sidecar
            self.input_name = next(
                n for n in self._names() if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
            )
            self.output_names = [n for n in self._names() if n != self.input_name]
            self.input_shape = tuple(sidecar["input_shape"])
            self.context.set_input_shape(self.input_name, self.input_shape)
            self._buffers: dict[str, tuple[np.ndarray, Any]] = {}
            for name in self._names():
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = trt.nptype(self.engine.get_tensor_dtype(name))
                host = cuda.pagelocked_empty(shape, dtype)
                devmem = cuda.mem_alloc(max(1, host.nbytes))
                self.context.set_tensor_address(name, int(devmem))
                self._buffers[name] = (host, devmem)
            made = True
        finally:
            self._ctx.pop()
            if not made:  # failed half-way: free what was made and release the retained primary context
                self.close()

    def _names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    @property
    def capabilities(self) -> Capabilities:
        """Probabilities where the engine has them as an output; the engine's fixed batch."""
        return Capabilities(probs=any(n in self._names() for n in ("probs", "logits")), batch=self.input_shape[0])

    def network_size(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The input size the engine was built for."""
        return (self.input_shape[1], self.input_shape[2])

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execution failed")

    def _infer(self, frames: np.ndarray, *, probs: bool, uncertainty: bool) -> InferenceResult:
        cuda = self._cuda
        batch = self.input_shape[0]
        labels, prob_list = [], []
        self._ctx.push()
        try:
            for i in range(0, len(frames), batch):
                chunk = frames[i : i + batch]
                n = len(chunk)
                host_in, dev_in = self._buffers[self.input_name]
                host_in[:n] = chunk
                if n < batch:
                    host_in[n:] = chunk[-1]
                cuda.memcpy_htod_async(dev_in, host_in, self.stream)
                self._enqueue()
                for name in self.output_names:
                    host, devmem = self._buffers[name]
                    cuda.memcpy_dtoh_async(host, devmem, self.stream)
                self.stream.synchronize()
                out = {name: self._buffers[name][0] for name in self.output_names}
                lab = out["labels"] if "labels" in out else out["probs"].argmax(1).astype(np.uint8)
                labels.append(lab[:n].copy())
                if probs:
                    if "probs" not in out:
                        raise ValueError("this engine has no probs output; rebuild from an export with probs")
                    prob_list.append(out["probs"][:n].astype(np.float32))
        finally:
            self._ctx.pop()
        return InferenceResult(np.concatenate(labels), np.concatenate(prob_list) if probs else None, None)

    def close(self) -> None:
        """Release everything that lives in the CUDA context while it is current (device buffers, the
        execution context, the engine, the runtime, the stream: TensorRT frees device memory when they
        are destroyed), then make it not current and release the primary context last."""
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            return
        ctx.push()
        try:
            for _, devmem in getattr(self, "_buffers", {}).values():
                devmem.free()
            self._buffers = {}
            # Execution context before engine before runtime: each needs the one after it to exist.
            for name in ("context", "engine", "runtime", "stream"):
                if hasattr(self, name):
                    setattr(self, name, None)
        finally:
            ctx.pop()
        ctx.detach()
        self._ctx = None
