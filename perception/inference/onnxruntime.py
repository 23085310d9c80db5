"""ONNX Runtime backend for files written by ``perception-export`` (CPU EP; CUDA EP when present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perception.core.onnx_meta import read_card_from_onnx, read_onnx_metadata
from perception.inference.base import Backend, Capabilities, InferenceResult

__all__ = ["OnnxRuntimeBackend", "disabled_optimizers"]


def disabled_optimizers(meta: dict[str, str]) -> list[str]:
    """ONNX Runtime graph rewrites to turn off for a graph with these ``segnet.*`` metadata.

    ONNX Runtime's NHWC rewrite of QLinearConv transposes around the NCHW-only MaxPool/MaxUnpool
    (indices). Around float pools (int8 graphs from before perception.export.quantized_pools) that
    costs more than it gains, about 8% of the frame on the project's Zen 4 CPU; around pools on the
    uint8 tensors the transposes move a quarter of the bytes and the rewrite pays (SegNet 195 -> 160
    ms a frame, tools/profile_ops.py, docs/benchmarks.md). fp32 graphs keep ONNX Runtime's defaults."""
    float_pools = meta.get("segnet.int8_pools", "float") == "float"
    return ["NhwcTransformer"] if meta.get("segnet.precision") == "int8" and float_pools else []


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on an exported graph (fp32, fp16 or int8; labels out, probabilities where exported): the
    CPU path of the node and of the torch-free runtime install. Reads the model card from the graph's metadata."""

    name = "onnxruntime"

    def __init__(
        self, path: str | Path, *, device: str = "cpu", threads: int | None = None, optimization: str = "all",
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        meta = read_onnx_metadata(path)  # parsed once: the card and the precision both live there
        super().__init__(read_card_from_onnx(path, meta))
        self.precision = meta.get("segnet.precision", "fp32")
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        if threads:
            so.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("device cuda requested but onnxruntime has no CUDAExecutionProvider")
            providers.insert(0, "CUDAExecutionProvider")
        disabled = disabled_optimizers(meta)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers, disabled_optimizers=disabled)
        except Exception as e:  # ORT raises its own exception types
            raise ValueError(f"ONNX Runtime cannot load {path}: {e}") from None
        inp = self.session.get_inputs()[0]
        if inp.name != "image" or len(inp.shape) != 4:
            raise ValueError(f"{path}: expected an input 'image' of shape N x H x W x 3, got {inp.name} {inp.shape}")
        self.path = path
        self.input_shape = inp.shape  # ints for static dims, strings for dynamic ones
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "labels" not in self.output_names and "probs" not in self.output_names and "logits" not in self.output_names:
            raise ValueError(f"{path} has none of the outputs labels/probs/logits")

    @property
    def static_batch(self) -> int | None:
        """The batch size fixed in the graph, or None where it is dynamic."""
        n = self.input_shape[0]
        return n if isinstance(n, int) else None

    @property
    def capabilities(self) -> Capabilities:
        """Probabilities where the graph was exported with them; the graph's fixed batch, if any."""
        return Capabilities(probs="probs" in self.output_names or "logits" in self.output_names, batch=self.static_batch)

    def network_size(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The graph's fixed input size; a dynamic graph runs at the frame's own size."""
        h, w = self.input_shape[1], self.input_shape[2]
        if isinstance(h, int) and isinstance(w, int):
            return (h, w)
        return tuple(frame_hw)  # dynamic graph: run at the frame's own size

    def _infer(self, frames: np.ndarray, *, probs: bool, uncertainty: bool) -> InferenceResult:
        batch = self.static_batch
        chunks = [frames] if batch is None else [frames[i : i + batch] for i in range(0, len(frames), batch)]
        # Ask only for what is needed: ONNX Runtime then skips the softmax (or argmax) branch.
        available = [n for n in ("labels", "probs", "logits") if n in self.output_names]
        want = ["labels"] if "labels" in available else available[:1]
        if probs:
            want += [n for n in ("probs", "logits") if n in available and n not in want][:1]
        labels, prob_list = [], []
        for chunk in chunks:
            n = len(chunk)
            if batch is not None and n < batch:  # pad the last chunk of a static-batch graph
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
            res = dict(zip(want, self.session.run(want, {"image": chunk})))
            if "labels" in res:
                lab = res["labels"]
            else:
                lab = (res["probs"] if "probs" in res else res["logits"]).argmax(1).astype(np.uint8)
            labels.append(lab[:n])
            if probs:
                if "probs" in res:
                    p = res["probs"]
                elif "logits" in res:
                    z = res["logits"].astype(np.float32)
                    z = np.exp(z - z.max(1, keepdims=True))
                    p = z / z.sum(1, keepdims=True)
                else:
                    raise ValueError(f"{self.path} was exported without probs or logits; re-export with --outputs labels,probs")
                prob_list.append(p[:n].astype(np.float32))
        return InferenceResult(np.concatenate(labels), np.concatenate(prob_list) if probs else None, None)
