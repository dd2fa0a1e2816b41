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


def _png_pixel_kind(img: Image.Image) -> str | None:
    """None for a palette PNG or an 8-bit grey PNG; else a short description of what the PNG holds ("16-bit grey")."""
    if img.mode == "P":
        return None  # any bit depth: the stored palette index is the class
    args = (img.tile[0].args if hasattr(img.tile[0], "args") else img.tile[0][3]) if img.tile else img.mode
    rawmode = args if isinstance(args, str) else str(args[0])  # "L", "L;4", "I;16B", ...: the bit depth on disk
    if img.mode == "L":
        return None if rawmode == "L" else f"{rawmode.partition(';')[2] or '?'}-bit grey"
    if img.mode.startswith("I;16") or rawmode.startswith("I;16"):
        return "16-bit grey"
    return {"I": "32-bit grey", "1": "1-bit", "RGB": "RGB colour", "RGBA": "RGBA colour"}.get(img.mode, img.mode)


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a PNG of class indices as (H, W) uint8.

    Accepted: palette (P, any bit depth: the palette index is the class) and 8-bit grey (L). Refused with one line
    naming the file: RGB/RGBA (colours, not indices), 16-bit or 32-bit grey (``I;16``, ``I``: in a uint8 map a value
    such as 258 would silently become 2), grey below 8 bits (PIL rescales those to 0..255), and files that are not
    PNGs.
    """
    path = Path(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"label PNG not found: {path}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    with img:
        if img.format != "PNG":
            raise ValueError(f"{path}: a {img.format} file, expected a PNG of class indices")
        kind = _png_pixel_kind(img)
        if kind is not None:
            raise ValueError(
                f"{path}: {kind} PNG (mode {img.mode}), expected an 8-bit palette (P) or grey (L) PNG of class indices"
            )
        try:
            img.load()
        except OSError as e:
            raise ValueError(f"{path}: cannot read image ({e})") from None
        return np.asarray(img, dtype=np.uint8).copy()


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
