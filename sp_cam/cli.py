"""The shared shape of the stage commands: ``[-c CONFIG] [options] [section.key=value ...]`` and their exit codes.

Exit codes: 0 done (or already done), 2 bad input (a one-line ``error: ...`` naming the file, key or value), 1 a
training that diverged. The process group of a torchrun launch is left on every exit.

Bad input includes what the file system refuses on a path (a read-only or full work dir: ``error: cannot write
<path>: <reason>``) and errors raised inside DataLoader worker processes, which PyTorch wraps in a many-line
"Caught ValueError in DataLoader worker process N ... Original Traceback" message: the original line is printed.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sp_cam import distributed as dist_utils

BAD_INPUT = (ValueError, FileNotFoundError)  # ConfigError is a ValueError
WORKER_TRACEBACK = "Original Traceback (most recent call last):"  # torch.utils.data's ExceptionWrapper
# OSError numbers of a refused write; a filename with another number is reported as "cannot access"
WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EROFS", "ENOSPC", "EDQUOT", "EFBIG", "EEXIST", "ENOTDIR", "EISDIR", "EACCES", "EPERM")
    if hasattr(errno, name)
)


def _type_prefixes(e: BaseException) -> tuple[str, ...]:
    """How ``traceback`` names the class of ``e`` on the last line of a traceback (``ValueError``, ``pkg.mod.Error``)."""
    cls = type(e)
    qualified = (
        cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    )
    return (qualified, cls.__qualname__)


def one_line(e: BaseException) -> str:
    """The message of ``e`` for ``error: ...``; for an error re-raised from a DataLoader worker, the original message.

    The worker's traceback ends with ``<ExceptionClass>: <message>``: that message is returned, without the class.
    """
    text = str(e)
    if WORKER_TRACEBACK not in text:
        return text
    lines = [line for line in text.split(WORKER_TRACEBACK, 1)[1].splitlines() if line.strip()]
    for line in reversed(lines):
        for prefix in _type_prefixes(e):
            if line == prefix:
                return type(e).__name__
            if line.startswith(prefix + ": "):
                return line[len(prefix) + 2 :]
    return lines[-1] if lines else text.splitlines()[0]


def describe_os_error(e: OSError) -> str:
    """``cannot write <path>: <reason>`` (or ``cannot access``) for an ``OSError`` that names a file."""
    from sp_cam.io import CannotWriteError, write_failure_reason

    if isinstance(e, CannotWriteError):
        return str(e)
    if e.errno in WRITE_ERRNOS:
        return f"cannot write {e.filename}: {write_failure_reason(e.filename, e)}"
    return f"cannot access {e.filename}: {e.strerror or e}"


def stage_parser(doc: str | None, config_default: str | None = None, config_required: bool = False):
    """An argument parser with ``-c/--config``; add the command's own options, then call :func:`parse_args`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-c", "--config", type=str, default=config_default, required=config_required, help="YAML config file"
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Add the trailing ``section.key=value`` overrides and parse; options and overrides may come in any order."""
    parser.add_argument("overrides", nargs="*", type=str, help="section.key=value overrides")
    return parser.parse_intermixed_args(argv)


def run_command(
    body: Callable[[], Any],
    bad_input: tuple[type[BaseException], ...] = BAD_INPUT,
    diverged: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a command's body and map its failures to the exit codes above (one line on stderr).

    Besides ``bad_input``, an ``OSError`` naming a file (a refused write, see :func:`describe_os_error`) and any
    ``OSError`` re-raised from a DataLoader worker are bad input. Other errors keep their traceback: they are bugs.
    """
    try:
        body()
    except bad_input as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except diverged as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.filename is not None:
            print(f"error: {describe_os_error(e)}", file=sys.stderr)
        elif WORKER_TRACEBACK in str(e):
            print(f"error: {one_line(e)}", file=sys.stderr)
        else:
            raise
        return 2
    finally:
        dist_utils.cleanup()
    return 0
