"""Guards of a stage's folder: one run at a time (:class:`StageLock`), and outputs tied to their inputs (DONE markers).

Lock: ``<stage dir>/.lock`` holds an advisory ``flock`` while the stage runs and a JSON record of its owner
``{"pid", "host", "started", "command"}``. A second run of the stage fails at once, naming the owner; a record left
by a process that ended without releasing it (killed) is taken over with a warning. The file is emptied on release,
never removed (removing a lock file lets two processes lock two different files).

DONE marker: ``<stage dir>/DONE`` as JSON ``{"format", "fingerprint", "inputs", "finished", "extra"}``, where
``inputs`` is what the outputs were computed from (config values, weights digests, the split list) and
``fingerprint`` its sha256. :func:`check_done` says whether a finished stage can be reused, refuses one finished for
other inputs with one line naming the changed keys, and reuses markers of the older plain-text form with a warning;
:func:`done_fingerprint` is what a later stage records of an earlier one whose files it reads.

``--force``: :func:`remove_outputs` deletes a stage's outputs, only inside the work dir, keeping the lock file.
What each stage records and how the stages take their lock: :mod:`sp_cam.stage_guard`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sp_cam.io import atomic_write_json, cannot_write

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to the owner record alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
DONE_FORMAT = "spcam-done/1"
DIGEST_CHUNK = 1 << 20
SHOWN_CHARS = 40  # a changed value longer than this is shortened in the message
# flock not offered by the file system (Lustre without -o flock, some FUSE mounts): use the owner record alone
_NO_FLOCK = frozenset(
    getattr(errno, n) for n in ("ENOLCK", "ENOSYS", "EOPNOTSUPP", "ENOTSUP", "EINVAL") if hasattr(errno, n)
)


class StageLockedError(ValueError):
    """The stage is being run by another process (one line naming it)."""


class StaleOutputError(ValueError):
    """A finished stage whose outputs were computed from other inputs (one line naming the changed keys)."""


# ---------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _describe(owner: Mapping[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {when}: {owner.get('command', '?')}"


class StageLock:
    """Hold ``folder/.lock`` while a stage runs: ``with StageLock(paths.cam, "stage A", enabled=rank == 0): ...``.

    Args:
        folder: the stage's folder (created if needed).
        label: the stage, for messages ("stage A", "pseudo labels").
        enabled: False makes the lock a no-op (every rank but 0 under torchrun: rank 0 locks for the launch).
        command: recorded as the owner's command line (default: ``sys.argv``).
        lock_name: the lock file's name in ``folder``; shards launched by hand (``--shard i/n``) are separate
            processes that run together on purpose: each takes its own (``.lock-shard-1-of-4``).

    Raises (on entering):
        StageLockedError: another live process holds the lock: ``"<folder>: <label> is already running (pid P on
            HOST, started T: COMMAND); wait for it to finish or stop it"``.
        CannotWriteError: the folder or the lock file cannot be written.

    The lock is released on leaving the block, also on an exception.
    """

    def __init__(
        self,
        folder: str | Path,
        label: str,
        enabled: bool = True,
        command: str | None = None,
        lock_name: str = LOCK_FILE,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / lock_name
        self.label = label
        self.enabled = enabled
        self.command = command if command is not None else " ".join(sys.argv)
        self._fd: int | None = None

    def _read_owner(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        if not raw.strip():
            return None
        try:
            owner = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"pid": "?", "host": "?", "command": f"unreadable {self.path}"}
        return owner if isinstance(owner, dict) else {"pid": "?", "host": "?", "command": f"unreadable {self.path}"}

    def _owner_alive(self, owner: Mapping[str, Any]) -> bool:
        """Whether the recorded owner may still run (another host's process cannot be checked: assumed alive)."""
        if owner.get("host") != socket.gethostname():
            return True
        pid = owner.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)

    def _refuse(self, owner: Mapping[str, Any] | None, note: str = "") -> StageLockedError:
        who = _describe(owner) if owner else "owner unknown"
        return StageLockedError(
            f"{self.folder}: {self.label} is already running ({who}){note}; wait for it to finish or stop it"
        )

    def __enter__(self) -> StageLock:
        if not self.enabled:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise cannot_write(self.path, e) from None
        try:
            flocked = self._flock(fd)
            owner = self._read_owner(fd)
            if not flocked:
                if owner is not None and self._owner_alive(owner):
                    raise self._refuse(owner, f"; no flock on this file system: delete {self.path} if it has ended")
            if owner is not None:
                log.warning(
                    "%s: taking over the lock of pid %s on %s, which ended without releasing it",
                    self.folder, owner.get("pid", "?"), owner.get("host", "?"),
                )  # fmt: skip
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(record) + "\n").encode())
            except OSError as e:  # a full disk
                raise cannot_write(self.path, e) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _flock(self, fd: int) -> bool:
        """Take the flock: True when held, False where the file system has none; raise when another process has it."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read_owner(fd)
            note = ""
            mine = owner is not None and owner.get("pid") == os.getpid()
            if owner and not mine and owner.get("host") == socket.gethostname() and not self._owner_alive(owner):
                note = f"; pid {owner.get('pid')} has ended but a process it started still holds the lock"
            raise self._refuse(owner, note) from None
        except OSError as e:
            if e.errno in _NO_FLOCK:
                return False
            raise cannot_write(self.path, e) from None
        return True

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: nobody holds it
        except OSError:
            pass
        finally:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:
                    pass
            os.close(fd)


def shard_lock_name(shard: tuple[int, int]) -> str:
    """The lock file of shard ``(i, n)`` launched by hand (``--shard i/n``): ``.lock-shard-<i>-of-<n>``."""
    return f"{LOCK_FILE}-shard-{shard[0]}-of-{shard[1]}"


def _is_kept(path: Path) -> bool:
    """Lock files (removing one lets two processes lock two files) and log files (held open by the running command)."""
    return path.name == LOCK_FILE or path.name.startswith(LOCK_FILE + "-") or path.suffix == ".log"


def remove_outputs(work_dir: str | Path, paths: Sequence[str | Path]) -> list[Path]:
    """Delete a stage's outputs for ``--force``: each of ``paths`` (a folder with everything in it, or a file), all of
    which must lie inside ``work_dir``.

    A folder keeps its lock and log files (see :func:`_is_kept`) and is removed when nothing else is left. Links are
    removed as links, never followed: a folder linked to another disk keeps its files there.

    Returns:
        The paths that existed and were removed (or emptied).
    Raises:
        ValueError: a path that is not strictly inside ``work_dir`` (nothing is removed then).
        CannotWriteError: a file that cannot be removed.
    """
    root = Path(work_dir).resolve()
    targets = [Path(p) for p in paths]
    for target in targets:
        parent = target.parent.resolve()
        if target.name in ("", ".", "..") or not (parent == root or root in parent.parents):
            raise ValueError(f"--force: {target} is not inside the work dir {root}; nothing removed")
    removed = []
    for target in targets:
        if not (target.exists() or target.is_symlink()):
            continue
        try:
            if target.is_symlink() or not target.is_dir():
                target.unlink()
            else:
                for entry in sorted(target.iterdir()):
                    if _is_kept(entry) and not entry.is_symlink() and entry.is_file():
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                if not any(target.iterdir()):
                    target.rmdir()
        except OSError as e:
            raise cannot_write(Path(e.filename) if e.filename else target, e) from None
        removed.append(target)
    return removed


# ---------------------------------------------------------------- fingerprints


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"fingerprint: cannot record a {type(value).__name__} ({value!r}); use numbers, strings, lists")


def _canonical(parts: Mapping[str, Any]) -> str:
    return json.dumps(dict(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_jsonable)


def fingerprint(parts: Mapping[str, Any]) -> str:
    """sha256 (hex) of a canonical JSON of ``parts`` (keys sorted; tuples as lists; Paths as strings): stable across
    runs, processes and machines for equal values."""
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(DIGEST_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_digest(layout: Any, split: str) -> dict[str, str]:
    """What a split of a dataset is, cheaply: ``{"root", "split", "list_sha256"}`` (the resolved dataset folder, the
    split name, the sha256 of the list file's bytes). Images are not read: a changed image under the same id is not
    seen."""
    return {
        "root": str(Path(layout.root).resolve()),
        "split": split,
        "list_sha256": file_digest(layout.list_file(split)),
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: value}


_MISSING = object()


def _shown(value: Any) -> str:
    text = _canonical({"v": value})[len('{"v":') : -1] if value is not _MISSING else "(absent)"
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every (dotted, nested) key whose value differs, values shortened."""
    a, b = _flatten(json.loads(_canonical(old))), _flatten(json.loads(_canonical(new)))
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            out.append(f"{key}: {_shown(va)} -> {_shown(vb)}")
    return out


def check_done(
    done_path: str | Path,
    expected: Mapping[str, Any],
    stage: str | None = None,
    recompute: Sequence[str] = (),
    state: str = "finished",
) -> bool:
    """Whether the stage of ``done_path`` finished for the inputs ``expected`` (and may be skipped).

    Args:
        done_path: the stage's ``DONE`` marker.
        expected: what the outputs would be computed from now (the ``inputs`` given to :func:`write_done`).
        stage: the stage's name for the message (default: the folder holding ``done_path``).
        recompute: dotted keys (or key prefixes) of ``expected`` that the stage brings up to date itself (stage 3
            re-selects its labels from the stored scores): a marker that differs only there is not done (False, with
            a log line), not an error.
        state: the word of the message: ``finished`` for a DONE marker, ``was started`` for the record a stage
            writes before its per-file outputs.
    Returns:
        False without a marker; True for a marker written for ``expected``, or for a marker of the older plain-text
        (or fingerprint-less JSON) form, reused with a warning.
    Raises:
        StaleOutputError: the marker was written for other inputs: ``"<done_path>: <stage> finished for other inputs
            (key: old -> new; ...); use a new run.work_dir or --force <stage>"``.
    """
    done_path = Path(done_path)
    if not done_path.is_file():
        return False
    stage = stage or done_path.parent.name
    try:
        record = json.loads(done_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or "fingerprint" not in record:
        log.warning(
            "%s: written by an older version, without the inputs it was computed from: reused as it is "
            "(use --force %s to recompute)", done_path, stage,
        )  # fmt: skip
        return True
    if record.get("fingerprint") == fingerprint(expected):
        return True
    old = record.get("inputs")
    changes = changed_keys(old, expected) if isinstance(old, Mapping) else ["inputs: (unreadable) -> (current)"]
    if not changes:  # same values, other fingerprint: a marker edited by hand or of another fingerprint version
        changes = ["fingerprint: differs"]
    if recompute and all(_under(c.partition(": ")[0], recompute) for c in changes):
        log.info(
            "%s: %s for other settings (%s): bringing the outputs up to date", done_path, state, "; ".join(changes)
        )
        return False
    raise StaleOutputError(
        f"{done_path}: {stage} {state} for other inputs ({'; '.join(changes)}); "
        f"use a new run.work_dir or --force {stage}"
    )


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def done_fingerprint(done_path: str | Path) -> str | None:
    """What a stage's ``DONE`` marker says its outputs are, for the stages that read them: the recorded fingerprint,
    the sha256 of a marker of the older form (stable while it is not rewritten), None without a marker."""
    done_path = Path(done_path)
    if not done_path.is_file():
        return None
    try:
        record = json.loads(done_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("fingerprint"), str):
        return record["fingerprint"]
    return file_digest(done_path)


def write_done(done_path: str | Path, inputs: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    """Write the ``DONE`` marker (atomically) recording ``inputs`` and their fingerprint, plus ``extra`` (counts,
    metrics: not compared)."""
    record = {
        "format": DONE_FORMAT,
        "fingerprint": fingerprint(inputs),
        "inputs": json.loads(_canonical(inputs)),
        "finished": time.time(),
        "extra": json.loads(_canonical(extra or {})),
    }
    atomic_write_json(done_path, record)
