"""Exports made on demand: a model folder whose ``model.onnx`` is missing or was exported from other weights
(or with another test-time augmentation) runs an export cached per weights hash, made here with PyTorch.
:func:`perception.inference.resolve.resolve` decides when (``Resolution.export_tta``); this makes it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from perception.core.card import CARD_FILE
from perception.core.fileio import sha256_file
from perception.core.model_folder import ModelFolder

__all__ = ["cache_dir", "cached_onnx"]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/segnet-perception/onnx`` (``~/.cache/...`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segnet-perception" / "onnx"


def cached_onnx(folder: ModelFolder, tta: str = "none") -> Path:
    """The folder's graph exported from its weights (labels out, ``onnx`` unpooling), made once per weights
    and card and reused after."""
    if folder.weights is None:
        raise FileNotFoundError(f"model folder {folder.path} has no weights to export a graph from")
    sha = sha256_file(folder.weights)
    card_sha = hashlib.sha256((folder.path / CARD_FILE).read_bytes()).hexdigest()[:8]
    path = cache_dir() / f"{folder.name}-{sha[:16]}-{card_sha}-onnx{'-' + tta if tta != 'none' else ''}.onnx"
    if not path.is_file():
        from perception.export.onnx import ExportOptions, export_onnx

        export_onnx(folder.path, path, ExportOptions(unpool="onnx", outputs=("labels",), tta=tta))
    return path
