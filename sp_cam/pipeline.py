"""The whole method in order: CAM baseline, CAM export, superpixel FCN, SP-CAM, pseudo labels, segmentation network,
evaluation.

Every step writes under ``run.work_dir`` and closes with a ``DONE`` marker recording its inputs, so a re-run after a
crash skips finished steps and resumes the interrupted one from its last checkpoint, and a re-run for other inputs
(another dataset, other weights or settings) stops with one line naming what changed. With ``--nproc N`` (N > 1)
each step runs under ``torchrun --nproc_per_node N`` (NCCL on GPUs, gloo on CPU); inference steps shard the images
over the processes.

    python -m sp_cam.pipeline -c scripts/configs/toy.yaml [--steps cam,export,fcn,spcam,pseudo,seg,seg_gt,eval]
        [--nproc N|auto] [--force STEP[,STEP...]] [key=value ...]
    python -m sp_cam.pipeline ... --nnodes N --node-rank R --rdzv-endpoint HOST:PORT --rdzv-id ID   (one per node)

``--nproc auto`` (the default of the scripts) uses one process per visible GPU, and one process on a CPU-only machine.
``--force STEP,...`` removes those steps' outputs before they run (each stage its own folders, never anything outside
the work dir; ``seg`` and ``seg_gt`` their evaluation too); the steps after them are not removed, and refuse to
reuse outputs made from the old ones. With ``--nnodes N`` (N > 1, as ``scripts/slurm_train_all.sh``) every step runs
under torchrun with a c10d rendezvous across the nodes, even with one process per node; the driver of node 0 alone
writes the run's config.yaml and pipeline.log and runs the evaluation.
Stage 4 (``seg``: train and evaluate DeepLab-V2 on the pseudo labels) runs when ``seg.enabled``; its fully supervised
reference (``seg_gt``: the same on the GT masks) when ``seg.gt_reference`` too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sp_cam import cli
from sp_cam.config import Config, ConfigError, load_config, save_config
from sp_cam.models import check_init_file
from sp_cam.paths import RunPaths

log = logging.getLogger("spcam.pipeline")

STEPS = ("cam", "export", "fcn", "spcam", "pseudo", "seg", "seg_gt", "eval")
STEP_TITLES = {
    "cam": "stage A: CAM baseline training",
    "export": "step B: baseline CAM export",
    "fcn": "stage 1: superpixel FCN training",
    "spcam": "stage 2: SP-CAM training",
    "pseudo": "stage 3: pseudo labels",
    "seg": "stage 4: DeepLab-V2 on the pseudo labels",
    "seg_gt": "stage 4 reference: DeepLab-V2 on the GT masks",
    "eval": "evaluation and ablation",
}
# Commands of each step: (module and its leading arguments, config overrides); run in this process, or under torchrun
# with the resolved config file of the run. The evaluation runs in this process.
STEP_COMMANDS: dict[str, list[tuple[list[str], list[str]]]] = {
    "cam": [(["sp_cam.train_cls", "cam"], [])],
    "export": [(["sp_cam.export_cams"], [])],
    "fcn": [(["sp_cam.train_fcn"], [])],
    "spcam": [(["sp_cam.train_cls", "spcam"], [])],
    "pseudo": [(["sp_cam.make_pseudo"], [])],
    "seg": [(["sp_cam.train_seg"], []), (["sp_cam.eval_seg"], [])],
    "seg_gt": [(["sp_cam.train_seg"], ["seg.labels=gt"]), (["sp_cam.eval_seg"], ["seg.labels=gt"])],
}


def parse_steps(text: str, option: str = "--steps") -> list[str]:
    """``STEP[,STEP...]`` of ``option`` (``--steps``, ``--force``): the named steps in pipeline order."""
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"{option}: unknown step(s) {unknown}; valid steps: {', '.join(STEPS)}")
    return [s for s in STEPS if s in steps]


def resolve_nproc(text: str) -> int:
    """``--nproc``: a positive integer, or ``auto`` = the number of visible GPUs (1 without CUDA)."""
    if text == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--nproc must be a positive integer or auto, got {text!r}")
    return n


def enabled_steps(cfg: Config, steps: list[str]) -> list[str]:
    """Drop the steps the config switches off (stage 1 with given FCN weights, stage 4 with seg.enabled=false)."""
    out = list(steps)
    if "fcn" in out and cfg.fcn.weights:
        log.info("stage 1 skipped: using the FCN weights %s", cfg.fcn.weights)
        out.remove("fcn")
    if not cfg.seg.enabled:
        out = [s for s in out if s not in ("seg", "seg_gt")]
    elif not cfg.seg.gt_reference and "seg_gt" in out:
        out.remove("seg_gt")
    return out


@dataclass(frozen=True)
class Launch:
    """How the step commands start.

    Attributes:
        nproc: processes per node (torchrun ``--nproc_per_node``); one node and one process: in this process.
        nnodes: nodes of the run (``--nnodes``); more than one: every step under torchrun with a c10d rendezvous at
            ``rdzv_endpoint`` (``HOST:PORT``), one rendezvous id per step command (``<rdzv_id>-<step>``).
        node_rank: this node (``--node-rank``); the driver of node 0 alone writes the run's own files.
    """

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    rdzv_id: str = ""

    @property
    def distributed(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1

    @property
    def main_node(self) -> bool:
        return self.node_rank == 0


def parse_launch(nproc: int, nnodes: str, node_rank: str, rdzv_endpoint: str, rdzv_id: str) -> Launch:
    """The :class:`Launch` of the command-line options (one-line errors naming the option)."""

    def whole(option: str, text: str, low: int) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if n < low:
            raise ConfigError(f"{option} must be an integer >= {low}, got {text!r}")
        return n

    n, rank = whole("--nnodes", nnodes, 1), whole("--node-rank", node_rank, 0)
    if rank >= n:
        raise ConfigError(f"--node-rank {rank} must be below --nnodes {n}")
    if n > 1:
        host, sep, port = rdzv_endpoint.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise ConfigError(f"--rdzv-endpoint must be HOST:PORT with --nnodes {n}, got {rdzv_endpoint!r}")
        if not rdzv_id.strip() or any(c.isspace() for c in rdzv_id):
            raise ConfigError(f"--rdzv-id must be a word (the job id) with --nnodes {n}, got {rdzv_id!r}")
    return Launch(nproc, n, rank, rdzv_endpoint, rdzv_id.strip())


def run_command_in_process(module: list[str], cfg: Config, force: bool = False) -> None:
    """One step command called as a function with the already loaded config."""
    import importlib

    stage = importlib.import_module(module[0])
    stage.run(cfg, *module[1:], force=force)


def torchrun_command(
    config_file: Path, module: list[str], overrides: list[str], launch: Launch, tag: str, force: bool = False
) -> list[str]:
    """The torchrun command line of one step command: ``--standalone`` on one node; on several, the c10d rendezvous
    with the id ``<rdzv_id>-<tag>`` (each step command its own)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if launch.nnodes > 1:
        cmd += [
            f"--nnodes={launch.nnodes}",
            f"--node_rank={launch.node_rank}",
            f"--nproc_per_node={launch.nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={launch.rdzv_endpoint}",
            f"--rdzv_id={launch.rdzv_id}-{tag}",
        ]
    else:
        cmd += ["--standalone", f"--nproc_per_node={launch.nproc}"]
    return cmd + ["-m", *module, "-c", str(config_file), *(["--force"] if force else []), *overrides]


