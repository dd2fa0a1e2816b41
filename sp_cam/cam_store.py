"""Compact storage of exported baseline CAMs (step B) for the stage-1 loss.

One ``<id>.npz`` per image, no pickle:
    classes: (n,) int16, the present foreground classes (1..K), ascending
    cams:    (n, H, W) uint8 (score * 255, rounded) or float16 (score), scores in [0, 1]
    size:    (2,) int32, (H, W) of the original image
Background and absent classes are not stored: stage 1 ignores the former and the latter are zero.
A missing, empty, truncated or damaged file: :func:`is_valid` is False, :func:`load_cam` one line naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sp_cam.io import DamagedFileError, atomic_write, read_npz

CAM_DTYPES = ("uint8", "float16")
CAM_KEYS = ("classes", "cams", "size")


def save_cam(path: str | Path, fg_cams: np.ndarray, classes, dtype: str = "uint8") -> None:
    """Write the CAMs of the present classes.

    Args:
        fg_cams: (n, H, W) float scores in [0, 1], one map per entry of ``classes``.
        classes: n foreground class indices in 1..K.
    """
    if dtype not in CAM_DTYPES:
        raise ValueError(f"CAM dtype must be one of {CAM_DTYPES}, got {dtype!r}")
    fg_cams = np.asarray(fg_cams, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int16).reshape(-1)
    if fg_cams.ndim != 3 or fg_cams.shape[0] != classes.size:
        raise ValueError(f"{path}: expected cams (n, H, W) with n = {classes.size}, got {fg_cams.shape}")
    order = np.argsort(classes)
    classes, fg_cams = classes[order], np.clip(fg_cams[order], 0.0, 1.0)
    stored = np.rint(fg_cams * 255).astype(np.uint8) if dtype == "uint8" else fg_cams.astype(np.float16)
    size = np.asarray(fg_cams.shape[1:], dtype=np.int32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, classes=classes, cams=stored, size=size)

    atomic_write(path, write)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(classes, cams, (H, W)) of a CAM file whose arrays agree with each other."""
    z = read_npz(path, CAM_KEYS, what="CAM file")
    classes, cams, size = z["classes"], z["cams"], z["size"]
    if classes.ndim != 1 or size.shape != (2,) or cams.dtype not in (np.uint8, np.float16):
        raise DamagedFileError(
            f"{path}: not a valid CAM file (classes {classes.shape}, size {size.shape}, cams {cams.dtype})"
        )
    h, w = (int(v) for v in size)
    if cams.ndim != 3 or cams.shape[0] != classes.size or cams.shape[1:] != (h, w):
        raise DamagedFileError(
            f"{path}: cams of shape {cams.shape} do not match {classes.size} classes of size {(h, w)}"
        )
    return classes, cams, (h, w)


def is_valid(path: str | Path) -> bool:
    """A complete, readable CAM file (every array decompressed and consistent), so a stage may keep it.

    False for a missing, empty, truncated or damaged file: the caller recomputes it.
    """
    try:
        _read(Path(path))
    except (FileNotFoundError, DamagedFileError):
        return False
    return True


def load_cam(path: str | Path, num_classes: int, expect_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a CAM file into a dense foreground array.

    Args:
        num_classes: K, the number of foreground classes.
        expect_size: (H, W) the image size, checked when given.
    Returns:
        (K, H, W) float32 in [0, 1]; channel c-1 holds class c, absent classes are 0.
    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: an empty, truncated or damaged file (one line naming it; :func:`is_valid` says False).
        ValueError: a file of another size or class count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CAM file not found: {path}")
    classes, cams, (h, w) = _read(path)
    if expect_size is not None and (h, w) != tuple(expect_size):
        raise ValueError(f"{path}: CAM size {(h, w)} does not match the image size {tuple(expect_size)}")
    if classes.size and (classes.min() < 1 or classes.max() > num_classes):
        raise ValueError(f"{path}: class index out of range 1..{num_classes}: {classes.tolist()}")
    scale = 1.0 / 255 if cams.dtype == np.uint8 else 1.0
    dense = np.zeros((num_classes, h, w), dtype=np.float32)
    dense[classes.astype(np.int64) - 1] = cams.astype(np.float32) * scale
    return dense
