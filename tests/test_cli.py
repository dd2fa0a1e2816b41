"""The shared command-line shape of the stages: argument order and exit codes."""

from __future__ import annotations

import pytest

from sp_cam import cli
from sp_cam.config import ConfigError


def test_options_and_overrides_in_any_order():
    parser = cli.stage_parser("doc")
    parser.add_argument("model_type")
    parser.add_argument("--shard", default="")
    args = cli.parse_args(parser, ["cam", "a.b=1", "-c", "x.yaml", "c.d=2", "--shard", "0/2"])
    assert (args.model_type, args.config, args.shard, args.overrides) == ("cam", "x.yaml", "0/2", ["a.b=1", "c.d=2"])


def test_exit_codes(capsys):
    assert cli.run_command(lambda: None) == 0

    def bad() -> None:
        raise ConfigError("cam.lr: expected a number, got 'x'")

    assert cli.run_command(bad) == 2
    assert capsys.readouterr().err == "error: cam.lr: expected a number, got 'x'\n"

    def diverged() -> None:
        raise FloatingPointError("loss is nan at step 3")

    assert cli.run_command(diverged, diverged=(FloatingPointError,)) == 1
    assert "loss is nan at step 3" in capsys.readouterr().err
    with pytest.raises(FloatingPointError):  # not declared: a real bug surfaces with its traceback
        cli.run_command(diverged)
