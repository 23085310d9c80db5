"""Config files: the YAML layer of every CLI's defaults < YAML < flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_yaml_options"]


def load_yaml_options(path: str | Path) -> dict[str, Any]:
    """The option mapping in a YAML file, keys with ``-`` read as ``_``; one-line errors for a missing
    file, invalid YAML, or anything but a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ValueError(f"{path} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in loaded.items()}
