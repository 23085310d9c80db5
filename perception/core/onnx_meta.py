"""What an exported ONNX file carries about its model (card, precision, unpooling form, TTA), read
without torch: the ONNX Runtime and TensorRT paths of a torch-free runtime need it."""

from __future__ import annotations

import json
from pathlib import Path

from perception.core.card import ModelCard

__all__ = ["METADATA_CARD_KEY", "read_onnx_metadata", "read_card_from_onnx"]

METADATA_CARD_KEY = "segnet.model_card"


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (external weight files are not read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise ValueError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None
    return {p.key: p.value for p in proto.metadata_props}


def read_card_from_onnx(path: str | Path, meta: dict[str, str] | None = None) -> ModelCard:
    """The model card embedded by :func:`export_onnx`; pass ``meta`` when it was already read."""
    meta = read_onnx_metadata(path) if meta is None else meta
    if METADATA_CARD_KEY not in meta:
        raise ValueError(f"{path} was not exported by segnet-perception (no {METADATA_CARD_KEY} metadata)")
    return ModelCard.from_dict(json.loads(meta[METADATA_CARD_KEY]))
