"""Stage 4: train DeepLab-V2 on the pseudo labels, or on the GT masks (the fully supervised reference).

    python -m sp_cam.train_seg -c CONFIG [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.train_seg -c CONFIG [section.key=value ...]

``seg.labels`` chooses the labels: "" = stage 3's pseudo labels of ``seg.train_split`` (``WORK_DIR/pseudo_labels``, or
``WORK_DIR/seg_labels`` when the split is not ``data.pseudo_split``), ``gt`` = the GT masks (writes ``WORK_DIR/seg_gt``
instead of ``WORK_DIR/seg``), or any folder of ``<id>.png`` label maps. Every label is checked before training starts
(the file exists, an 8-bit palette or grey PNG, values 0..K or 255, the size of its image).

As deeplab-pytorch's VOC setting (every constant a field of ``seg``): random scale, flip and crop with mean / ignore
padding, cross-entropy with 255 ignored on each of the multi-scale-input outputs (scale 1, 0.75, 0.5 and their max,
labels resized to each by nearest), SGD with momentum and weight decay, ASPP at 10x / 20x the learning rate, poly decay
over ``seg.iterations`` steps of ``seg.batch_size`` images. Single-scale validation every ``seg.eval_every`` steps;
``seg.select`` keeps the last or the best weights. The loop, checkpoints, resume, DDP and AMP are
:mod:`sp_cam.engine`'s; evaluation with multi-scale inference and CRF is :mod:`sp_cam.eval_seg`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data.classes import IGNORE_INDEX
from data.ids import path_inside
from data.label_png import read_label_png
from data.segmentation import SegTrainDataset
from data.transforms import to_tensor_image
from data.voc_layout import VOCLayout
from net.deeplab import MultiScaleInputs
from sp_cam import cli, engine
from sp_cam import distributed as dist_utils
from sp_cam.config import Config, ConfigError, load_config
from sp_cam.engine import Selection, StepContext, TrainingDivergedError
from sp_cam.metrics import confusion_matrix, iou_from_confusion
from sp_cam.models import GT_LABELS, build_segmenter, seg_payload, seg_stage_name
from sp_cam.optim import sgd_poly
from sp_cam.paths import RunPaths
from sp_cam.runtime import derive_seed, place_model, seed_everything, setup_logging
from sp_cam.seg_inference import seg_probs
from sp_cam.stage_guard import seg_inputs, seg_label_pass, seg_train_split

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True)
class LabelFolder:
    """``id -> (H, W) uint8`` from ``folder/<id>.png`` (picklable, for DataLoader workers)."""

    folder: Path

    def path(self, image_id: str) -> Path:
        return path_inside(self.folder, image_id, ".png")

    def __call__(self, image_id: str) -> np.ndarray:
        return read_label_png(self.path(image_id))


@dataclass(frozen=True)
class GTMasks:
    """``id -> (H, W) uint8`` GT mask of the dataset (picklable)."""

    layout: VOCLayout

    def __call__(self, image_id: str) -> np.ndarray:
        mask = self.layout.load_mask(image_id)
        if mask is None:
            raise FileNotFoundError(f"no GT mask for id {image_id!r} in {self.layout.root} (seg.labels=gt)")
        return mask


def label_source(cfg: Config, layout: VOCLayout) -> tuple[LabelFolder | GTMasks, str]:
    """(label loader, description) of ``seg.labels`` for ``seg.train_split``."""
    if cfg.seg.labels == GT_LABELS:
        return GTMasks(layout), "gt"
    if cfg.seg.labels:
        folder = Path(cfg.seg.labels).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"label folder not found: {folder} (seg.labels)")
        return LabelFolder(folder), str(folder)
    folder = seg_label_pass(cfg).labels
    if not folder.is_dir():
        raise FileNotFoundError(f"pseudo labels not found: {folder} (run stage 3 first: python -m sp_cam.make_pseudo)")
    return LabelFolder(folder), "pseudo"


def check_labels(layout: VOCLayout, ids: list[str], load_label: LabelFolder | GTMasks, progress: bool) -> None:
    """Every training label exists, is an 8-bit label PNG with values 0..K or 255, and has its image's size."""
    k = layout.num_classes
    for image_id in tqdm(ids, desc="check labels", unit="img", disable=not progress, leave=False):
        where = load_label.path(image_id) if isinstance(load_label, LabelFolder) else layout.mask_path(image_id)
        if isinstance(load_label, LabelFolder) and not where.is_file():
            raise FileNotFoundError(f"label not found: {where} (id {image_id!r} of the training split)")
        label = load_label(image_id)
        bad = (label > k) & (label != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"{where}: label value {int(label[bad].max())} out of range 0..{k} (or {IGNORE_INDEX})")
        size = layout.image_size(image_id)
        if label.shape != size:
            raise ValueError(f"{where}: label size {label.shape} does not match the image size {size}")


# --------------------------------------------------------------------------------------------------------------------
# Loss and evaluation


