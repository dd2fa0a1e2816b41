"""Image ids as file names: the one check an id passes where a list is read, and the guard where a path is built.

An id from a split list becomes ``<folder>/<id><suffix>`` in the dataset and in the work directory (``cams/<id>.npz``,
``pseudo_labels/<id>.png`` ...), files that stages write and delete. :func:`check_id` refuses, with one line naming
the list file and line, every id that could name a file outside its folder; :func:`path_inside` is the second guard,
at the place a path is built, for names that did not come through a list.
"""

from __future__ import annotations

from pathlib import Path, PureWindowsPath


class BadIdError(ValueError):
    """An id that is not usable as a file name, or a path that would leave its folder (one line)."""


def _id_problem(image_id: str) -> str | None:
    if not image_id:
        return "is empty"
    if "\0" in image_id:
        return "contains a NUL character"
    windows = PureWindowsPath(image_id)
    if image_id.startswith(("/", "\\")) or windows.is_absolute() or windows.drive:
        return "is an absolute path"
    if "/" in image_id or "\\" in image_id:
        return "contains a path separator"
    if ".." in image_id:
        return "contains '..'"
    if any(ch.isspace() for ch in image_id):
        return "contains white space"
    return None


def check_id(image_id: str, source: str | Path, line_no: int | None = None) -> str:
    """Return ``image_id`` if it is safe as a file name, else raise naming ``source`` (and line ``line_no``).

    Refused: empty ids, a NUL, ``/`` or ``\\`` anywhere, ``..`` anywhere (so never a parent folder, whole or as a
    part), absolute paths (POSIX ``/x``, Windows ``C:\\x``, ``C:x``, ``\\\\server\\x``) and white space (list lines are
    split on it; deeplab-pytorch's list format too).

    Raises:
        BadIdError: ``"<source>:<line_no>: id '<id>' <problem>; ids are used as file names"``.
    """
    problem = _id_problem(image_id)
    if problem is not None:
        where = f"{source}:{line_no}" if line_no is not None else str(source)
        raise BadIdError(f"{where}: id {image_id!r} {problem}; ids are used as file names")
    return image_id


def read_id_list(path: str | Path, unique: bool = True) -> list[str]:
    """The ids of a list file (the first word of every non-blank line), each checked by :func:`check_id`.

    Args:
        unique: refuse an id listed twice (else later copies are dropped).
    Raises:
        FileNotFoundError: no such file.
        BadIdError: an unsafe id (naming the file and line), or (``unique``) the same id on two lines.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise BadIdError(f"{path}: not a text file of ids ({e.reason} at byte {e.start})") from None
    ids: list[str] = []
    seen_on: dict[str, int] = {}
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        image_id = check_id(line.split()[0], path, no)
        if image_id in seen_on:
            if unique:
                raise BadIdError(f"{path}:{no}: duplicate id {image_id!r} (first on line {seen_on[image_id]})")
            continue
        seen_on[image_id] = no
        ids.append(image_id)
    return ids


def path_inside(folder: str | Path, name: str, suffix: str = "") -> Path:
    """``folder / (name + suffix)``, refused when it would not be a file directly or deeper inside ``folder``.

    The folder and the parents of the file are resolved (symlinks followed), the file itself is not: a symlinked
    output file is replaced or removed as a link, never through it.

    Raises:
        BadIdError: ``"<folder>: name '<name>' would make <path>, outside this folder"``.
    """
    folder = Path(folder)
    path = folder / f"{name}{suffix}"
    problem = None
    if not name or "\0" in name:
        problem = "is empty" if not name else "contains a NUL character"
    elif path.name in ("", ".", ".."):
        problem = f"would make {path}, not a file"
    else:
        base = folder.resolve()
        where = path.parent.resolve()
        if where != base and base not in where.parents:
            problem = f"would make {path}, outside this folder"
    if problem is not None:
        raise BadIdError(f"{folder}: name {name!r} {problem}")
    return path
