"""The whole method in order: CAM baseline, CAM export, superpixel FCN, SP-CAM, pseudo labels, evaluation.

Every step writes under ``run.work_dir`` and closes with a ``DONE`` marker, so a re-run after a crash skips finished
steps and resumes the interrupted one from its last checkpoint. With ``--nproc N`` (N > 1) each step runs under
``torchrun --nproc_per_node N`` (NCCL on GPUs, gloo on CPU); inference steps shard the images over the processes.

    python -m sp_cam.pipeline -c scripts/configs/toy.yaml [--steps cam,export,fcn,spcam,pseudo,eval] [--nproc N] [key=value ...]
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
from sp_cam.paths import RunPaths

log = logging.getLogger("spcam.pipeline")

STEPS = ("cam", "export", "fcn", "spcam", "pseudo", "eval")
STEP_TITLES = {
    "cam": "stage A: CAM baseline training",
    "export": "step B: baseline CAM export",
    "fcn": "stage 1: superpixel FCN training",
    "spcam": "stage 2: SP-CAM training",
    "pseudo": "stage 3: pseudo labels",
    "eval": "evaluation and ablation",
}
# Module run under torchrun for each step, and its leading arguments (the evaluation runs in this process).
STEP_MODULES = {
    "cam": ["sp_cam.train_cls", "cam"],
    "export": ["sp_cam.export_cams"],
    "fcn": ["sp_cam.train_fcn"],
    "spcam": ["sp_cam.train_cls", "spcam"],
    "pseudo": ["sp_cam.make_pseudo"],
}


def parse_steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"--steps: unknown step(s) {unknown}; valid steps: {', '.join(STEPS)}")
    return [s for s in STEPS if s in steps]


def run_step_in_process(cfg: Config, step: str) -> None:
    if step == "cam":
        from sp_cam import train_cls

        train_cls.run(cfg, "cam")
    elif step == "export":
        from sp_cam import export_cams

        export_cams.run(cfg)
    elif step == "fcn":
        from sp_cam import train_fcn

        train_fcn.run(cfg)
    elif step == "spcam":
        from sp_cam import train_cls

        train_cls.run(cfg, "spcam")
    elif step == "pseudo":
        from sp_cam import make_pseudo

        make_pseudo.run(cfg)
    elif step == "eval":
        from sp_cam import ablation

        ablation.run(cfg)


def run_step_distributed(config_file: Path, step: str, nproc: int) -> None:
    """Launch one step under torchrun with the resolved config file of the run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    cmd += STEP_MODULES[step] + ["-c", str(config_file)]
    log.info("launching: %s", " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"step {step!r} failed under torchrun (exit code {result.returncode})")


def run(cfg: Config, steps: list[str] | None = None, nproc: int = 1) -> dict:
    """Run the given steps (all by default) and return the final metrics."""
    from sp_cam.open_data import open_dataset
    from sp_cam.runtime import setup_logging

    steps = list(steps or STEPS)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.run.log_level, paths.pipeline_log)
    if "fcn" in steps and cfg.fcn.weights:
        log.info("stage 1 skipped: using the FCN weights %s", cfg.fcn.weights)
        steps.remove("fcn")
    layout = open_dataset(cfg)  # generates the toy dataset on first use, before any worker process starts
    log.info("dataset: %s (%d classes) at %s", cfg.data.dataset, layout.num_classes, layout.root)
    save_config(cfg, paths.config)
    for step in steps:
        start = time.time()
        log.info("=== %s ===", STEP_TITLES[step])
        if nproc > 1 and step in STEP_MODULES:
            run_step_distributed(paths.config, step, nproc)
        else:
            run_step_in_process(cfg, step)
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
    parser.add_argument("--nproc", type=int, default=1, help="processes per step (torchrun) when > 1")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        cfg = load_config(args.config, args.overrides)
        run(cfg, parse_steps(args.steps), args.nproc)

    return cli.run_command(body, bad_input=(*cli.BAD_INPUT, RuntimeError))  # RuntimeError: a failed step process


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
