"""The model folder, the project's central artifact, and the one owner of its rules (torch-free).

A model folder holds ``model.json`` (the card), ``weights.safetensors`` (PyTorch), ``model.onnx`` (the fp32
graph a torch-free runtime runs), ``model_int8.onnx``, TensorRT ``*.engine`` files with their ``.json``
sidecars, and ``heldout_*/`` (the card of its recipe's run on a drive it never trained on). Training writes
it, shipping measures it, export reads it, and inference, evaluation, the node and the zoo choose from it:
they ask :class:`ModelFolder` which file to use and whether it may be used here, and it answers
``(ok, why)`` rather than printing, so each command decides what to say.

    folder = ModelFolder.open("segnet_camvid")     # a name (perception-models) or a path
    folder.int8_onnx, folder.int8_verdict()         # Path | None; (True, "int8 40.1 vs fp32 40.0 mIoU on ...")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from perception.core.card import (
    CARD_FILE, ENGINE_SIDECAR_SUFFIX, ENGINE_SUFFIX, HELDOUT_PREFIX, INT8_ONNX_FILE, ONNX_FILE,
    WEIGHTS_FILE, ModelCard, has_mc_dropout, int8_metric_pairs, load_card,
)
from perception.core.cpu import isa_summary, u8s8_may_saturate
from perception.core.onnx_meta import read_onnx_metadata

__all__ = ["ModelFolder", "int8_cpu_verdict", "engine_sidecar", "torch_available", "tensorrt_gpu_available",
           "torch_cuda_status",
           "INT8_MAX_LOSS"]

INT8_MAX_LOSS = 0.005  # precision "auto" runs a folder's int8 graph where its card shows at most this mIoU loss


def engine_sidecar(engine: str | Path) -> Path:
    """The JSON written beside a TensorRT engine (how it was built: input size, unpooling form, card)."""
    return Path(str(engine) + ENGINE_SIDECAR_SUFFIX)


def torch_available() -> bool:
    """Whether PyTorch can be imported here (the runtime install has none)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_cuda_status() -> tuple[bool, str]:
    """(whether PyTorch can run on a CUDA GPU here, why not). A CPU-only PyTorch build is told from its
    ``torch/version.py`` without importing it (the runtime install and CPU machines pay nothing)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False, "PyTorch is not installed (the runtime install runs exported graphs on the CPU)"
    try:
        version_text = Path(spec.origin).with_name("version.py").read_text()
    except OSError:
        version_text = ""
    if re.search(r"^cuda\s*(:[^=]*)?=\s*None\s*$", version_text, re.M):
        return False, "this PyTorch is a CPU-only build"
    import torch

    if not torch.cuda.is_available():
        return False, f"PyTorch {torch.__version__} sees no CUDA GPU (driver, CUDA_VISIBLE_DEVICES)"
    return True, ""


def tensorrt_gpu_available() -> bool:
    """Whether TensorRT, pycuda and a CUDA GPU are all here (an engine can run)."""
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # noqa: BLE001  (no TensorRT, no pycuda, or no driver)
        return False


def int8_cpu_verdict(onnx_path: Path, *, saturates: bool | None = None) -> tuple[bool, str]:
    """Whether an int8 graph computes on this CPU the integers it computed where it was measured. A graph
    with 8-bit weights (``segnet.int8_weight_bits`` 8, or absent: graphs made before the field) does not
    on an x86 CPU without VNNI, where ONNX Runtime's u8 x s8 pair sums saturate int16
    (:mod:`perception.core.cpu`; measured there: 37.3 -> 30.4 held-out mIoU). 7-bit weights cannot."""
    bits = read_onnx_metadata(onnx_path).get("segnet.int8_weight_bits", "8")
    if bits == "7" or not (u8s8_may_saturate() if saturates is None else saturates):
        return True, f"{bits}-bit weights on {isa_summary()}"
    return False, (f"{Path(onnx_path).name} has 8-bit weights and this CPU ({isa_summary()}) has no VNNI: ONNX "
                   "Runtime's u8 x s8 sums saturate here, so the card's int8 mIoU does not hold (perception-export "
                   "--int8 makes a 7-bit-weight graph that is exact on every CPU)")


@dataclass(frozen=True)
class ModelFolder:
    """A model folder and its card: which of its files exist, and whether each may be used here."""

    path: Path
    card: ModelCard

    @classmethod
    def open(cls, path_or_name: str | Path | None = None) -> "ModelFolder":
        """A folder by path, or a model by name or alias (``None``: the shipped default)."""
        from perception.core.zoo import find_model

        path = find_model(path_or_name)
        if not path.is_dir():
            raise ValueError(f"{path} is not a model folder (a folder with {CARD_FILE})")
        return cls(path, load_card(path))

    @property
    def name(self) -> str:
        return self.path.name

    def _file(self, name: str) -> Path | None:
        path = self.path / name
        return path if path.is_file() else None

    @property
    def weights(self) -> Path | None:
        """``weights.safetensors`` (what PyTorch loads), if this install carries it."""
        return self._file(WEIGHTS_FILE)

    @property
    def onnx(self) -> Path | None:
        """The shipped fp32 graph ``model.onnx``, if present (fresh or not: :meth:`onnx_verdict`)."""
        return self._file(ONNX_FILE)

    @property
    def int8_onnx(self) -> Path | None:
        """``model_int8.onnx``, if present (usable or not: :meth:`int8_verdict`)."""
        return self._file(INT8_ONNX_FILE)

    @property
    def mc_dropout(self) -> bool:
        """Whether the model samples dropout at test time (its uncertainty needs PyTorch and the weights)."""
        return has_mc_dropout(self.card)

    def engines(self) -> list[tuple[Path, Path]]:
        """``(engine, sidecar)`` for every TensorRT engine built into this folder (sidecar present)."""
        found = sorted(self.path.glob(f"*{ENGINE_SUFFIX}"))
        return [(e, engine_sidecar(e)) for e in found if engine_sidecar(e).is_file()]

    def engine_here(self) -> tuple[Path | None, str]:
        """The folder's first engine where TensorRT and a CUDA GPU are here, else None and why not."""
        engines = self.engines()
        if not engines:
            return None, f"no {ENGINE_SUFFIX} with its sidecar"
        if not tensorrt_gpu_available():
            return None, "no TensorRT with a CUDA GPU here"
        return engines[0][0], f"{engines[0][0].name} (TensorRT)"

    def heldout_runs(self) -> list["ModelFolder"]:
        """The cards of its recipe's held-out runs kept beside it (``heldout_*/``)."""
        return [ModelFolder(p.parent, load_card(p.parent)) for p in sorted(self.path.glob(f"{HELDOUT_PREFIX}*/{CARD_FILE}"))]

    def int8_verdict(self, *, saturates: bool | None = None) -> tuple[bool, str]:
        """Whether ``precision="auto"`` runs ``model_int8.onnx``, and why: it must be there, the card must
        record its held-out mIoU (``<split>_int8``) within :data:`INT8_MAX_LOSS` of fp32's, and the graph must
        compute the same here (:func:`int8_cpu_verdict`; ``saturates`` overrides the CPU probe, for tests)."""
        graph = self.int8_onnx
        if graph is None:
            return False, f"no {INT8_ONNX_FILE}"
        cpu_ok, cpu_why = int8_cpu_verdict(graph, saturates=saturates)
        if not cpu_ok:
            return False, cpu_why
        for split, fp32, int8 in int8_metric_pairs(self.card.metrics):
            loss = fp32 - int8
            if loss <= INT8_MAX_LOSS + 1e-9:  # at most half a point (float rounding aside)
                return True, f"int8 {100 * int8:.1f} vs fp32 {100 * fp32:.1f} mIoU on {split}"
            return False, f"int8 loses {100 * loss:.2f} points of mIoU on {split} (more than {100 * INT8_MAX_LOSS:g})"
        return False, "its card records no held-out int8 mIoU next to fp32's"

    def onnx_verdict(self, tta: str = "none") -> tuple[bool, str]:
        """Whether the shipped ``model.onnx`` is the graph to run: exported from these very weights (when the
        folder carries them) with this test-time augmentation."""
        graph = self.onnx
        if graph is None:
            return False, f"no {ONNX_FILE}"
        meta = read_onnx_metadata(graph)
        weights = self.weights
        if weights is not None:
            from perception.core.fileio import sha256_file

            if meta.get("segnet.source_sha256") != sha256_file(weights):
                return False, f"{graph} was exported from other weights than {weights}"
        if meta.get("segnet.tta", "none") != tta:
            return False, f"{ONNX_FILE} was exported with TTA {meta.get('segnet.tta', 'none')}, not {tta}"
        return True, f"{ONNX_FILE} from these weights"