def seg_loss(outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over the outputs of the pixel-mean cross-entropy, 255 ignored (deeplab-pytorch).

    Args:
        outputs: (B, K+1, h_i, w_i) logits; labels: (B, S, S) int64, resized to each output by nearest.
    """
    total = outputs[0].new_zeros(())
    for logits in outputs:
        target = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        valid = int((target != IGNORE_INDEX).sum())
        ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        total = total + ce / max(valid, 1)  # an all-ignore crop adds 0, not NaN
    return total


def evaluate(
    net: nn.Module, layout: VOCLayout, ids: list[str], absent: str, max_side: int = 0
) -> dict[str, Any] | None:
    """Single-scale mIoU on the images of ``ids`` that have GT, sharded over the processes (call it on all)."""
    mine = dist_utils.shard(ids, dist_utils.get_rank(), dist_utils.get_world_size())
    num = layout.num_classes + 1
    conf = np.zeros((num, num), dtype=np.int64)
    scored = 0
    was_training = net.training
    net.eval()
    try:
        for image_id in tqdm(mine, desc="seg validation", unit="img", disable=not dist_utils.is_main(), leave=False):
            mask = layout.load_mask(image_id)
            if mask is None:
                continue
            probs = seg_probs(net, to_tensor_image(layout.load_image(image_id))[None], max_side=max_side)
            conf += confusion_matrix(probs.argmax(0), mask, num)
            scored += 1
    finally:
        net.train(was_training)
    device = next(net.parameters()).device
    total = dist_utils.all_reduce_sum(torch.from_numpy(np.append(conf.reshape(-1), scored)).to(device)).cpu().numpy()
    if int(total[-1]) == 0:
        return None
    result = iou_from_confusion(total[:-1].reshape(num, num), absent=absent)
    return {"miou": result.miou, "fg_miou": result.fg_miou, "images": int(total[-1]), "absent": absent}


class SegTask(engine.Task):
    """Stage 4's part of a training run."""

    def __init__(self, cfg: Config, name: str, layout: VOCLayout, eval_ids: list[str], labels: str) -> None:
        self.cfg = cfg
        self.name = name
        self.layout = layout
        self.eval_ids = eval_ids
        self.labels = labels

    def loss(self, model: nn.Module, batch: dict[str, Any], ctx: StepContext):
        image = batch["image"].to(ctx.device, non_blocking=True)
        labels = batch["label"].to(ctx.device, non_blocking=True)
        with ctx.autocast():
            outputs = model(image)
        return seg_loss(outputs, labels), {}

    def evaluate(self, net: nn.Module) -> dict[str, Any] | None:
        if not self.eval_ids:
            return None
        return evaluate(net, self.layout, self.eval_ids, self.cfg.eval.absent, self.cfg.seg.max_side)

    def describe(self, result: dict[str, Any]) -> str:
        return f"{self.cfg.seg.eval_split} mIoU {result['miou']:.2f} (single scale, {result['images']} images)"

    def final_payload(self, weights: dict[str, torch.Tensor], selection: Selection) -> dict[str, Any]:
        return seg_payload(self.name, weights, self.cfg, self.layout.class_names, self.labels, selection.metrics)


def _eval_ids(cfg: Config, layout: VOCLayout) -> list[str]:
    g = cfg.seg
    ids = layout.ids(g.eval_split)
    ids = ids[: g.eval_max_images] if g.eval_max_images else ids
    if not any(layout.has_gt(i) for i in ids):
        if g.select == "gt":
            raise ConfigError(f"seg.select=gt needs GT masks on seg.eval_split={g.eval_split!r}, none found")
        log.info("stage 4: no GT masks on seg.eval_split=%r: no validation during training", g.eval_split)
        return []
    return ids


def run(cfg: Config, force: bool = False) -> Path:
    """Train the segmentation network of ``seg.labels``; returns the final weights' path.

    Skips the stage when its ``DONE`` marker was written for the same inputs (an error when for others); ``force``
    removes the stage's folder first (its evaluations too).
    """
    name = seg_stage_name(cfg)
    label = "stage 4 (GT)" if name == "seg_gt" else "stage 4"
    with engine.open_stage(cfg, name, label, partial(seg_inputs, cfg), section="seg", force=force) as stage:
        if stage is None:
            return RunPaths.model(RunPaths.from_work_dir(cfg.run.work_dir).stage(name))
        return _train(cfg, name, label, stage)


def _train(cfg: Config, name: str, label: str, stage: engine.Stage) -> Path:
    g = cfg.seg
    layout = stage.layout
    ids = layout.ids(seg_train_split(cfg))
    load_label, labels = label_source(cfg, layout)
    check_labels(layout, ids, load_label, progress=stage.is_main)
    log.info("%s: %d training images of split %r, labels: %s", label, len(ids), seg_train_split(cfg), labels)
    eval_ids = _eval_ids(cfg, layout)

    seed_everything(derive_seed(cfg.run.seed))  # the same initial weights on every process
    net = place_model(build_segmenter(g, layout.num_classes), stage.device)
    train_set = SegTrainDataset(layout, ids, load_label, g.crop_size, g.scales, seed=cfg.run.seed)
    groups = net.param_groups(g.head_lr_mult, g.bias_lr_mult)
    optimizer, scheduler = sgd_poly(groups, g.lr, g.momentum, g.weight_decay, False, g.iterations, g.poly_power, "seg")
    schedule = engine.Schedule(
        epochs=0,
        batch_size=g.batch_size,
        grad_accum=g.grad_accum,
        max_steps=g.iterations,
        eval_every=0,
        eval_every_steps=g.eval_every or g.iterations,
        select=g.select,
        amp=g.amp,
        log_every=g.log_every,
    )
    task = SegTask(cfg, name, layout, eval_ids, labels)
    train_module = MultiScaleInputs(net, g.msc_scales)
    return engine.fit(stage, net, optimizer, scheduler, train_set, task, schedule, train_module=train_module)


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--force", action="store_true", help="remove the stage's outputs and train it afresh")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        sdir = RunPaths.from_work_dir(cfg.run.work_dir).stage(seg_stage_name(cfg))
        setup_logging(cfg.run.log_level, RunPaths.train_log(sdir))
        run(cfg, force=args.force)

    return cli.run_command(body, diverged=(TrainingDivergedError,))


if __name__ == "__main__":
    raise SystemExit(main())
