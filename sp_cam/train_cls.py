"""Stages A and 2: train the CAM baseline or the SP-CAM classifier (spec 3.0-3.5).

    python -m sp_cam.train_cls {cam,spcam} -c CONFIG [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.train_cls {cam,spcam} -c CONFIG [section.key=value ...]

One loop serves both models; the section ``cam`` or ``spcam`` of the config drives it. ``batch_size`` is the global
batch of one optimizer step: it is split over the processes (DDP) and then over ``grad_accum`` micro-batches, so the
same config trains the same way on 1 CPU, 1 GPU or 4 GPUs (up to the batch statistics of the SP-CAM encoder's BN).

Every epoch ends with a full training state in ``last.pt`` (model, optimizer, scheduler, scaler, epoch, step, RNG,
config, best metric), written atomically; a run finds it and continues. Every augmentation is a pure function of
(seed, epoch, index) and the per-epoch shuffling is seeded by (seed, epoch), so a resumed run ends with the weights an
uninterrupted run would have (exactly on CPU). After training, ``model.pt`` holds the selected weights and ``DONE``
closes the stage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data.datasets import EvalDataset, TrainDataset
from data.transforms import inference_inputs
from data.voc_layout import VOCLayout, open_dataset
from net.classifiers import build_classifier
from net.cls_losses import eps_saliency_loss, multilabel_loss
from net.spixel_fcn import build_spixel_fcn
from sp_cam import cli
from sp_cam import distributed as dist_utils
from sp_cam.config import (
    ClassifierConfig,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
)
from sp_cam.inference import evaluate_split_confusion
from sp_cam.io import append_jsonl, atomic_write_text, load_checkpoint, save_checkpoint
from sp_cam.metrics import iou_from_confusion
from sp_cam.optim import build_optimizer
from sp_cam.paths import RunPaths
from sp_cam.psam import psam_pool
from sp_cam.runtime import (
    derive_seed,
    restore_model_and_optimizer,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_logging,
)

log = logging.getLogger("sp_cam.train_cls")

MODEL_TYPES = ("cam", "spcam")
AMP_MODES = ("none", "bf16", "fp16")
SELECT_RULES = ("gt", "last")
EVAL_SCALES = (1.0,)  # ref in-training evaluation: single scale, no flip (spec 3.5)
BEST_CHECKPOINT = "best.pt"  # weights of the best evaluated epoch (select=gt), beside last.pt
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped without touching the last good checkpoint."""


# --------------------------------------------------------------------------------------------------------------------
# Configuration checks


