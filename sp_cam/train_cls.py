"""Stages A and 2: train the CAM baseline or the SP-CAM classifier (docs/method.md §3.0-3.5).

    python -m sp_cam.train_cls {cam,spcam} -c CONFIG [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.train_cls {cam,spcam} -c CONFIG [section.key=value ...]

One task serves both models; the section ``cam`` or ``spcam`` of the config drives it. What is the classifiers' own is
here: the loss (multilabel + EPS saliency, the saliency pooled with the PSAM for SP-CAM), the in-training evaluation
(pseudo-label mIoU of every (t, th) pair at scale 1 and the classification mAP) and the final-weights file. The loop,
checkpoints, resume, DDP, AMP and selection are :mod:`sp_cam.engine`'s.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.datasets import EvalDataset
from data.transforms import inference_inputs
from data.voc_layout import VOCLayout
from net.cls_losses import classifier_loss
from sp_cam import cli, engine
from sp_cam import distributed as dist_utils
from sp_cam.config import ClassifierConfig, Config, ConfigError, load_config
from sp_cam.engine import Selection, StepContext, TrainingDivergedError
from sp_cam.inference import evaluate_split_confusion
from sp_cam.metrics import iou_from_confusion
from sp_cam.models import (
    CLASSIFIER_TYPES,
    build_classifier,
    classifier_config,
    classifier_payload,
    fcn_weights_path,
    load_frozen_fcn,
)
from sp_cam.open_data import train_dataset
from sp_cam.optim import build_optimizer
from sp_cam.paths import RunPaths
from sp_cam.runtime import derive_seed, place_model, seed_everything, setup_logging
from sp_cam.stage_guard import classifier_inputs

log = logging.getLogger("sp_cam.train_cls")

EVAL_SCALES = (1.0,)  # ref in-training evaluation: single scale, no flip (docs/method.md §3.5)


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
# The loss


def compute_loss(
    model: nn.Module,
    fcn: nn.Module | None,
    batch: dict[str, Any],
    ccfg: ClassifierConfig,
    ctx: StepContext,
    num_classes: int,
    use_saliency: bool,
    cell_size: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch: multilabel + alpha * EPS saliency (docs/method.md §3.4), the saliency on the logit grid.

    Args:
        model: the classifier (or its DDP wrapper); fcn: the frozen superpixel FCN for SP-CAM, else None.
    Returns:
        (loss, {"loss_cls", "loss_sal"}) scalars; ``loss_sal`` is 0 in labels-only mode.
    """
    check_batch_labels(list(batch["id"]), batch["label"], num_classes)
    image = batch["image"].to(ctx.device, non_blocking=True)
    labels = batch["label"].to(ctx.device, non_blocking=True)
    psam = None
    if fcn is not None:
        # docs/decisions.md D4: the frozen FCN gets no graph; fp32 (PSAM ops stay fp32, docs/method.md §8.3)
        with torch.no_grad():
            psam = fcn(image).float()
    with ctx.autocast():
        logits = model(image) if psam is None else model(image, psam)
    saliency = batch["saliency"].to(ctx.device, non_blocking=True).float() if use_saliency else None
    loss, loss_cls, loss_sal = classifier_loss(logits.float(), labels, saliency, psam, ccfg.alpha, ccfg.tau, cell_size)
    return loss, {"loss_cls": loss_cls.detach(), "loss_sal": loss_sal.detach()}


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def classification_score(net: nn.Module, fcn: nn.Module | None, image: torch.Tensor, cell_size: int) -> np.ndarray:
    """(K,) GAP scores of the foreground channels at scale 1, no flip, of a (1, 3, H, W) image (net in eval mode)."""
    device = next(net.parameters()).device
    cls_in, fcn_in = inference_inputs(image.to(device), 1.0, cell_size)
    logits = net(cls_in) if fcn is None else net(cls_in, fcn(fcn_in).float())
    return logits.float().mean(dim=(2, 3))[0, 1:].cpu().numpy()


def evaluate(
    net: nn.Module,
    fcn: nn.Module | None,
    dataset: EvalDataset,
    ccfg: ClassifierConfig,
    model_type: str,
    cell_size: int,
    absent: str = "present",
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
    k = net.num_classes
    scores = np.zeros((len(mine), k), np.float32)
    labels = np.zeros((len(mine), k), np.float32)
    row = {index: r for r, index in enumerate(mine)}

    def classification(index: int, item: dict[str, Any], res: Any) -> None:
        """The GAP scores of the pass the pseudo labels already ran (an image without tags runs none)."""
        gap = res.gap.numpy() if res.gap is not None else classification_score(net, fcn, item["image"][None], cell_size)
        scores[row[index]], labels[row[index]] = gap, np.asarray(item["label"], dtype=np.float32)

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
        on_item=classification,
    )
    device = next(net.parameters()).device
    results = {}
    for key in sorted(conf):
        total = dist_utils.all_reduce_sum(torch.from_numpy(conf[key]).to(device)).cpu().numpy()
        results[key] = iou_from_confusion(total, absent=absent)
    best_key = max(sorted(results), key=lambda k: results[k].miou)
    full_scores = torch.zeros(n, k, device=device)
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
# The stage


