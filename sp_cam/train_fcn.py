"""Stage 1: train the superpixel FCN (SpixelNet) with the improved stage-1 loss (docs/method.md §2.4-2.5, §5.3).

    python -m sp_cam.train_fcn -c CONFIG [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.train_fcn -c CONFIG [section.key=value ...]

Adam without schedule; shuffled data (docs/decisions.md D3: the reference's unshuffled loader is a defect); the affinity terms join the
reconstruction loss after ``fcn.affinity_warmup`` of the iterations and need the step-B CAMs (``WORK_DIR/cams/<id>.npz``,
:mod:`sp_cam.cam_store`; any CAMs written in that format work). CAMs are read only from the first epoch in which an
affinity step occurs. The loss mode is ``saliency`` (reconstruct binarised saliency, ref) or ``labels_only``
(reconstruct CIELAB colour, for datasets without saliency maps); ``fcn.mode=auto`` picks by the dataset.
SpixelNet's BN becomes SyncBatchNorm under DDP on CUDA; on CPU (gloo) it keeps per-process batch statistics.

Model selection uses the stage-1 validation metric of docs/method.md §5.3, implemented as intended (docs/decisions.md D14): GT one-hot, bilinear down
to ``val_grid`` x ``val_grid`` and back up, PSAM pooling, ``val_walk_steps`` walk steps, PSAM upsampling, argmax, mIoU.
Without GT on ``data.eval_split`` the last epoch is kept. The loop, checkpoints, resume and DDP are
:mod:`sp_cam.engine`'s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.classes import IGNORE_INDEX
from data.datasets import EvalDataset
from net.fcn_loss import FCNLoss
from net.psam import asam, pad_to_multiple, psam_pool, psam_upsample, random_walk
from net.spixel_fcn import INPUT_MULTIPLE, SpixelNet
from sp_cam import cli, engine
from sp_cam import distributed as dist_utils
from sp_cam.cam_store import load_cam
from sp_cam.config import Config, ConfigError, FCNConfig, load_config
from sp_cam.engine import Selection, TrainingDivergedError
from sp_cam.io import DamagedFileError
from sp_cam.metrics import confusion_matrix, iou_from_confusion
from sp_cam.models import build_fcn, fcn_payload
from sp_cam.open_data import train_dataset
from sp_cam.paths import RunPaths
from sp_cam.runtime import derive_seed, place_model, seed_everything, setup_logging
from sp_cam.stage_guard import fcn_inputs

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Set-up


def choose_mode(fcfg: FCNConfig, has_saliency: bool) -> tuple[str, str]:
    """(loss mode, why)."""
    if fcfg.mode == "saliency":
        if not has_saliency:
            raise ConfigError(
                "fcn.mode=saliency but the dataset has no saliency maps (use fcn.mode=auto or labels_only)"
            )
        return "saliency", "fcn.mode=saliency"
    if fcfg.mode == "labels_only":
        return "labels_only", "fcn.mode=labels_only"
    if has_saliency:
        return "saliency", "fcn.mode=auto and the dataset has saliency maps"
    return "labels_only", "fcn.mode=auto and the dataset has no saliency maps (CIELAB colour is reconstructed instead)"


def affinity_from_step(fcfg: FCNConfig, total_steps: int) -> int:
    """First 0-based step with the affinity terms: the reference adds them while ``iteration > 0.7 * max_iteration``."""
    return math.floor(fcfg.affinity_warmup * total_steps) + 1


@dataclass(frozen=True)
class CamLoader:
    """``(id, (H, W)) -> (K, H, W)`` float32 CAMs from the step-B files (picklable, for DataLoader workers)."""

    paths: RunPaths
    num_classes: int

    def __call__(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        return read_cam(self.paths, image_id, self.num_classes, size)


def read_cam(paths: RunPaths, image_id: str, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """The step-B CAMs of one image; a damaged file is one line naming it and saying how to redo it."""
    path = paths.cam_file(image_id)
    try:
        return load_cam(path, num_classes, expect_size=size)
    except DamagedFileError as e:
        raise DamagedFileError(
            f"{e}; remove {RunPaths.done(paths.cams)} and re-run step B (python -m sp_cam.export_cams): it redoes "
            f"the missing and damaged CAM files"
        ) from None


def check_cams(paths: RunPaths, ids: list[str], layout: Any) -> None:
    """Fail early: the CAM folder exists, holds a file for every id, and the first file fits its image."""
    cam_dir = paths.cams
    if not cam_dir.is_dir():
        raise FileNotFoundError(
            f"CAM folder not found: {cam_dir} (the stage-1 affinity terms need the step-B CAMs: run "
            f"python -m sp_cam.export_cams, or set fcn.affinity_warmup=1 to train without them)"
        )
    missing = [i for i in ids if not paths.cam_file(i).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(ids)} CAM files missing in {cam_dir}, e.g. {paths.cam_file(missing[0])}"
        )
    if ids:
        read_cam(paths, ids[0], layout.num_classes, layout.image_size(ids[0]))


# --------------------------------------------------------------------------------------------------------------------
# Stage-1 validation (docs/method.md §5.3, docs/decisions.md D14)


@torch.no_grad()
def reconstruct_gt(
    q: torch.Tensor, gt: torch.Tensor, num_classes: int, grid: int, steps: int, cell_size: int
) -> torch.Tensor:
    """Reconstruct a GT mask through the superpixels: the quantity the stage-1 metric scores.

    Args:
        q: (1, 9, H', W') PSAM of the padded image.
        gt: (H, W) int64 class indices 0..K (``num_classes`` = K + 1), 255 ignore (-> all-zero one-hot).
        grid: side of the coarse GT (ref 12).
        steps: walk steps between pooling and upsampling (ref 19).
    Returns:
        (H, W) int64 predicted classes.
    """
    H, W = gt.shape
    Hp, Wp = q.shape[-2:]
    known = gt != IGNORE_INDEX
    onehot = F.one_hot(torch.where(known, gt, 0), num_classes).permute(2, 0, 1).to(q.dtype) * known.to(q.dtype)
    onehot = F.pad(onehot[None], (0, Wp - W, 0, Hp - H))
    coarse = F.interpolate(onehot, size=(grid, grid), mode="bilinear", align_corners=False)
    fine = F.interpolate(coarse, size=(Hp, Wp), mode="bilinear", align_corners=False)
    sp = random_walk(psam_pool(fine, q, cell_size), asam(q, cell_size), steps)
    return psam_upsample(sp, q, cell_size)[0, :, :H, :W].argmax(0)


@torch.no_grad()
def evaluate(
    model: SpixelNet,
    dataset: Any,
    fcfg: FCNConfig,
    num_classes: int,
    device: torch.device,
    max_images: int = 0,
    absent: str = "present",
) -> dict[str, Any] | None:
    """Stage-1 GT-reconstruction mIoU (percent) on the images of ``dataset`` that have GT; None when none has.

    The images are sharded over the processes (all of them must call this) and the confusion matrices summed, so
    every process gets the same result.
    """
    model.eval()
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    mine = dist_utils.shard(list(range(n)), dist_utils.get_rank(), dist_utils.get_world_size())
    multiple = math.lcm(INPUT_MULTIPLE, fcfg.cell_size)
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    scored = 0
    quiet = not dist_utils.is_main()
    for index in tqdm(mine, desc="stage-1 validation", unit="img", disable=quiet, dynamic_ncols=True, leave=False):
        if not dataset.layout.has_gt(dataset.ids[index]):
            continue
        item = dataset[index]
        image, _ = pad_to_multiple(item["image"][None].to(device), multiple)
        q = model(image)
        gt = item["mask"].to(device)
        pred = reconstruct_gt(q, gt, num_classes + 1, fcfg.val_grid, fcfg.val_walk_steps, fcfg.cell_size)
        conf += confusion_matrix(pred, gt, num_classes + 1)
        scored += 1
    total = dist_utils.all_reduce_sum(torch.from_numpy(np.append(conf.reshape(-1), scored)).to(device)).cpu().numpy()
    conf, scored = total[:-1].reshape(conf.shape), int(total[-1])
    if scored == 0:
        return None
    result = iou_from_confusion(conf, absent=absent)
    return {"miou": result.miou, "fg_miou": result.fg_miou, "images": scored}


# --------------------------------------------------------------------------------------------------------------------
# The stage


def build_model(fcfg: FCNConfig) -> SpixelNet:
    """The network stage 1 trains (:func:`sp_cam.models.build_fcn`)."""
    return build_fcn(fcfg)


def build_optimizer(model: SpixelNet, fcfg: FCNConfig) -> torch.optim.Adam:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(
        params, lr=fcfg.lr, betas=(fcfg.adam_beta1, fcfg.adam_beta2), weight_decay=fcfg.weight_decay
    )


def build_loss(fcfg: FCNConfig, num_classes: int, mode: str) -> FCNLoss:
    """The stage-1 loss with every constant of ``fcfg``."""
    return FCNLoss(
        num_classes,
        fcfg.cell_size,
        mode,
        sal_threshold=fcfg.sal_threshold,
        pos_weight=fcfg.pos_weight,
        color_weight=fcfg.color_weight,
        recon_weight=fcfg.recon_weight,
        th_bg=fcfg.th_bg,
        th_step=fcfg.th_step,
        th_fg=fcfg.th_fg,
        relu_t=fcfg.relu_t,
        interior_min_same=fcfg.interior_min_same,
        press_weight=fcfg.press_weight,
        diff_weight=fcfg.diff_weight,
    )


class FCNTask(engine.Task):
    """Stage 1's part of a training run: the stage-1 loss with its warm-up, the GT-reconstruction validation."""

    def __init__(
        self,
        cfg: Config,
        loss_fn: FCNLoss,
        mode: str,
        num_classes: int,
        affinity_from: int,
        eval_set: EvalDataset | None,
    ) -> None:
        self.cfg = cfg
        self.fcfg = cfg.fcn
        self.loss_fn = loss_fn
        self.mode = mode
        self.num_classes = num_classes
        self.affinity_from = affinity_from
        self.eval_set = eval_set

    def loss(self, model, batch, ctx):
        use_affinity = ctx.step >= self.affinity_from
        image = batch["image"].to(ctx.device, non_blocking=True)
        valid = batch["valid"].to(ctx.device) if self.fcfg.mask_padding else None
        saliency = batch["saliency"].to(ctx.device)
        cams = batch["cam"].to(ctx.device) if use_affinity else None
        terms = self.loss_fn(model(image), image, saliency, cams, valid, use_affinity)
        logged = {(k if k == "ignored_cells" else f"loss_{k}"): v for k, v in terms.items() if k != "total"}
        return terms["total"], logged

    def step_record(self, step):
        return {"affinity": step >= self.affinity_from}

    def evaluate(self, net):
        if self.eval_set is None:
            return None
        device = next(net.parameters()).device
        f = self.fcfg
        return evaluate(net, self.eval_set, f, self.num_classes, device, f.val_max_images, self.cfg.eval.absent)

    def describe(self, result):
        return f"GT-reconstruction mIoU {result['miou']:.2f}"

    def checkpoint_tag(self):
        return {"mode": self.mode}

    def final_payload(self, weights, selection: Selection):
        m = selection.metrics
        if selection.rule == "gt":
            metric = {"name": "gt_reconstruction_miou", "epoch": int(m["epoch"]), "miou": float(m["miou"])}
            metric["initial_miou"] = selection.initial.get("miou")
        else:
            metric = {"name": "last_epoch", "epoch": m["epoch"]}
        return fcn_payload(weights, self.cfg, metric, self.mode, self.num_classes)