def classifier_config(cfg: Config, model_type: str) -> ClassifierConfig:
    """The config section of ``model_type`` (``cfg.cam`` or ``cfg.spcam``)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    return getattr(cfg, model_type)


def stage_dir(paths: RunPaths, model_type: str) -> Path:
    return paths.cam if model_type == "cam" else paths.spcam


def check_classifier_config(ccfg: ClassifierConfig, section: str) -> None:
    """Fail early on values the loop cannot use, naming ``section.key``."""
    if ccfg.amp not in AMP_MODES:
        raise ConfigError(f"{section}.amp: unknown value {ccfg.amp!r}; expected one of {', '.join(AMP_MODES)}")
    if ccfg.select not in SELECT_RULES:
        raise ConfigError(f"{section}.select: unknown value {ccfg.select!r}; expected one of {', '.join(SELECT_RULES)}")
    for key in ("epochs", "batch_size", "grad_accum", "log_every"):
        if getattr(ccfg, key) < 1:
            raise ConfigError(f"{section}.{key} must be >= 1, got {getattr(ccfg, key)}")
    if ccfg.eval_every < 0:
        raise ConfigError(f"{section}.eval_every must be >= 0, got {ccfg.eval_every}")
    if ccfg.select == "gt" and ccfg.eval_every == 0:
        raise ConfigError(f"{section}.select=gt picks the best evaluated epoch: it needs {section}.eval_every >= 1")
    if ccfg.eval_every and (not ccfg.eval_th or (section == "spcam" and not ccfg.eval_t)):
        raise ConfigError(f"{section}.eval_t and {section}.eval_th must not be empty")


# --------------------------------------------------------------------------------------------------------------------
# Labels and classification metrics


def check_batch_labels(ids: list[str], labels: torch.Tensor, num_classes: int) -> None:
    """Refuse label vectors the losses cannot use.

    Args:
        ids: the B image ids of the batch.
        labels: (B, K') multi-hot foreground labels.
        num_classes: K of the model.
    Raises:
        ValueError: K' != K (a class index beyond the model's classes, or a dataset of another class list), or an
            image without any positive class (the multi-label loss would push every class down).
    """
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise ValueError(
            f"label vectors of shape {tuple(labels.shape)} do not fit a model of {num_classes} foreground classes "
            f"(first id {ids[0] if ids else '?'!r})"
        )
    empty = (labels > 0).sum(dim=1) == 0
    if bool(empty.any()):
        bad = [ids[i] for i in torch.nonzero(empty).reshape(-1).tolist()]
        raise ValueError(
            f"image {bad[0]!r} has no positive class ({len(bad)} in this batch): every training image "
            "needs at least one image-level label; remove it from the split list"
        )


def check_split_labels(layout: VOCLayout, ids: list[str], split: str) -> None:
    """Every id of a training split must name at least one foreground class (checked once, before training)."""
    empty = [i for i in ids if not layout.labels(i)]
    if empty:
        raise ValueError(
            f"split {split!r}: {len(empty)} image(s) have no positive class, e.g. {empty[:3]}; every training image "
            "needs at least one image-level label (remove them from the list file)"
        )


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-interpolated average precision per class.

    Args:
        scores: (N, K) classification scores (higher = more confident).
        labels: (N, K) multi-hot ground truth.
    Returns:
        (K,) AP in [0, 1]; NaN for a class without positives.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, K)")
    ap = np.full(scores.shape[1], np.nan)
    ranks = np.arange(1, scores.shape[0] + 1)
    for k in range(scores.shape[1]):
        if not labels[:, k].any():
            continue
        hits = labels[np.argsort(-scores[:, k], kind="stable"), k]
        precision = np.cumsum(hits) / ranks
        ap[k] = precision[hits].mean()
    return ap


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(mAP, chance mAP) in percent over the classes with positives; chance = mean class prevalence."""
    ap = average_precision(scores, labels)
    has = ~np.isnan(ap)
    if not has.any():
        return float("nan"), float("nan")
    prevalence = (np.asarray(labels) > 0).mean(axis=0)
    return float(100 * ap[has].mean()), float(100 * prevalence[has].mean())


# --------------------------------------------------------------------------------------------------------------------
# Building blocks


