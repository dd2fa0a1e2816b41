"""The whole method in order: CAM baseline, CAM export, superpixel FCN, SP-CAM, pseudo labels, segmentation network,
evaluation.

Every step writes under ``run.work_dir`` and closes with a ``DONE`` marker, so a re-run after a crash skips finished
steps and resumes the interrupted one from its last checkpoint. With ``--nproc N`` (N > 1) each step runs under
``torchrun --nproc_per_node N`` (NCCL on GPUs, gloo on CPU); inference steps shard the images over the processes.

    python -m sp_cam.pipeline -c scripts/configs/toy.yaml [--steps cam,export,fcn,spcam,pseudo,seg,seg_gt,eval]
        [--nproc N|auto] [key=value ...]

``--nproc auto`` (the default of the scripts) uses one process per visible GPU, and one process on a CPU-only machine.
Stage 4 (``seg``: train and evaluate DeepLab-V2 on the pseudo labels) runs when ``seg.enabled``; its fully supervised
reference (``seg_gt``: the same on the GT masks) when ``seg.gt_reference`` too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
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


def parse_steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"--steps: unknown step(s) {unknown}; valid steps: {', '.join(STEPS)}")
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


def run_command_in_process(module: list[str], cfg: Config) -> None:
    """One step command called as a function with the already loaded config."""
    import importlib

    stage = importlib.import_module(module[0])
    stage.run(cfg, *module[1:])


def run_command_distributed(config_file: Path, module: list[str], overrides: list[str], nproc: int) -> None:
    """Launch one step command under torchrun with the resolved config file of the run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    cmd += module + ["-c", str(config_file), *overrides]
    log.info("launching: %s", " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{module[0]} failed under torchrun (exit code {result.returncode})")


def run(cfg: Config, steps: list[str] | None = None, nproc: int = 1) -> dict:
    """Run the given steps (all by default) and return the final metrics."""
    from sp_cam.open_data import open_dataset
    from sp_cam.runtime import setup_logging

    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.run.log_level, paths.pipeline_log)
    steps = enabled_steps(cfg, list(steps or STEPS))
    if "fcn" in steps:  # initial-weights files the steps will need: before anything runs
        check_init_file("fcn.init", cfg.fcn.init)
    if "seg" in steps or "seg_gt" in steps:
        check_init_file("seg.init", cfg.seg.init)
    layout = open_dataset(cfg)  # generates the toy dataset on first use, before any worker process starts
    log.info("dataset: %s (%d classes) at %s", cfg.data.dataset, layout.num_classes, layout.root)
    save_config(cfg, paths.config)
    for step in steps:
        start = time.time()
        log.info("=== %s ===", STEP_TITLES[step])
        if step == "eval":
            from sp_cam import ablation

            ablation.run(cfg)
        for module, overrides in STEP_COMMANDS.get(step, []):
            if nproc > 1:
                run_command_distributed(paths.config, module, overrides, nproc)
            else:
                step_cfg = load_config(paths.config, overrides) if overrides else cfg
                run_command_in_process(module, step_cfg)
        log.info("%s: finished in %.1f s", step, time.time() - start)
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
    args = cli.parse_args(parser, argv)

    def body() -> None:
        nproc = resolve_nproc(args.nproc)
        cfg = load_config(args.config, args.overrides)
        run(cfg, parse_steps(args.steps), nproc)

    return cli.run_command(body, bad_input=(*cli.BAD_INPUT, RuntimeError))  # RuntimeError: a failed step process


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
