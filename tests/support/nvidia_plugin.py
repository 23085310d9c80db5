"""Load NVIDIA's own ``tensorrt.plugin`` (pure Python, from the pinned ``tensorrt-cu12-bindings`` wheel) over
the stand-in compiled module of ``trt_standin.py``. The wheel's compiled ``tensorrt.so`` is never imported
(it needs TensorRT's libraries); only ``tensorrt_bindings/plugin/*.py`` is read."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PINNED_DIST = "tensorrt-cu12-bindings"
PINNED_VERSION = "10.14.1.48.post1"  # the release the plugins are written against (pyproject's floor)
INSTALL = f"pip install --no-deps {PINNED_DIST}=={PINNED_VERSION}"


def plugin_sources() -> tuple[Path | None, str]:
    """(the folder of NVIDIA's plugin/*.py, "") or (None, why not)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PINNED_DIST)
    except metadata.PackageNotFoundError:
        return None, f"{PINNED_DIST} is not installed ({INSTALL})"
    if dist.version != PINNED_VERSION:
        return None, f"{PINNED_DIST} {dist.version} is installed; these checks pin {PINNED_VERSION} ({INSTALL})"
    folder = Path(dist.locate_file("tensorrt_bindings/plugin"))
    if not (folder / "_lib.py").is_file():
        return None, f"{folder} holds no tensorrt.plugin sources"
    return folder, ""


def load(folder: Path) -> tuple[ModuleType, ModuleType]:
    """A fresh stand-in ``tensorrt`` and NVIDIA's ``tensorrt.plugin`` on it, both in ``sys.modules``
    (the caller restores them); returns (trt, trtp)."""
    for name in [m for m in sys.modules if m == "tensorrt" or m.startswith("tensorrt.")]:
        del sys.modules[name]
    support = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("tensorrt", support / "trt_standin.py")
    trt = importlib.util.module_from_spec(spec)
    sys.modules["tensorrt"] = trt
    spec.loader.exec_module(trt)
    spec = importlib.util.spec_from_file_location("tensorrt.plugin", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    trtp = importlib.util.module_from_spec(spec)
    sys.modules["tensorrt.plugin"] = trtp
    trt.plugin = trtp
    spec.loader.exec_module(trtp)
    return trt, trtp