def build_model(ccfg: ClassifierConfig, model_type: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    """The classifier of ``model_type`` (``pretrained`` overrides ``ccfg.pretrained``; "" skips backbone weights)."""
    if pretrained == "":
        with _quiet("net.backbones"):  # weights come from a checkpoint next: no "random initialisation" warning
            return build_classifier(model_type, ccfg, num_classes, pretrained="")
    return build_classifier(model_type, ccfg, num_classes, pretrained=pretrained)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fcn_weights_path(cfg: Config, paths: RunPaths) -> Path:
    """``fcn.weights`` when given, else the stage-1 result of this run."""
    path = Path(cfg.fcn.weights).expanduser() if cfg.fcn.weights else RunPaths.model(paths.fcn)
    if not path.is_file():
        hint = "fcn.weights" if cfg.fcn.weights else "stage 1 (python -m sp_cam.train_fcn) or set fcn.weights"
        raise FileNotFoundError(f"superpixel FCN weights not found: {path} (run {hint})")
    return path


def load_frozen_fcn(path: Path, device: torch.device) -> nn.Module:
    """The superpixel FCN, frozen (D4): eval mode, no gradients; run it under ``torch.no_grad``.

    Accepts the stage-1 result (``{'model': state_dict, ...}``) and published SpixelFCN / Q files alike.
    """
    fcn = build_spixel_fcn(path)  # tolerant loader: unwraps 'model' / 'state_dict', strips 'module.'
    fcn.to(device).eval().requires_grad_(False)
    return fcn


def _model_kind(model: nn.Module) -> str:
    net = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(net, "model_type", "cam")


def load_classifier(path: str | Path, expected_type: str, device: torch.device | str = "cpu") -> nn.Module:
    """A trained classifier from its final weights (``model.pt``) or a training checkpoint (``last.pt``).

    Raises:
        ValueError: the file holds the other model type (naming both), or is not a classifier checkpoint.
    """
    if expected_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {expected_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    path = Path(path)
    state = load_checkpoint(path)
    missing = [k for k in ("model_type", "model", "config", "num_classes") if k not in state]
    if missing:
        raise ValueError(f"{path}: not a classifier checkpoint of sp_cam.train_cls (missing {missing})")
    if state["model_type"] != expected_type:
        raise ValueError(
            f"{path}: holds a {state['model_type']!r} model, but a {expected_type!r} model was expected "
            f"({'CAM baseline' if expected_type == 'cam' else 'SP-CAM'} weights are in the {expected_type}/ stage folder)"
        )
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise ValueError(f"{path}: stored config does not fit this version ({e})") from None
    model = build_model(classifier_config(cfg, expected_type), expected_type, int(state["num_classes"]), pretrained="")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the {expected_type} model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


@dataclass
class Loaders:
    train_set: TrainDataset
    sampler: DistributedSampler
    loader: DataLoader
    micro_batch: int
    steps_per_epoch: int  # optimizer steps


def build_loaders(
    cfg: Config, ccfg: ClassifierConfig, layout: VOCLayout, info: dist_utils.DistInfo, section: str
) -> Loaders:
    """The training loader of this process: a seeded DistributedSampler (also with one process) over the split.

    Global step k of an epoch always takes the images ``perm[k*B:(k+1)*B]`` of that epoch's permutation, whatever the
    number of processes or micro-batches.
    """
    micro = dist_utils.micro_batch_size(ccfg.batch_size, info.world_size, ccfg.grad_accum, section)
    train_set = TrainDataset(
        layout,
        cfg.data.train_split,
        crop_size=cfg.data.crop_size,
        resize_long=(cfg.data.resize_long_min, cfg.data.resize_long_max),
        seed=cfg.run.seed,
    )
    check_split_labels(layout, train_set.ids, cfg.data.train_split)
    steps = len(train_set) // ccfg.batch_size
    if steps < 1:
        raise ConfigError(
            f"split {cfg.data.train_split!r} has {len(train_set)} images, fewer than {section}.batch_size="
            f"{ccfg.batch_size}"
        )
    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.run.seed, drop_last=True
    )
    loader = DataLoader(
        train_set,
        batch_size=micro,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
    return Loaders(train_set, sampler, loader, micro, steps)


# --------------------------------------------------------------------------------------------------------------------
# One step, one epoch


@dataclass
class TrainState:
    """Everything the loop mutates; ``model`` may be the DDP wrapper of ``net``."""

    model: nn.Module
    net: nn.Module
    fcn: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    device: torch.device
    amp_dtype: torch.dtype | None
    use_saliency: bool
    cell_size: int
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best: dict[str, Any] = field(default_factory=dict)  # metrics of the best evaluated epoch
    last_eval: dict[str, Any] = field(default_factory=dict)  # metrics of the latest evaluation


def compute_loss(
    state: TrainState, batch: dict[str, Any], ccfg: ClassifierConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch: multilabel + alpha * EPS saliency (spec 3.4), the saliency on the logit grid.

    Returns:
        (loss, {"cls": ..., "sal": ...}) scalars; ``sal`` is 0 in labels-only mode.
    """
    check_batch_labels(list(batch["id"]), batch["label"], state.net.num_classes)
    image = batch["image"].to(state.device, non_blocking=True)
    labels = batch["label"].to(state.device, non_blocking=True)
    psam = None
    if state.fcn is not None:
        with torch.no_grad():  # D4: the frozen FCN gets no graph; fp32 (PSAM ops stay fp32, spec 8.3)
            psam = state.fcn(image).float()
    with _autocast(state.device, state.amp_dtype):
        logits = state.model(image) if psam is None else state.model(image, psam)
    logits = logits.float()
    loss_cls = multilabel_loss(logits, labels)
    loss_sal = logits.new_zeros(())
    if state.use_saliency:
        sal = batch["saliency"].to(state.device, non_blocking=True).float()
        sal_grid = _saliency_on_grid(sal, psam, logits.shape[-2:], state.cell_size)
        loss_sal = eps_saliency_loss(logits, sal_grid, labels, ccfg.tau)
    return loss_cls + ccfg.alpha * loss_sal, {"cls": loss_cls.detach(), "sal": loss_sal.detach()}


def _saliency_on_grid(
    sal: torch.Tensor, psam: torch.Tensor | None, grid: tuple[int, int], cell_size: int
) -> torch.Tensor:
    """(B, 1, S, S) saliency -> (B, 1, h, w): PSAM pooling for SP-CAM (spec 3.3), nearest resize for CAM (spec 3.0)."""
    if psam is not None:
        return psam_pool(sal, psam, cell_size=cell_size)
    return F.interpolate(sal, size=tuple(grid), mode="nearest")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _format_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_one_epoch(
    state: TrainState,
    batches: Iterable[dict[str, Any]],
    ccfg: ClassifierConfig,
    steps: int,
    total_epochs: int,
    metrics_path: Path | None = None,
    writer: Any = None,
) -> dict[str, float]:
    """Train ``steps`` optimizer steps of ``ccfg.grad_accum`` micro-batches each; ``state.step`` advances.

    Raises:
        TrainingDivergedError: the loss of a step is not finite (on any process); nothing is stepped.
    """
    main = dist_utils.is_main()
    accum = ccfg.grad_accum
    step_images = ccfg.batch_size
    epoch = state.epoch
    total_steps = total_epochs * steps
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "cls": 0.0, "sal": 0.0}
    step_loss = torch.zeros((), device=state.device)
    step_parts = torch.zeros(2, device=state.device)
    done = 0
    start = time.time()
    bar = tqdm(
        total=steps,
        desc=f"{_model_kind(state.net)} epoch {epoch + 1}/{total_epochs}",
        unit="step",
        disable=not main,
        dynamic_ncols=True,
        leave=False,
    )
    iterator = iter(batches)
    try:
        for micro in range(steps * accum):
            batch = next(iterator, None)
            if batch is None:
                raise RuntimeError(f"the training loader ended after {micro} of {steps * accum} micro-batches")
            last_micro = micro % accum == accum - 1
            sync = contextlib.nullcontext()
            if not last_micro and isinstance(state.model, DistributedDataParallel):
                sync = state.model.no_sync()  # all-reduce the gradients once per optimizer step
            with sync:
                loss, parts = compute_loss(state, batch, ccfg)
                scaled = loss / accum
                (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
            step_loss += loss.detach() / accum
            step_parts += torch.stack([parts["cls"], parts["sal"]]) / accum
            if not last_micro:
                continue
            _check_finite(state, step_loss, epoch, micro // accum + 1, steps)
            if state.scaler is not None:
                state.scaler.step(state.optimizer)
                state.scaler.update()
            else:
                state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            lr = state.optimizer.param_groups[0]["lr"] / state.optimizer.param_groups[0].get("lr_mult", 1.0)
            state.scheduler.step()
            state.step += 1
            done += 1
            values = dist_utils.all_reduce_mean(torch.cat([step_loss[None], step_parts])).tolist()
            step_loss.zero_()
            step_parts.zero_()
            for key, v in zip(("loss", "cls", "sal"), values, strict=True):
                sums[key] += v
            elapsed = time.time() - start
            ips = done * step_images / max(elapsed, 1e-9)
            eta = elapsed / done * (total_steps - state.step)  # training time left in the run (no evaluation)
            bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}", eta=_format_time(eta))
            bar.update(1)
            if main and (state.step % ccfg.log_every == 0 or done == steps):
                record = {
                    "kind": "train",
                    "epoch": epoch + 1,
                    "step": state.step,
                    "loss": values[0],
                    "loss_cls": values[1],
                    "loss_sal": values[2],
                    "lr": lr,
                    "images_per_s": ips,
                }
                if metrics_path is not None:
                    append_jsonl(metrics_path, record)
                if writer is not None:
                    for key in ("loss", "loss_cls", "loss_sal", "lr", "images_per_s"):
                        writer.add_scalar(f"train/{key}", record[key], state.step)
                log.debug("epoch %d step %d loss %.4f lr %.3g %.1f img/s", epoch + 1, state.step, values[0], lr, ips)
    finally:
        bar.close()
    elapsed = time.time() - start
    return {
        "loss": sums["loss"] / max(done, 1),
        "loss_cls": sums["cls"] / max(done, 1),
        "loss_sal": sums["sal"] / max(done, 1),
        "images_per_s": done * step_images / max(elapsed, 1e-9),
        "seconds": elapsed,
    }


def _check_finite(state: TrainState, step_loss: torch.Tensor, epoch: int, step_in_epoch: int, steps: int) -> None:
    bad = not bool(torch.isfinite(step_loss).all())
    if dist_utils.any_rank(bad, state.device):
        raise TrainingDivergedError(
            f"non-finite loss ({float(step_loss):.4g} on this process) at epoch {epoch + 1}, step {step_in_epoch}/"
            f"{steps} (global step {state.step + 1}); training stopped before the update, the last good checkpoint "
            f"(after epoch {epoch}) is kept. Lower the learning rate or the DRM lr multipliers, or use amp=none/bf16"
        )


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def classification_scores(
    net: nn.Module, fcn: nn.Module | None, dataset: EvalDataset, indices: list[int], cell_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """GAP scores of the foreground channels at scale 1, no flip.

    Returns:
        scores (n, K) float32 (the pooled logits), labels (n, K) float32.
    """
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    scores, labels = [], []
    try:
        for i in indices:
            item = dataset[i]
            cls_in, fcn_in = inference_inputs(item["image"][None].to(device), 1.0, cell_size)
            logits = net(cls_in) if fcn is None else net(cls_in, fcn(fcn_in).float())
            scores.append(logits.float().mean(dim=(2, 3))[0, 1:].cpu().numpy())
            labels.append(np.asarray(item["label"], dtype=np.float32))
    finally:
        net.train(was_training)
    k = getattr(net, "num_classes", 0)
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.float32)
    return np.stack(scores), np.stack(labels)


def evaluate(
    net: nn.Module, fcn: nn.Module | None, dataset: EvalDataset, ccfg: ClassifierConfig, model_type: str, cell_size: int
) -> dict[str, Any]:
    """Per-epoch evaluation on the eval split, sharded over the processes (all of them must call it).

    Pseudo-label mIoU of the in-training protocol (scale 1, no flip; every (t, th) of ``eval_t`` x ``eval_th``, t
    ignored for the CAM model) and the classification mAP of the GAP scores.

    Returns:
        {"miou", "fg_miou", "t", "th" (best pair), "pairs": {"t=..,th=..": miou}, "map", "map_chance", "images"}.
    """
    n = len(dataset) if ccfg.eval_max_images <= 0 else min(ccfg.eval_max_images, len(dataset))
    mine = dist_utils.shard(list(range(n)), dist_utils.get_rank(), dist_utils.get_world_size())
    t_list = [0] if model_type == "cam" else list(ccfg.eval_t)
    conf = evaluate_split_confusion(
        net,
        fcn,
        dataset,
        t_list,
        list(ccfg.eval_th),
        scales=EVAL_SCALES,
        flip=False,
        indices=mine,
        cell_size=cell_size,
        progress=dist_utils.is_main(),
    )
    device = next(net.parameters()).device
    results = {}
    for key in sorted(conf):
        total = dist_utils.all_reduce_sum(torch.from_numpy(conf[key]).to(device)).cpu().numpy()
        results[key] = iou_from_confusion(total)
    best_key = max(sorted(results), key=lambda k: results[k].miou)
    scores, labels = classification_scores(net, fcn, dataset, mine, cell_size)
    full_scores = torch.zeros(n, scores.shape[1] if scores.size else net.num_classes, device=device)
    full_labels = torch.zeros_like(full_scores)
    if mine:
        full_scores[mine] = torch.from_numpy(scores).to(device)
        full_labels[mine] = torch.from_numpy(labels).to(device)
    full_scores = dist_utils.all_reduce_sum(full_scores).cpu().numpy()
    full_labels = dist_utils.all_reduce_sum(full_labels).cpu().numpy()
    map_, chance = mean_average_precision(full_scores, full_labels)
    return {
        "miou": results[best_key].miou,
        "fg_miou": results[best_key].fg_miou,
        "t": int(best_key[0]),
        "th": float(best_key[1]),
        "pairs": {f"t={t},th={th:g}": r.miou for (t, th), r in results.items()},
        "map": map_,
        "map_chance": chance,
        "images": n,
    }


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def training_checkpoint(state: TrainState, cfg: Config, model_type: str, num_classes: int) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "num_classes": num_classes,
        "model": state.net.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "rng": rng_state(),
        "config": config_to_dict(cfg),
        "best": dict(state.best),
        "last_eval": dict(state.last_eval),
    }


def resume(state: TrainState, path: Path, cfg: Config, model_type: str) -> None:
    """Restore the full training state from ``last.pt``."""
    ckpt = load_checkpoint(path)
    if ckpt.get("model_type") != model_type:
        raise ValueError(f"{path}: a checkpoint of a {ckpt.get('model_type')!r} model, but {model_type!r} is trained")
    restore_model_and_optimizer(ckpt, path, config_to_dict(cfg), (model_type, "data"), state.net, state.optimizer)
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.epoch = int(ckpt["epoch"])
    state.step = int(ckpt["step"])
    state.best = dict(ckpt.get("best") or {})
    state.last_eval = dict(ckpt.get("last_eval") or {})
    set_rng_state(ckpt["rng"])
    log.info("resumed from %s after epoch %d (step %d)", path, state.epoch, state.step)


def _open_writer(sdir: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard=true but the tensorboard package is not installed: logging to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(sdir / TENSORBOARD_DIR))


def _amp_settings(amp: str, device: torch.device, section: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if amp == "none":
        return None, False
    if device.type != "cuda":
        log.warning("%s.amp=%s is for CUDA only: training in float32 on %s", section, amp, device)
        return None, False
    if amp == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


# --------------------------------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, model_type: str) -> Path:
    """Train the ``model_type`` classifier ("cam" = stage A, "spcam" = stage 2); returns the final weights' path.

    Works in a single process and under torchrun (one process per GPU / CPU slot). Skips the stage when its
    ``DONE`` marker exists; resumes from ``last.pt`` when present.
    """
    ccfg = classifier_config(cfg, model_type)
    check_classifier_config(ccfg, model_type)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    sdir = stage_dir(paths, model_type)
    final = RunPaths.model(sdir)
    started = dist_utils.open_stage(cfg, sdir, model_type)
    if started is None:
        return final
    info, device = started
    main = info.is_main
    layout = dist_utils.main_first(lambda: open_dataset(cfg))  # a toy set is generated once, by rank 0
    num_classes = layout.num_classes
    cell = cfg.fcn.cell_size
    if model_type == "spcam" and cfg.data.crop_size % cell:
        raise ConfigError(f"data.crop_size={cfg.data.crop_size} must be a multiple of fcn.cell_size={cell} for SP-CAM")
    use_saliency = layout.has_saliency and ccfg.alpha > 0
    if not layout.has_saliency:
        log.info("%s: no saliency maps: labels-only mode (multilabel loss only, no EPS saliency term)", model_type)

    eval_set = _eval_dataset(layout, cfg, ccfg, model_type) if ccfg.eval_every else None

    seed_everything(derive_seed(cfg.run.seed))  # the same initial weights on every process
    net = build_model(ccfg, model_type, num_classes).to(device)
    fcn = load_frozen_fcn(fcn_weights_path(cfg, paths), device) if model_type == "spcam" else None
    loaders = build_loaders(cfg, ccfg, layout, info, model_type)
    total_steps = ccfg.epochs * loaders.steps_per_epoch
    optimizer, scheduler = build_optimizer(net, ccfg, total_steps)
    amp_dtype, use_scaler = _amp_settings(ccfg.amp, device, model_type)
    state = TrainState(
        model=net,
        net=net,
        fcn=fcn,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda") if use_scaler else None,
        device=device,
        amp_dtype=amp_dtype,
        use_saliency=use_saliency,
        cell_size=cell,
    )
    last = RunPaths.last_checkpoint(sdir)
    if last.is_file():
        resume(state, last, cfg, model_type)
        if main:
            append_jsonl(sdir / METRICS_FILE, {"kind": "resume", "epoch": state.epoch, "step": state.step})
    if info.distributed:
        state.model = dist_utils.wrap_ddp(net, device)

    log.info(
        "%s: %d images, %d steps/epoch x %d epochs, batch %d = %d process(es) x %d micro-batch(es) x %d, device %s, "
        "precision %s",
        model_type,
        len(loaders.train_set),
        loaders.steps_per_epoch,
        ccfg.epochs,
        ccfg.batch_size,
        info.world_size,
        ccfg.grad_accum,
        loaders.micro_batch,
        device,
        {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}[amp_dtype],
    )
    metrics_path = sdir / METRICS_FILE
    writer = _open_writer(sdir, ccfg.tensorboard) if main else None
    try:
        while state.epoch < ccfg.epochs:
            epoch = state.epoch
            seed_everything(derive_seed(cfg.run.seed, epoch, info.rank))
            loaders.sampler.set_epoch(epoch)
            loaders.train_set.set_epoch(epoch)
            stats = train_one_epoch(
                state,
                loaders.loader,
                ccfg,
                loaders.steps_per_epoch,
                ccfg.epochs,
                metrics_path if main else None,
                writer,
            )
            state.epoch += 1
            record: dict[str, Any] = {"kind": "epoch", "epoch": state.epoch, "step": state.step, **stats}
            due = ccfg.eval_every and (state.epoch % ccfg.eval_every == 0 or state.epoch == ccfg.epochs)
            if due:
                dist_utils.broadcast_buffers(net)  # every rank evaluates the weights rank 0 saves
                result = evaluate(net, fcn, eval_set, ccfg, model_type, cell)
                record.update({f"eval_{k}": v for k, v in result.items()})
                _update_best(state, result, sdir, main, keep_weights=ccfg.select == "gt")
            if main:
                append_jsonl(metrics_path, record)
                if writer is not None:
                    for key in ("miou", "map"):
                        if f"eval_{key}" in record:
                            writer.add_scalar(f"eval/{key}", record[f"eval_{key}"], state.step)
                log.info("%s", _epoch_line(model_type, record, ccfg.epochs))
                save_checkpoint(last, training_checkpoint(state, cfg, model_type, num_classes))
            dist_utils.barrier()
        if main:
            _write_final(state, sdir, cfg, model_type, num_classes, ccfg, layout)
        dist_utils.barrier()
    finally:
        if writer is not None:
            writer.close()
    return final


def _eval_dataset(layout: VOCLayout, cfg: Config, ccfg: ClassifierConfig, section: str) -> EvalDataset:
    dataset = EvalDataset(layout, cfg.data.eval_split)
    n = len(dataset) if ccfg.eval_max_images <= 0 else min(ccfg.eval_max_images, len(dataset))
    if n == 0:
        raise ConfigError(
            f"data.eval_split={cfg.data.eval_split!r} is empty: set {section}.eval_every=0 and select=last"
        )
    if ccfg.select == "gt" and not any(layout.has_gt(i) for i in dataset.ids[:n]):
        raise ConfigError(
            f"{section}.select=gt needs GT masks on data.eval_split={cfg.data.eval_split!r}, none found; "
            f"use {section}.select=last"
        )
    return dataset


def _update_best(state: TrainState, result: dict[str, Any], sdir: Path, main: bool, keep_weights: bool) -> None:
    """Record an evaluation; on a new best mIoU also write its weights to ``best.pt`` (select=gt)."""
    state.last_eval = {"epoch": state.epoch, **{k: v for k, v in result.items() if k != "pairs"}}
    if state.best and result["miou"] <= state.best.get("miou", -math.inf):
        return
    state.best = dict(state.last_eval)
    if main and keep_weights:  # before last.pt: a crash in between redoes the epoch and rewrites the same file
        save_checkpoint(sdir / BEST_CHECKPOINT, {"model": state.net.state_dict(), "metrics": dict(state.best)})


def _epoch_line(model_type: str, record: dict[str, Any], epochs: int) -> str:
    line = (
        f"{model_type} epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f} (cls {record['loss_cls']:.4f}, "
        f"sal {record['loss_sal']:.4f}), {record['images_per_s']:.1f} img/s"
    )
    if "eval_miou" in record:
        line += (
            f"; eval mIoU {record['eval_miou']:.2f} (t={record['eval_t']}, th={record['eval_th']:g}), "
            f"mAP {record['eval_map']:.2f} (chance {record['eval_map_chance']:.2f})"
        )
    return line


def _write_final(
    state: TrainState,
    sdir: Path,
    cfg: Config,
    model_type: str,
    num_classes: int,
    ccfg: ClassifierConfig,
    layout: VOCLayout,
) -> None:
    if ccfg.select == "gt":
        best = load_checkpoint(sdir / BEST_CHECKPOINT)
        weights, metrics = best["model"], dict(best["metrics"])
        log.info("%s: selected epoch %d by GT mIoU %.2f", model_type, metrics["epoch"], metrics["miou"])
    else:
        weights, metrics = state.net.state_dict(), {"epoch": state.epoch}
        if state.last_eval.get("epoch") == state.epoch:
            metrics.update(state.last_eval)
    save_checkpoint(
        RunPaths.model(sdir),
        {
            "model_type": model_type,
            "model": weights,
            "config": config_to_dict(cfg),
            "num_classes": num_classes,
            "class_names": list(layout.class_names),
            "backbone": ccfg.backbone,
            "metrics": metrics,
        },
    )
    atomic_write_text(RunPaths.done(sdir), f"{model_type} finished after {state.epoch} epochs\n")
    log.info("%s: final weights %s", model_type, RunPaths.model(sdir))


# --------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("model_type", type=str, choices=MODEL_TYPES, help="cam (stage A) or spcam (stage 2)")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        sdir = stage_dir(RunPaths.from_work_dir(cfg.run.work_dir), args.model_type)
        setup_logging(cfg.run.log_level, sdir / LOG_FILE)
        run(cfg, args.model_type)

    return cli.run_command(body, diverged=(TrainingDivergedError,))


if __name__ == "__main__":
    raise SystemExit(main())