class ClassifierTask(engine.Task):
    """The classifiers' part of a training run (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        model_type: str,
        layout: VOCLayout,
        fcn: nn.Module | None,
        eval_set: EvalDataset | None,
        use_saliency: bool,
    ) -> None:
        self.cfg = cfg
        self.model_type = model_type
        self.ccfg = classifier_config(cfg, model_type)
        self.layout = layout
        self.fcn = fcn
        self.eval_set = eval_set
        self.use_saliency = use_saliency

    def loss(self, model, batch, ctx):
        k, cell = self.layout.num_classes, self.cfg.fcn.cell_size
        return compute_loss(model, self.fcn, batch, self.ccfg, ctx, k, self.use_saliency, cell)

    def evaluate(self, net):
        if self.eval_set is None:
            return None
        cell, absent = self.cfg.fcn.cell_size, self.cfg.eval.absent
        return evaluate(net, self.fcn, self.eval_set, self.ccfg, self.model_type, cell, absent)

    def describe(self, result):
        return (
            f"eval mIoU {result['miou']:.2f} (t={result['t']}, th={result['th']:g}), "
            f"mAP {result['map']:.2f} (chance {result['map_chance']:.2f})"
        )

    def checkpoint_tag(self):
        return {"model_type": self.model_type, "num_classes": self.layout.num_classes}

    def final_payload(self, weights, selection: Selection):
        return classifier_payload(self.model_type, weights, self.cfg, self.layout.class_names, selection.metrics)


def _eval_dataset(layout: VOCLayout, cfg: Config, ccfg: ClassifierConfig, section: str) -> EvalDataset | None:
    if not ccfg.eval_every:
        return None
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


def run(cfg: Config, model_type: str, force: bool = False) -> Path:
    """Train the ``model_type`` classifier ("cam" = stage A, "spcam" = stage 2); returns the final weights' path.

    Works in a single process and under torchrun (one process per GPU / CPU slot). Skips the stage when its
    ``DONE`` marker was written for the same inputs (an error when for others); resumes from ``last.pt`` when present.
    ``force`` removes the stage's outputs first.
    """
    ccfg = classifier_config(cfg, model_type)
    inputs = partial(classifier_inputs, cfg, model_type)
    with engine.open_stage(cfg, model_type, model_type, inputs, force=force) as stage:
        if stage is None:
            return RunPaths.model(RunPaths.from_work_dir(cfg.run.work_dir).stage(model_type))
        return _train(cfg, model_type, ccfg, stage)


def _train(cfg: Config, model_type: str, ccfg: ClassifierConfig, stage: engine.Stage) -> Path:
    device, layout = stage.device, stage.layout
    cell = cfg.fcn.cell_size
    if model_type == "spcam" and cfg.data.crop_size % cell:
        raise ConfigError(f"data.crop_size={cfg.data.crop_size} must be a multiple of fcn.cell_size={cell} for SP-CAM")
    use_saliency = layout.has_saliency and ccfg.alpha > 0
    if not layout.has_saliency:
        log.info("%s: no saliency maps: labels-only mode (multilabel loss only, no EPS saliency term)", model_type)
    eval_set = _eval_dataset(layout, cfg, ccfg, model_type)

    seed_everything(derive_seed(cfg.run.seed))  # the same initial weights on every process
    net = place_model(build_classifier(ccfg, model_type, layout.num_classes), device)
    fcn = load_frozen_fcn(fcn_weights_path(cfg), device) if model_type == "spcam" else None
    train_set = train_dataset(cfg, layout)
    check_split_labels(layout, train_set.ids, cfg.data.train_split)
    total_steps = ccfg.epochs * (len(train_set) // ccfg.batch_size)
    optimizer, scheduler = build_optimizer(net, ccfg, max(total_steps, 1))
    schedule = engine.Schedule(
        epochs=ccfg.epochs,
        batch_size=ccfg.batch_size,
        grad_accum=ccfg.grad_accum,
        eval_every=ccfg.eval_every,
        select=ccfg.select,
        amp=ccfg.amp,
        log_every=ccfg.log_every,
        tensorboard=ccfg.tensorboard,
    )
    task = ClassifierTask(cfg, model_type, layout, fcn, eval_set, use_saliency)
    return engine.fit(stage, net, optimizer, scheduler, train_set, task, schedule)


# --------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("model_type", type=str, choices=CLASSIFIER_TYPES, help="cam (stage A) or spcam (stage 2)")
    parser.add_argument("--force", action="store_true", help="remove the stage's outputs and train it afresh")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        sdir = RunPaths.from_work_dir(cfg.run.work_dir).stage(args.model_type)
        setup_logging(cfg.run.log_level, RunPaths.train_log(sdir))
        run(cfg, args.model_type, force=args.force)

    return cli.run_command(body, diverged=(TrainingDivergedError,))


if __name__ == "__main__":
    raise SystemExit(main())
