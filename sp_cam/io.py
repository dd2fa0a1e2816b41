"""On-disk formats: atomic writes, label PNGs, checkpoints, JSON lines. Nothing here unpickles."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.classes import IGNORE_INDEX, label_colormap


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one metrics record as a JSON line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_label_png(path: str | Path, label: np.ndarray) -> None:
    """Write a class-index map as an 8-bit palette PNG (VOC colour map), atomically.

    Args:
        label: (H, W) integer array of class indices 0..K, or 255 for ignore.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {label.shape}")
    if label.size and (label.min() < 0 or (label.max() > 254 and label.max() != IGNORE_INDEX)):
        raise ValueError(f"{path}: label values must be in 0..254 or {IGNORE_INDEX}")
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(label_colormap().reshape(-1).tolist())
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a palette or grey PNG of class indices as (H, W) uint8. RGB images are refused."""
    path = Path(path)
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"label PNG not found: {path}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    if img.mode not in ("P", "L", "I", "I;16"):
        raise ValueError(f"{path}: expected a palette or grey PNG of class indices, got mode {img.mode}")
    return np.asarray(img).astype(np.uint8)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save a checkpoint of tensors, numbers, strings, lists and dicts (loadable with weights_only).

    Saved through a file object, so the archive's inner folder is the fixed "archive" rather than the temporary file's
    random name: the same state gives the same bytes (and sha256) wherever and whenever it is saved.
    """
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no arbitrary unpickling)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file; name it
        raise ValueError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
