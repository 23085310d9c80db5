"""Small file helpers shared across the package: atomic writes, content hashes, image listing."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "sha256_file", "IMAGE_SUFFIXES", "is_image_path", "list_images"]


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` so that ``path`` is always either the old complete file or the new one
    (temporary file in the same folder, fsync, rename). Nothing half-written is ever left at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder_or_glob: str | Path) -> list[Path]:
    """The image files of a folder, or matching a glob pattern (``*``, ``?``, ``[``), sorted by name;
    [] where there are none (the caller says what that means). Regular files only: a FIFO or a device
    named ``*.png`` would block the reader for ever."""
    import glob

    text = str(folder_or_glob)
    if any(ch in text for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(text) if is_image_path(p) and Path(p).is_file())
    folder = Path(text)
    return sorted(p for p in folder.iterdir() if is_image_path(p) and p.is_file()) if folder.is_dir() else []
