"""Training checkpoints: written atomically (temporary file, fsync, rename), loaded without pickle
code execution (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.core.fileio import atomic_write_bytes

__all__ = ["atomic_torch_save", "load_checkpoint", "compact_checkpoint", "capture_rng_state", "restore_rng_state"]


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """Save so that ``path`` is always either the old complete file or the new complete file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def capture_rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def compact_checkpoint(ck: dict[str, Any], *, dtype: torch.dtype = torch.float16,
                       keep_optimizer: bool = False) -> dict[str, Any]:
    """A smaller copy of a training checkpoint, to keep a large run's resume state under a size limit
    (e.g. a git host's 100 MB per file): floating-point weights (and optimiser moments, if kept) cast to
    ``dtype``, the optimiser state dropped unless ``keep_optimizer``.

    Resuming from it is close to, not identical to, an uninterrupted run: loading casts the weights back
    to float32 (one rounding), and without optimiser state AdamW restarts its moments at the saved point
    of the schedule. ``compact`` in the result records what was reduced.
    """

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
            return value.to(dtype)
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value

    out = {k: v for k, v in ck.items() if k not in ("model", "optimizer")}
    out["model"] = cast(ck["model"])
    if keep_optimizer and "optimizer" in ck:
        # param_groups hold hyper-parameters (floats, not tensors); only the per-parameter state is cast.
        out["optimizer"] = {"state": cast(ck["optimizer"]["state"]), "param_groups": ck["optimizer"]["param_groups"]}
    out["compact"] = {"dtype": str(dtype).removeprefix("torch."), "optimizer": "optimizer" in out}
    return out
