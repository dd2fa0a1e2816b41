"""Stage 1: train the superpixel FCN (SpixelNet) with the improved stage-1 loss (spec 2.4-2.5, 5.3).

    python -m sp_cam.train_fcn -c CONFIG [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.train_fcn -c CONFIG [section.key=value ...]

Adam without schedule; shuffled data (D3: the reference's unshuffled loader is a defect); the affinity terms join the
reconstruction loss after ``fcn.affinity_warmup`` of the iterations and need the step-B CAMs (``WORK_DIR/cams/<id>.npz``,
:mod:`sp_cam.cam_store`; any CAMs written in that format work). CAMs are read only from the first epoch in which an
affinity step occurs. The loss mode is ``saliency`` (reconstruct binarised saliency, ref) or ``labels_only``
(reconstruct CIELAB colour, for datasets without saliency maps); ``fcn.mode=auto`` picks by the dataset.

``fcn.batch_size`` is the global batch of one optimizer step: under torchrun (DDP) each process takes its share of it,
so global step k trains on the same images whatever the number of processes. SpixelNet's BN becomes SyncBatchNorm on
CUDA; on CPU (gloo) it keeps per-process batch statistics. Rank 0 logs and writes every file.

Every epoch ends with the full training state in ``last.pt`` (model, optimizer, epoch, step, RNG, config, best metric),
written atomically; a re-run continues from it (every process from the same file). Augmentations are a pure function of
(seed, epoch, index) and the per-epoch order is seeded by (seed, epoch), so a resumed run ends with the weights of an
uninterrupted one (on CPU).
Model selection uses the stage-1 validation metric of spec 5.3, implemented as intended (D14): GT one-hot, bilinear down
to ``val_grid`` x ``val_grid`` and back up, PSAM pooling, ``val_walk_steps`` walk steps, PSAM upsampling, argmax, mIoU.
Without GT on ``data.eval_split`` the last epoch is kept. ``model.pt`` = ``{"model", "config", "metric", ...}``; ``DONE``
closes the stage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from net.fcn_loss import FCNLoss
from net.spixel_fcn import SpixelNet, load_spixel_weights
from sp_cam import cli
from sp_cam import distributed as dist_utils
from sp_cam.cam_store import load_cam
from sp_cam.config import Config, ConfigError, FCNConfig, config_to_dict, load_config
from sp_cam.io import append_jsonl, atomic_write_text, load_checkpoint, save_checkpoint
from sp_cam.metrics import confusion_matrix, iou_from_confusion
from sp_cam.paths import RunPaths
from sp_cam.psam import asam, pad_to_multiple, psam_pool, psam_upsample, random_walk
from sp_cam.runtime import (
    derive_seed,
    restore_model_and_optimizer,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_logging,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
BEST_CHECKPOINT = "best.pt"
MODES = ("auto", "saliency", "labels_only")
NET_STRIDE = 16  # SpixelNet downsamples 4 times: inputs must be multiples of 16
IGNORE_INDEX = 255


@dataclass
class TrainState:
    """Everything the loop mutates; ``model`` may be the DDP wrapper of ``net``."""

    model: nn.Module
    net: SpixelNet
    optimizer: torch.optim.Optimizer
    device: torch.device
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Set-up


def check_fcn_config(cfg: Config) -> None:
    f = cfg.fcn
    if f.mode not in MODES:
        raise ConfigError(f"fcn.mode={f.mode!r}: expected one of {', '.join(MODES)}")
    if f.cell_size < 1:
        raise ConfigError(f"fcn.cell_size={f.cell_size}: expected >= 1")
    multiple = math.lcm(NET_STRIDE, f.cell_size)
    if cfg.data.crop_size % multiple:
        raise ConfigError(
            f"data.crop_size={cfg.data.crop_size} must be a multiple of {multiple} (SpixelNet stride {NET_STRIDE}, "
            f"fcn.cell_size={f.cell_size})"
        )
    for key in ("epochs", "batch_size", "val_grid", "log_every"):
        if getattr(f, key) < 1:
            raise ConfigError(f"fcn.{key}={getattr(f, key)}: expected >= 1")
    if not 0.0 <= f.affinity_warmup <= 1.0:
        raise ConfigError(f"fcn.affinity_warmup={f.affinity_warmup}: expected a fraction in [0, 1]")
    if f.select not in ("gt", "last"):
        raise ConfigError(f"fcn.select={f.select!r}: expected gt or last")
    if f.val_walk_steps < 0:
        raise ConfigError(f"fcn.val_walk_steps={f.val_walk_steps}: expected >= 0")


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
    """``(id, (H, W)) -> (K, H, W)`` float32 CAMs from ``cam_dir/<id>.npz`` (picklable, for DataLoader workers)."""

    cam_dir: Path
    num_classes: int

    def __call__(self, image_id: str, size: tuple[int, int]) -> np.ndarray:
        return load_cam(self.cam_dir / f"{image_id}.npz", self.num_classes, expect_size=size)


def check_cams(cam_dir: Path, ids: list[str], layout: Any) -> None:
    """Fail early: the CAM folder exists, holds a file for every id, and the first file fits its image."""
    if not cam_dir.is_dir():
        raise FileNotFoundError(
            f"CAM folder not found: {cam_dir} (the stage-1 affinity terms need the step-B CAMs: run "
            f"python -m sp_cam.export_cams, or set fcn.affinity_warmup=1 to train without them)"
        )
    missing = [i for i in ids if not (cam_dir / f"{i}.npz").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(ids)} CAM files missing in {cam_dir}, e.g. {cam_dir / (missing[0] + '.npz')}"
        )
    if ids:
        load_cam(cam_dir / f"{ids[0]}.npz", layout.num_classes, expect_size=layout.image_size(ids[0]))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    return np.random.default_rng(derive_seed(seed, epoch)).permutation(n).tolist()


def process_indices(
    n: int, batch_size: int, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int
) -> list[int]:
    """The images of one process in ``epoch``, in order, to be read in batches of ``batch_size / world_size``.

    Global step k takes ``order[k*B:(k+1)*B]`` of the epoch's order (B = ``batch_size``), whatever ``world_size``;
    each process gets every ``world_size``-th of them (the DistributedSampler split). The tail short of a full global
    batch is dropped.
    """
    order = epoch_order(n, seed, epoch, shuffle)
    return dist_utils.shard(order[: n // batch_size * batch_size], rank, world_size)


def build_model(fcfg: FCNConfig) -> SpixelNet:
    model = SpixelNet()
    if fcfg.init:
        load_spixel_weights(model, Path(fcfg.init).expanduser())
        log.info("stage 1: initialised from %s", fcfg.init)
    else:
        log.info("stage 1: random initialisation (set fcn.init to start from published SpixelFCN weights)")
    return model


def build_optimizer(model: SpixelNet, fcfg: FCNConfig) -> torch.optim.Adam:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(
        params, lr=fcfg.lr, betas=(fcfg.adam_beta1, fcfg.adam_beta2), weight_decay=fcfg.weight_decay
    )


# --------------------------------------------------------------------------------------------------------------------
# Training


def train_one_epoch(
    state: TrainState,
    loader: DataLoader,
    loss_fn: FCNLoss,
    steps: int,
    affinity_from: int,
    fcfg: FCNConfig,
    metrics_path: Path | None,
    desc: str,
) -> dict[str, float]:
    """One pass over ``loader`` (``steps`` batches of this process); ``state.step`` advances by one per batch.

    Logged losses are means over the processes; ``metrics_path`` is None on ranks other than 0.
    """
    main = dist_utils.is_main()
    state.model.train()
    sums: dict[str, float] = {}
    done = 0
    start = time.time()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not main, dynamic_ncols=True, leave=False)
    try:
        for batch in loader:
            use_affinity = state.step >= affinity_from
            image = batch["image"].to(state.device, non_blocking=True)
            valid = batch["valid"].to(state.device) if fcfg.mask_padding else None
            saliency = batch["saliency"].to(state.device)
            cams = batch["cam"].to(state.device) if use_affinity else None
            q = state.model(image)
            terms = loss_fn(q, image, saliency, cams, valid, use_affinity)
            loss = terms["total"]
            if dist_utils.any_rank(not bool(torch.isfinite(loss)), state.device):
                raise FloatingPointError(
                    f"stage-1 loss is not finite ({float(loss)} on this process) at step {state.step + 1} "
                    f"(epoch {state.epoch + 1}); lower fcn.lr or check the inputs"
                )
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.step += 1
            done += 1
            means = dist_utils.all_reduce_mean(torch.stack([v.detach() for v in terms.values()])).tolist()
            values = dict(zip(terms, means, strict=True))
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{values['total']:.4f}", aff=int(use_affinity))
            bar.update(1)
            if metrics_path is not None and (state.step % fcfg.log_every == 0 or done == steps):
                append_jsonl(
                    metrics_path,
                    {"kind": "train", "epoch": state.epoch + 1, "step": state.step, "affinity": use_affinity, **values},
                )
    finally:
        bar.close()
    elapsed = time.time() - start
    stats = {f"loss_{k}" if k != "total" else "loss": v / max(done, 1) for k, v in sums.items()}
    images = done * loader.batch_size * dist_utils.get_world_size()
    stats.update(seconds=elapsed, images_per_s=images / max(elapsed, 1e-9))
    return stats


# --------------------------------------------------------------------------------------------------------------------
# Stage-1 validation (spec 5.3, D14)


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
    model: SpixelNet, dataset: Any, fcfg: FCNConfig, num_classes: int, device: torch.device, max_images: int = 0
) -> dict[str, float] | None:
    """Stage-1 GT-reconstruction mIoU (percent) on the images of ``dataset`` that have GT; None when none has.

    The images are sharded over the processes (all of them must call this) and the confusion matrices summed, so
    every process gets the same result.
    """
    model.eval()
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    mine = dist_utils.shard(list(range(n)), dist_utils.get_rank(), dist_utils.get_world_size())
    multiple = math.lcm(NET_STRIDE, fcfg.cell_size)
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
    result = iou_from_confusion(conf)
    return {"miou": result.miou, "fg_miou": result.fg_miou, "images": scored}


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def training_checkpoint(state: TrainState, cfg: Config, mode: str) -> dict[str, Any]:
    return {
        "stage": "fcn",
        "mode": mode,
        "model": state.net.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "rng": rng_state(),
        "config": config_to_dict(cfg),
        "best": dict(state.best),
    }


def resume(state: TrainState, path: Path, cfg: Config) -> None:
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("stage") != "fcn":
        raise ValueError(f"{path}: not a stage-1 training checkpoint")
    restore_model_and_optimizer(ckpt, path, config_to_dict(cfg), ("fcn", "data"), state.net, state.optimizer)
    state.epoch = int(ckpt["epoch"])
    state.step = int(ckpt["step"])
    state.best = dict(ckpt.get("best") or {})
    set_rng_state(ckpt["rng"])
    log.info("stage 1: resumed from %s after epoch %d (step %d)", path, state.epoch, state.step)


# --------------------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config) -> Path:
    """Train the superpixel FCN; returns the final weights' path (``RunPaths.model(paths.fcn)``).

    Works in a single process and under torchrun. Skips the stage when its ``DONE`` marker exists; resumes from
    ``last.pt`` when present.
    """
    check_fcn_config(cfg)
    fcfg = cfg.fcn
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    sdir = paths.fcn
    final = RunPaths.model(sdir)
    started = dist_utils.open_stage(cfg, sdir, "stage 1")
    if started is None:
        return final
    info, device = started
    main = info.is_main

    from data.datasets import EvalDataset, TrainDataset
    from data.voc_layout import open_dataset

    layout = dist_utils.main_first(lambda: open_dataset(cfg))  # a toy set is generated once, by rank 0
    num_classes = layout.num_classes
    mode, why = choose_mode(fcfg, layout.has_saliency)
    log.info("stage 1: loss mode %s (%s)", mode, why)

    train_set = TrainDataset(
        layout,
        cfg.data.train_split,
        crop_size=cfg.data.crop_size,
        resize_long=(cfg.data.resize_long_min, cfg.data.resize_long_max),
        seed=cfg.run.seed,
    )
    if len(train_set) == 0:
        raise ConfigError(f"data.train_split={cfg.data.train_split!r} is empty")
    dist_utils.micro_batch_size(fcfg.batch_size, info.world_size, 1, "fcn")  # the global batch splits evenly
    batch_size = min(fcfg.batch_size, len(train_set) // info.world_size * info.world_size)
    if batch_size == 0:
        raise ConfigError(
            f"data.train_split={cfg.data.train_split!r} has {len(train_set)} images, fewer than the "
            f"{info.world_size} processes"
        )
    if batch_size < fcfg.batch_size and main:
        log.warning(
            "stage 1: %d training images < fcn.batch_size=%d: batch %d", len(train_set), fcfg.batch_size, batch_size
        )
    steps = len(train_set) // batch_size  # drop_last, as the reference
    total_steps = fcfg.epochs * steps
    affinity_from = affinity_from_step(fcfg, total_steps)
    if affinity_from < total_steps:
        check_cams(paths.cams, train_set.ids, layout)
        log.info("stage 1: affinity terms from step %d of %d, CAMs from %s", affinity_from + 1, total_steps, paths.cams)
    else:
        log.info("stage 1: affinity terms never switched on (fcn.affinity_warmup=%g)", fcfg.affinity_warmup)
    cam_loader = CamLoader(paths.cams, num_classes)

    seed_everything(derive_seed(cfg.run.seed))  # the same initial weights on every process
    net = build_model(fcfg).to(device)
    state = TrainState(model=net, net=net, optimizer=build_optimizer(net, fcfg), device=device)
    loss_fn = FCNLoss.from_config(fcfg, num_classes, mode)
    last = RunPaths.last_checkpoint(sdir)
    if last.is_file():
        resume(state, last, cfg)
    if info.distributed:
        state.model = dist_utils.wrap_ddp(net, device)

    eval_set = EvalDataset(layout, cfg.data.eval_split)
    has_gt = any(layout.has_gt(i) for i in eval_set.ids[: fcfg.val_max_images or None])
    if not has_gt:
        log.info(
            "stage 1: no GT masks on data.eval_split=%r: no validation, the last epoch is kept", cfg.data.eval_split
        )
    metrics_path = sdir / METRICS_FILE
    log.info(
        "stage 1: %d images, %d steps/epoch x %d epochs, batch %d = %d process(es) x %d, %d classes, device %s",
        len(train_set),
        steps,
        fcfg.epochs,
        batch_size,
        info.world_size,
        batch_size // info.world_size,
        num_classes,
        device,
    )
    if has_gt and state.epoch == 0 and not state.best.get("initial"):
        initial = evaluate(net, eval_set, fcfg, num_classes, device, fcfg.val_max_images)
        state.best = {"initial": initial["miou"]}
        if main:
            record = {"kind": "eval", "epoch": 0, "step": 0, **{f"eval_{k}": v for k, v in initial.items()}}
            append_jsonl(metrics_path, record)
        log.info("stage 1: initial weights: GT-reconstruction mIoU %.2f", initial["miou"])

    while state.epoch < fcfg.epochs:
        epoch = state.epoch
        # the same stream on every process: nothing in the loop draws from it (the data are a function of the index)
        seed_everything(derive_seed(cfg.run.seed, epoch))
        train_set.set_epoch(epoch)
        # CAMs only for epochs that contain an affinity step (the first 70 % of the run never reads them)
        train_set.cam_loader = cam_loader if (epoch + 1) * steps > affinity_from else None
        loader = DataLoader(
            train_set,
            batch_size=batch_size // info.world_size,
            sampler=process_indices(
                len(train_set), batch_size, cfg.run.seed, epoch, fcfg.shuffle, info.rank, info.world_size
            ),
            num_workers=cfg.data.num_workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )
        stats = train_one_epoch(
            state,
            loader,
            loss_fn,
            steps,
            affinity_from,
            fcfg,
            metrics_path if main else None,
            f"fcn epoch {epoch + 1}/{fcfg.epochs}",
        )
        state.epoch += 1
        dist_utils.broadcast_buffers(net)  # every process evaluates the BN statistics that rank 0 saves
        record: dict[str, Any] = {"kind": "epoch", "epoch": state.epoch, "step": state.step, **stats}
        if has_gt:
            result = evaluate(net, eval_set, fcfg, num_classes, device, fcfg.val_max_images)
            record.update({f"eval_{k}": v for k, v in result.items()})
            if result["miou"] >= state.best.get("miou", -math.inf):  # ties: the later epoch
                # before last.pt: a crash in between redoes the epoch and rewrites the same file
                if main:
                    save_checkpoint(sdir / BEST_CHECKPOINT, {"model": net.state_dict(), "epoch": state.epoch, **result})
                state.best.update(epoch=state.epoch, miou=result["miou"], fg_miou=result["fg_miou"])
        if main:
            append_jsonl(metrics_path, record)
            line = f"stage 1 epoch {state.epoch}/{fcfg.epochs}: loss {record['loss']:.4f}"
            if "eval_miou" in record:
                line += f"; GT-reconstruction mIoU {record['eval_miou']:.2f} (best {state.best['miou']:.2f})"
            log.info("%s", line)
            save_checkpoint(last, training_checkpoint(state, cfg, mode))
        dist_utils.barrier()

    if main:
        _write_final(state, sdir, cfg, mode, num_classes, has_gt)
    dist_utils.barrier()
    return final


def _write_final(state: TrainState, sdir: Path, cfg: Config, mode: str, num_classes: int, has_gt: bool) -> None:
    if has_gt and cfg.fcn.select == "gt":
        best = load_checkpoint(sdir / BEST_CHECKPOINT)
        weights = best["model"]
        metric = {"name": "gt_reconstruction_miou", "epoch": int(best["epoch"]), "miou": float(best["miou"])}
        metric["initial_miou"] = state.best.get("initial")
        log.info("stage 1: selected epoch %d, GT-reconstruction mIoU %.2f", metric["epoch"], metric["miou"])
    else:
        weights = state.net.state_dict()
        metric = {"name": "last_epoch", "epoch": state.epoch}
    save_checkpoint(
        RunPaths.model(sdir),
        {
            "stage": "fcn",
            "model": weights,
            "config": config_to_dict(cfg),
            "metric": metric,
            "mode": mode,
            "num_classes": num_classes,
            "cell_size": cfg.fcn.cell_size,
        },
    )
    atomic_write_text(RunPaths.done(sdir), f"stage 1 finished after {state.epoch} epochs\n")
    log.info("stage 1: final weights %s", RunPaths.model(sdir))


# --------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(cli.stage_parser(__doc__), argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        setup_logging(cfg.run.log_level, RunPaths.from_work_dir(cfg.run.work_dir).fcn / LOG_FILE)
        run(cfg)

    return cli.run_command(body, diverged=(FloatingPointError,))


if __name__ == "__main__":
    raise SystemExit(main())
