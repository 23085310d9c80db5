"""The model index: shipped models by name, and users' own model folders.

Every install carries the shipped model folders inside the package (``perception/zoo/<name>/``; a
checkout also has them as ``models/``). ``perception/zoo/index.yaml`` names them, gives aliases,
measured speed and the default; everything else is read from each folder's ``model.json`` (architecture,
classes, whether it samples dropout, metrics). Users' own folders are found by name too, in the
directories of ``$PERCEPTION_MODEL_PATH`` (``os.pathsep``-separated), searched before the shipped ones.

    from perception.core.zoo import find_model, list_entries
    find_model("segnet_camvid")      # -> Path of the folder
    find_model("models/x.onnx")      # a path is a path
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perception.core.card import (
    CARD_FILE, HELDOUT_PREFIX, INT8_ONNX_FILE, ONNX_FILE, WEIGHTS_FILE, ModelCard, has_mc_dropout, load_card,
)
from perception.core.options import opt

__all__ = ["ZOO_DIR", "MODEL_PATH_ENV", "ModelEntry", "find_model", "list_entries", "default_model_name",
           "heldout_metrics", "INT8_ONNX_FILE", "models_table", "build_parser", "main"]

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
MODEL_PATH_ENV = "PERCEPTION_MODEL_PATH"


@dataclass
class ModelEntry:
    """One model the index knows: its name, folder and what its card says."""

    name: str
    folder: Path
    card: ModelCard
    aliases: list[str] = field(default_factory=list)
    speed: dict[str, float] = field(default_factory=dict)
    shipped: bool = True
    default: bool = False

    @property
    def architecture(self) -> str:
        return str(self.card.architecture.get("name"))

    @property
    def mc_dropout(self) -> bool:
        return has_mc_dropout(self.card)

    @property
    def files(self) -> list[str]:
        """The runtime files present: fp32 ONNX, int8 ONNX, weights (PyTorch)."""
        names = {ONNX_FILE: "onnx", INT8_ONNX_FILE: "onnx-int8", WEIGHTS_FILE: "weights"}
        return [label for f, label in names.items() if (self.folder / f).is_file()]


def _index() -> dict[str, Any]:
    import yaml

    path = ZOO_DIR / "index.yaml"
    if not path.is_file():
        return {"models": {}}
    return yaml.safe_load(path.read_text()) or {"models": {}}


def default_model_name() -> str:
    return str(_index().get("default", "segnet_basic_camvid"))


def _user_dirs() -> list[Path]:
    return [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]


def list_entries() -> list[ModelEntry]:
    """Users' model folders (``$PERCEPTION_MODEL_PATH``), then the shipped ones, in index order."""
    index = _index()
    default = default_model_name()
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for d in _user_dirs():
        for card_file in sorted(d.glob(f"*/{CARD_FILE}")) if d.is_dir() else []:
            name = card_file.parent.name
            if name not in seen:
                seen.add(name)
                entries.append(ModelEntry(name, card_file.parent, load_card(card_file.parent), shipped=False))
    for name, meta in (index.get("models") or {}).items():
        folder = ZOO_DIR / name
        if name in seen or not (folder / CARD_FILE).is_file():
            continue
        seen.add(name)
        meta = meta or {}
        entries.append(ModelEntry(name, folder, load_card(folder), aliases=list(meta.get("aliases") or []),
                                  speed=dict(meta.get("speed") or {}), default=name == default))
    return entries


def find_model(name_or_path: str | Path | None) -> Path:
    """A model path, or a model's folder by name or alias (default model for None).

    Paths win: an existing file or folder is returned as it is. Raises FileNotFoundError naming the
    models that exist.
    """
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = default_model_name()
    path = Path(name_or_path)
    if path.exists():
        return path
    text = str(name_or_path)
    if os.sep not in text and "/" not in text and not path.suffix:
        entries = list_entries()
        for e in entries:
            if text == e.name or text in e.aliases:
                return e.folder
        known = ", ".join(e.name for e in entries) or "none"
        raise FileNotFoundError(f"no model named {text!r} (shipped and in ${MODEL_PATH_ENV}: {known}; "
                                "perception-models lists them)")
    raise FileNotFoundError(f"model not found: {path}")


def heldout_metrics(entry: ModelEntry) -> tuple[str, dict[str, Any], str] | None:
    """(split, metrics, where) of the model's held-out evaluation: a split of its own card on a drive
    it did not train on, else the held-out run of its recipe kept beside it (``heldout_*/``), which the
    model itself may have trained on (then ``where`` says so)."""
    def holdout_of(card: ModelCard) -> tuple[str, dict[str, Any]] | None:
        drives = card.training.get("holdout") or []
        for drive in drives:
            key = f"holdout_{drive}"
            if isinstance(card.metrics.get(key), dict):
                return key, card.metrics[key]
        return None

    own = holdout_of(entry.card)
    if own:
        return own[0], own[1], "this model"
    for sub in sorted(entry.folder.glob(f"{HELDOUT_PREFIX}*/{CARD_FILE}")):
        found = holdout_of(load_card(sub.parent))
        if found:
            return found[0], found[1], f"its recipe's held-out run ({sub.parent.name}/)"
    return None


def models_table(entries: list[ModelEntry]) -> list[dict[str, str]]:
    """One row per model: what ``perception-models`` prints (and ``--json`` writes)."""
    rows = []
    for e in entries:
        held = heldout_metrics(e)
        miou = f"{100 * held[1]['miou']:.1f}" if held and "miou" in held[1] else "-"
        fps = "/".join(f"{e.speed[k]:g}" for k in ("fp32_fps", "int8_fps") if k in e.speed) or "-"
        rows.append({
            "name": e.name + (" (default)" if e.default else ""),
            "aliases": ",".join(e.aliases) or "-",
            "architecture": e.architecture + (" + MC dropout" if e.mc_dropout else ""),
            "files": ",".join(e.files) or "-",
            "heldout_miou": miou + (f" ({held[0].removeprefix('holdout_')}, {held[2]})" if held else ""),
            "cpu_fps_fp32/int8": fps,
            "folder": str(e.folder) if not e.shipped else "(shipped)",
        })
    return rows


@dataclass
class ModelsOptions:
    """perception-models' options (core.options)."""

    json: bool = opt(False, help="one JSON object per model")


def build_parser():
    import argparse

    from perception.core.options import add_arguments

    p = argparse.ArgumentParser(prog="perception-models", description="List the models this install can run by "
                                f"name: the shipped ones, and model folders in ${MODEL_PATH_ENV}.")
    add_arguments(p, ModelsOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    import json

    from perception.core.options import parse_into

    args = parse_into(build_parser(), ModelsOptions, argv)
    try:
        rows = models_table(list_entries())
    except (OSError, ValueError) as e:
        from perception.core.cli import fail

        return fail("perception-models", str(e))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no models found (shipped: {ZOO_DIR}; ${MODEL_PATH_ENV}: {os.environ.get(MODEL_PATH_ENV, '')!r})")
        return 1
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    return 0