def run_command_distributed(
    config_file: Path, module: list[str], overrides: list[str], launch: Launch, tag: str, force: bool = False
) -> None:
    """Launch one step command under torchrun with the resolved config file of the run."""
    cmd = torchrun_command(config_file, module, overrides, launch, tag, force)
    log.info("launching: %s", " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{module[0]} failed under torchrun (exit code {result.returncode})")


def step_tag(step: str, module: list[str]) -> str:
    """The rendezvous tag of one command of ``step``: the step, plus the module where the step has several."""
    commands = STEP_COMMANDS.get(step, [])
    return step if len(commands) <= 1 else f"{step}-{module[0].rpartition('.')[2]}"


def run(
    cfg: Config,
    steps: list[str] | None = None,
    nproc: int = 1,
    force: Sequence[str] = (),
    launch: Launch | None = None,
) -> dict:
    """Run the given steps (all by default) and return the final metrics.

    Args:
        force: steps whose outputs are removed before they run (each stage removes its own, inside its lock).
        launch: how the steps start (default: ``nproc`` processes on this node).
    Returns:
        ``metrics.json``; {} on a node other than node 0, which takes part in the torchrun steps only and writes
        nothing of its own (no config.yaml, no pipeline.log, no evaluation).
    """
    from sp_cam.open_data import open_dataset
    from sp_cam.runtime import setup_logging

    launch = launch or Launch(nproc=nproc)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    if launch.main_node:
        paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.run.log_level, paths.pipeline_log if launch.main_node else None)
    steps = enabled_steps(cfg, list(steps or STEPS))
    idle = [s for s in force if s not in steps]
    if idle:
        raise ConfigError(f"--force {','.join(idle)}: not among the steps that run ({', '.join(steps)})")
    if "fcn" in steps:  # initial-weights files the steps will need: before anything runs
        check_init_file("fcn.init", cfg.fcn.init)
    if "seg" in steps or "seg_gt" in steps:
        check_init_file("seg.init", cfg.seg.init)
    layout = open_dataset(cfg)  # generates the toy dataset on first use, before any worker process starts
    log.info("dataset: %s (%d classes) at %s", cfg.data.dataset, layout.num_classes, layout.root)
    with tempfile.TemporaryDirectory(prefix="spcam-node-") as private:
        # the steps' config: the run's config.yaml, written by node 0; the other nodes' own copy, outside the run
        config_file = paths.config if launch.main_node else Path(private) / "config.yaml"
        save_config(cfg, config_file)
        for step in steps:
            start = time.time()
            log.info("=== %s ===", STEP_TITLES[step])
            forced = step in force
            if step == "eval" and launch.main_node:
                from sp_cam import ablation

                ablation.run(cfg, force=forced)
            for module, overrides in STEP_COMMANDS.get(step, []):
                if launch.distributed:
                    tag = step_tag(step, module)
                    run_command_distributed(config_file, module, overrides, launch, tag, forced)
                else:
                    step_cfg = load_config(config_file, overrides) if overrides else cfg
                    run_command_in_process(module, step_cfg, forced)
            log.info("%s: finished in %.1f s", step, time.time() - start)
    if not launch.main_node:
        return {}
    if paths.ablation_table.is_file():
        print(paths.ablation_table.read_text())
    if paths.metrics.is_file():
        import json

        return json.loads(paths.metrics.read_text())
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__, config_default="scripts/configs/toy.yaml")
    parser.add_argument("--steps", type=str, default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    parser.add_argument("--nproc", type=str, default="1", help="processes per step (torchrun) when > 1, or auto")
    parser.add_argument("--force", type=str, default="", help="STEP[,STEP...]: remove these steps' outputs first")
    parser.add_argument("--nnodes", type=str, default="1", help="nodes of a multi-node run (torchrun --nnodes)")
    parser.add_argument("--node-rank", type=str, default="0", help="this node, 0 .. nnodes-1 (torchrun --node_rank)")
    parser.add_argument("--rdzv-endpoint", type=str, default="", help="HOST:PORT of the c10d rendezvous (nnodes > 1)")
    parser.add_argument(
        "--rdzv-id", type=str, default="", help="rendezvous id of the run, e.g. the job id (nnodes > 1)"
    )
    args = cli.parse_args(parser, argv)

    def body() -> None:
        nproc = resolve_nproc(args.nproc)
        launch = parse_launch(nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id)
        force = parse_steps(args.force, "--force")  # the steps whose outputs are removed before they run
        steps = parse_steps(args.steps)
        cfg = load_config(args.config, args.overrides)
        run(cfg, steps, nproc, force=force, launch=launch)

    return cli.run_command(body, bad_input=(*cli.BAD_INPUT, RuntimeError))  # RuntimeError: a failed step process


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