def run(cfg: Config, force: bool = False) -> Path:
    """Train the superpixel FCN; returns the final weights' path (``RunPaths.model(paths.fcn)``).

    Works in a single process and under torchrun. Skips the stage when its ``DONE`` marker was written for the same
    inputs (an error when for others); resumes from ``last.pt`` when present. ``force`` removes the stage's outputs
    first.
    """
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    with engine.open_stage(cfg, "fcn", "stage 1", partial(fcn_inputs, cfg), force=force) as stage:
        if stage is None:
            return RunPaths.model(paths.fcn)
        return _train(cfg, paths, stage)


def _train(cfg: Config, paths: RunPaths, stage: engine.Stage) -> Path:
    fcfg = cfg.fcn
    info, device, layout = stage.info, stage.device, stage.layout
    num_classes = layout.num_classes
    mode, why = choose_mode(fcfg, layout.has_saliency)
    log.info("stage 1: loss mode %s (%s)", mode, why)

    train_set = train_dataset(cfg, layout)
    if len(train_set) == 0:
        raise ConfigError(f"data.train_split={cfg.data.train_split!r} is empty")
    dist_utils.micro_batch_size(fcfg.batch_size, info.world_size, 1, "fcn")  # the global batch splits evenly
    batch_size = min(fcfg.batch_size, len(train_set) // info.world_size * info.world_size)
    if batch_size == 0:
        raise ConfigError(
            f"data.train_split={cfg.data.train_split!r} has {len(train_set)} images, fewer than the "
            f"{info.world_size} processes"
        )
    if batch_size < fcfg.batch_size and info.is_main:
        log.warning(
            "stage 1: %d training images < fcn.batch_size=%d: batch %d", len(train_set), fcfg.batch_size, batch_size
        )
    steps = len(train_set) // batch_size  # drop_last, as the reference
    total_steps = fcfg.epochs * steps
    affinity_from = affinity_from_step(fcfg, total_steps)
    if affinity_from < total_steps:
        check_cams(paths, train_set.ids, layout)
        # CAMs only from the first epoch with an affinity step (the first 70 % of the run never reads them)
        train_set.cam_loader = CamLoader(paths, num_classes)
        train_set.cams_from_epoch = affinity_from // steps
        log.info("stage 1: affinity terms from step %d of %d, CAMs from %s", affinity_from + 1, total_steps, paths.cams)
    else:
        log.info("stage 1: affinity terms never switched on (fcn.affinity_warmup=%g)", fcfg.affinity_warmup)

    seed_everything(derive_seed(cfg.run.seed))  # the same initial weights on every process
    net = place_model(build_model(fcfg), device)
    optimizer = build_optimizer(net, fcfg)
    loss_fn = build_loss(fcfg, num_classes, mode)
    eval_set: EvalDataset | None = EvalDataset(layout, cfg.data.eval_split)
    if not any(layout.has_gt(i) for i in eval_set.ids[: fcfg.val_max_images or None]):
        log.info(
            "stage 1: no GT masks on data.eval_split=%r: no validation, the last epoch is kept", cfg.data.eval_split
        )
        eval_set = None
    schedule = engine.Schedule(
        epochs=fcfg.epochs,
        batch_size=batch_size,
        eval_every=fcfg.val_every,
        eval_initial=eval_set is not None and fcfg.val_every > 0,
        select=fcfg.select,
        shuffle=fcfg.shuffle,
        log_every=fcfg.log_every,
    )
    task = FCNTask(cfg, loss_fn, mode, num_classes, affinity_from, eval_set)
    return engine.fit(stage, net, optimizer, None, train_set, task, schedule)


# --------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--force", action="store_true", help="remove the stage's outputs and train it afresh")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        setup_logging(cfg.run.log_level, RunPaths.train_log(RunPaths.from_work_dir(cfg.run.work_dir).fcn))
        run(cfg, force=args.force)

    return cli.run_command(body, diverged=(TrainingDivergedError,))


if __name__ == "__main__":
    raise SystemExit(main())
