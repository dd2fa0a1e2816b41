"""On-disk formats: atomic writes, label PNGs, checkpoints, JSON lines, ``.npz`` archives. Nothing here unpickles.

Every write goes through :func:`atomic_write`: a temporary file beside the target, flushed to disk (``fsync``) and
renamed over it, then the folder flushed, so after a crash or a power cut a file is either the old one or the whole
new one. A write that the file system refuses (read-only, no permission, full) is a :class:`CannotWriteError`, one
line naming the path. Label PNGs are read by :func:`data.label_png.read_label_png`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.classes import IGNORE_INDEX, label_colormap

TMP_MARK = ".tmp"  # atomic_write's temporary files: ".<name>.<8 random characters>.tmp<suffix of name>"
# tempfile.mkstemp's random part: 8 characters of tempfile._RandomNameSequence.characters
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(TMP_MARK) + r"(?P<suffix>(\.[^.]*)?)$")
# What np.load / NpzFile raise on an empty, truncated or damaged archive.
NPZ_ERRORS = (EOFError, zipfile.BadZipFile, zlib.error, ValueError, OSError, KeyError)


class CannotWriteError(OSError):
    """A file or folder cannot be written (read-only file system, no permission, disk full, a file in the way)."""

    def __init__(self, path: str | Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path = Path(path)
        self.reason = write_failure_reason(self.path, cause)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


class DamagedFileError(ValueError):
    """A file of the work directory (or a weights file) that exists but cannot be read: empty, truncated, damaged."""


def write_failure_reason(path: str | Path, e: OSError) -> str:
    """Why a write to ``path`` failed: the system's reason, or the file in the way where a folder should be (mkdir
    says only "Not a directory" or "File exists")."""
    path = Path(path)
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        for parent in (path, *path.parents):
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file, not a folder"
    return e.strerror or str(e)


def cannot_write(path: str | Path, e: OSError) -> CannotWriteError:
    """The :class:`CannotWriteError` of an ``OSError`` raised while writing ``path`` (for ``raise ... from None``)."""
    return e if isinstance(e, CannotWriteError) else CannotWriteError(path, e)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows commits only writable handles
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; best effort where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder (EINVAL); the rename is done either way
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact: the temporary file
    is flushed to disk before the rename and the folder after it, so a power cut cannot leave an empty or partial
    file under the final name. A kill leaves at most the temporary file, which :func:`remove_stale_temporaries`
    deletes.

    Raises:
        CannotWriteError: the folder or the file cannot be written (one line naming ``path``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_MARK + path.suffix, dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        refused = _refused_write(e)
        if refused is None:  # not the file system's refusal (a bug, PIL's "cannot write mode X as PNG", Ctrl-C)
            raise
        raise cannot_write(path, refused) from None
    fsync_dir(path.parent)


def _refused_write(e: BaseException) -> OSError | None:
    """The file system's ``OSError`` behind ``e``: ``e`` itself, or the one it was raised from (torch.save turns a
    failed write of its file object into a ``RuntimeError``)."""
    if isinstance(e, OSError):
        return e if e.errno is not None else None
    if isinstance(e, RuntimeError):
        inner = e.__cause__ or e.__context__
        if isinstance(inner, OSError) and inner.errno is not None:
            return inner
    return None


def is_stale_temporary(path: str | Path) -> bool:
    """Whether ``path`` is named as :func:`atomic_write` names its temporary files (``.<name>.XXXXXXXX.tmp<suffix>``,
    with ``<suffix>`` the suffix of ``<name>``)."""
    m = _TMP_NAME.match(Path(path).name)
    return m is not None and m.group("suffix") == Path(m.group("name")).suffix


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left in ``folder`` when a process was killed mid-write.

    Only regular files (not links, not folders) directly in ``folder`` whose name has exactly the temporary-file form
    are removed; nothing else is touched. Call it where no other process writes into ``folder`` (a stage, under its
    lock, on rank 0 before the others start): a live writer's temporary file has the same name.

    Returns:
        The removed files, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if is_stale_temporary(p) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one metrics record as a JSON line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise cannot_write(path, e) from None


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
    """Load a checkpoint safely (``weights_only=True``: no arbitrary unpickling).

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: an empty, truncated or damaged file, a pickle of Python objects, a file of another format,
            or one that does not hold a dict: ``"<path>: not a loadable checkpoint (<cause>)"``.
    """
    from net.backbones import load_torch_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = load_torch_file(path, map_location=map_location)
    except ValueError as e:
        raise DamagedFileError(str(e)) from None
    if not isinstance(state, dict):
        raise DamagedFileError(f"{path}: not a loadable checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def _npz_failure(path: Path, e: BaseException) -> str:
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as oe:
        return f"cannot read it: {oe.strerror or oe}"
    if not head:
        return "empty file, 0 bytes"
    if head != b"PK\x03\x04":
        return "not a zip archive"
    text = str(e).strip()
    return f"truncated or damaged archive: {text.splitlines()[0] if text else type(e).__name__}"


def read_npz(
    path: str | Path, keys: Sequence[str] | None = None, what: str = "file", required: bool = True
) -> dict[str, np.ndarray]:
    """Every entry (or ``keys``) of an ``.npz`` archive, decompressed, without unpickling.

    Args:
        keys: the entries to read (default: all); with ``required=False`` the absent ones are left out.
        what: the kind of file, for the messages ("CAM file", "scores file").
    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: an empty, truncated or damaged archive, another format, or a missing required key, naming
            ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except NPZ_ERRORS as e:
        raise DamagedFileError(f"{path}: not a valid {what} ({_npz_failure(path, e)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DamagedFileError(f"{path}: not a valid {what} (a single .npy array, not an .npz archive)")
    with z:
        wanted = list(z.files) if keys is None else [k for k in keys if required or k in z.files]
        missing = [k for k in wanted if k not in z.files]
        if missing:
            raise DamagedFileError(f"{path}: not a valid {what} (no {', '.join(missing)}; has {', '.join(z.files)})")
        try:
            return {k: z[k] for k in wanted}
        except NPZ_ERRORS as e:
            raise DamagedFileError(f"{path}: not a valid {what} ({_npz_failure(path, e)})") from None


LOAD_ERROR_CHARS = 300  # how much of a state-dict mismatch a one-line error shows


def describe_load_error(e: BaseException) -> str:
    """One line from ``load_state_dict``'s error: the detail lines (missing, unexpected, mis-shaped keys) joined,
    not only its first line ("Error(s) in loading state_dict for X:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = "; ".join(lines[1:] or lines) or type(e).__name__
    return detail if len(detail) <= LOAD_ERROR_CHARS else detail[: LOAD_ERROR_CHARS - 3] + "..."
