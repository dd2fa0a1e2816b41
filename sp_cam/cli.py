"""The shared shape of the stage commands: ``[-c CONFIG] [options] [section.key=value ...]`` and their exit codes.

Exit codes: 0 done (or already done), 2 bad input (a one-line ``error: ...`` naming the file, key or value), 1 a
training that diverged. The process group of a torchrun launch is left on every exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sp_cam import distributed as dist_utils

BAD_INPUT = (ValueError, FileNotFoundError)  # ConfigError is a ValueError


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
    """Run a command's body and map its failures to the exit codes above (one line on stderr)."""
    try:
        body()
    except bad_input as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        dist_utils.cleanup()
    return 0
