"""Reading PNGs of class indices (GT masks, pseudo labels, predictions): the one owner of what such a file may be.

Written by :func:`sp_cam.io.write_label_png` (8-bit palette, VOC colour map).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# What PIL raises on a damaged or truncated image: OSError ("image file is truncated"), SyntaxError ("broken PNG
# file"), ValueError, EOFError, zlib.error, and DecompressionBombError for an absurd declared size.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def first_line(e: BaseException) -> str:
    """The first line of an error's message, or its class name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    such as 258 would silently become 2), grey below 8 bits (PIL rescales those to 0..255), files that are not
    PNGs, and damaged or truncated files.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``"<path>: <what is wrong>"``.
    """
    path = Path(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"label PNG not found: {path}") from None
    except IMAGE_ERRORS as e:
        raise ValueError(f"{path}: cannot read image ({first_line(e)})") from None
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
        except IMAGE_ERRORS as e:
            raise ValueError(f"{path}: cannot read image ({first_line(e)})") from None
        return np.asarray(img, dtype=np.uint8).copy()
