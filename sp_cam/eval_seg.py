"""Stage 4 inference and evaluation: label maps of a split and their mIoU, single scale, multi-scale + flip, CRF.

    python -m sp_cam.eval_seg -c CONFIG [--split val|test|...] [--shard i/n] [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.eval_seg -c CONFIG [--split ...]        (one shard per process)

The network of ``seg.labels`` (``WORK_DIR/seg/model.pt``, or ``seg_gt/`` for ``seg.labels=gt``) labels every image of
the split (default ``seg.eval_split``) three ways: single scale (the plain network), multi-scale + flip
(``seg.test_scales`` x ``seg.test_flip``, softmax probabilities averaged) and, with ``seg.crf`` (``auto``: when
pydensecrf2 is installed), a dense CRF on the multi-scale probabilities. The label map of the last of these goes to
``<stage>/predictions/<split>/<id>.png`` (palette PNG); for VOC ``test`` also to
``<stage>/results/VOC2012/Segmentation/comp6_test_cls/<id>.png``, the layout the evaluation server expects. Where the
image has GT, the confusion matrix of each mode goes to ``<stage>/eval/<split>/<id>.npz``; an image whose file
exists is skipped, so an interrupted run continues. When every image is done, ``<stage>/eval_<split>.json`` holds
the mIoU of each mode (``eval.absent`` convention) with the per-class IoU.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.voc_layout import VOCLayout
from sp_cam import cli
from sp_cam import distributed as dist_utils
from sp_cam.config import Config, load_config
from sp_cam.crf import CRFParams, crf_available, dense_crf
from sp_cam.io import atomic_write, atomic_write_json, write_label_png
from sp_cam.metrics import confusion_matrix, iou_from_confusion
from sp_cam.models import load_segmenter, seg_stage_name
from sp_cam.open_data import open_dataset
from sp_cam.paths import RunPaths
from sp_cam.runtime import configure_threads, setup_logging
from sp_cam.seg_inference import seg_probs

log = logging.getLogger(__name__)

MODES = ("single", "ms_flip", "crf")  # single scale; multi-scale + flip; CRF on the multi-scale probabilities
VOC_TEST_SPLIT = "test"


class _Images(Dataset):
    """Decoded images (uint8 and normalised) and GT masks of some ids (decoded in DataLoader workers)."""

    def __init__(self, layout: VOCLayout, ids: list[str]) -> None:
        self.layout = layout
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from data.transforms import to_tensor_image

        image_id = self.ids[index]
        image = self.layout.load_image(image_id)
        mask = self.layout.load_mask(image_id, image.shape[:2])
        mask = None if mask is None else np.array(mask)  # writable copies: the loader turns arrays into tensors
        return {"id": image_id, "rgb": np.array(image), "image": to_tensor_image(image), "mask": mask}


def use_crf(cfg: Config) -> bool:
    """Whether the CRF mode runs (``seg.crf``: auto = when pydensecrf2 is importable, require = error without it)."""
    if cfg.seg.crf == "none":
        return False
    available = crf_available()
    if cfg.seg.crf == "require" and not available:
        dense_crf(np.zeros((1, 1, 3), np.uint8), np.ones((1, 1, 1)), CRFParams())  # raises the one-line install hint
    if not available:
        log.info("stage 4: pydensecrf2 not installed: no CRF mode (seg.crf=auto; pip install pydensecrf2)")
    return available


def crf_params(cfg: Config) -> CRFParams:
    g = cfg.seg
    return CRFParams(g.crf_iterations, g.crf_pos_w, g.crf_pos_xy_std, g.crf_bi_w, g.crf_bi_xy_std, g.crf_bi_rgb_std)


def label_image(model: torch.nn.Module, item: dict[str, Any], cfg: Config, crf: bool) -> dict[str, np.ndarray]:
    """{mode: (H, W) uint8 label map} of one image for every mode that runs."""
    image = item["image"][None]
    out = {"single": seg_probs(model, image).argmax(0).numpy().astype(np.uint8)}
    probs = seg_probs(model, image, cfg.seg.test_scales, cfg.seg.test_flip)
    out["ms_flip"] = probs.argmax(0).numpy().astype(np.uint8)
    if crf:
        out["crf"] = dense_crf(np.asarray(item["rgb"]), probs.numpy(), crf_params(cfg)).argmax(0).astype(np.uint8)
    return out


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def _done(path: Path, modes: list[str]) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return all(f"conf_{m}" in z.files for m in modes) or "no_gt" in z.files
    except (OSError, ValueError, EOFError, KeyError):
        return False


def summarise(cfg: Config, sdir: Path, split: str, ids: list[str], modes: list[str], class_names) -> dict[str, Any]:
    """Sum the per-image matrices into ``eval_<split>.json``."""
    num = len(class_names)
    totals = {m: np.zeros((num, num), dtype=np.int64) for m in modes}
    scored = 0
    for image_id in ids:
        with np.load(RunPaths.seg_scores(sdir, split) / f"{image_id}.npz", allow_pickle=False) as z:
            if "no_gt" in z.files:
                continue
            scored += 1
            for m in modes:
                totals[m] += z[f"conf_{m}"]
    summary: dict[str, Any] = {
        "split": split,
        "images": len(ids),
        "num_gt_images": scored,
        "absent": cfg.eval.absent,
        "final_mode": modes[-1],
        "modes": {},
    }
    if scored:
        for m in modes:
            r = iou_from_confusion(totals[m], absent=cfg.eval.absent)
            summary["modes"][m] = {
                "miou": r.miou,
                "fg_miou": r.fg_miou,
                "per_class": {
                    n: (None if np.isnan(v) else 100 * float(v)) for n, v in zip(class_names, r.iou, strict=True)
                },
            }
    return summary


def run(cfg: Config, split: str | None = None, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Label ``split`` (default ``seg.eval_split``) with the stage-4 network; returns the summary (or {} for a shard
    that left the summary to others)."""
    split = split or cfg.seg.eval_split
    info, device = dist_utils.init_distributed(cfg.run.device)
    configure_threads(cfg.run.num_threads)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    sdir = paths.stage(seg_stage_name(cfg))
    summary_path = RunPaths.seg_summary(sdir, split)
    if summary_path.is_file():
        log.info("stage 4: %s exists, %s already evaluated", summary_path, split)
        return json.loads(summary_path.read_text())
    weights = RunPaths.model(sdir)
    if not weights.is_file():
        raise FileNotFoundError(f"segmentation weights not found: {weights} (train stage 4 first: sp_cam.train_seg)")
    layout = open_dataset(cfg)
    ids = layout.ids(split)
    crf = use_crf(cfg)
    modes = [m for m in MODES if m != "crf" or crf]
    rank, world = shard if shard is not None else (info.rank, info.world_size)
    mine = dist_utils.shard(ids, rank, world)
    scores_dir = RunPaths.seg_scores(sdir, split)
    todo = [i for i in mine if not _done(scores_dir / f"{i}.npz", modes)]
    log.info("stage 4: %s, %d of %d images of this shard to label (modes %s)", split, len(todo), len(mine), modes)
    voc_test = cfg.data.dataset == "voc12" and split == VOC_TEST_SPLIT
    if todo:
        model = load_segmenter(weights, device)
        loader = DataLoader(_Images(layout, todo), batch_size=None, num_workers=cfg.data.num_workers)
        start = time.time()
        for item in tqdm(loader, total=len(todo), desc=f"stage 4 {split}", unit="img", disable=rank != 0):
            labels = label_image(model, item, cfg, crf)
            final = labels[modes[-1]]
            write_label_png(RunPaths.seg_predictions(sdir, split) / f"{item['id']}.png", final)
            if voc_test:
                write_label_png(RunPaths.voc_test_results(sdir) / f"{item['id']}.png", final)
            mask = item["mask"]
            if mask is None:
                arrays = {"no_gt": np.zeros(0)}
            else:
                num = layout.num_classes + 1
                arrays = {f"conf_{m}": confusion_matrix(labels[m], mask, num) for m in modes}
            _save_npz(scores_dir / f"{item['id']}.npz", arrays)
        log.info("stage 4: %d images in %.1f s", len(todo), time.time() - start)
    dist_utils.barrier()
    if not all(_done(scores_dir / f"{i}.npz", modes) for i in ids):
        log.info("stage 4: shard %d/%d done; other shards still running", rank, world)
        return {}
    if not info.is_main:
        return {}
    summary = summarise(cfg, sdir, split, ids, modes, layout.class_names)
    atomic_write_json(summary_path, summary)
    for m, r in summary["modes"].items():
        log.info("stage 4: %s mIoU %.2f (%s, %d images with GT)", split, r["miou"], m, summary["num_gt_images"])
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__, config_required=True)
    parser.add_argument("--split", type=str, default="", help="the split to label (default seg.eval_split)")
    parser.add_argument("--shard", type=str, default="", help="i/n: process only the ids i::n (0-based i)")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        sdir = RunPaths.from_work_dir(cfg.run.work_dir).stage(seg_stage_name(cfg))
        setup_logging(cfg.run.log_level, RunPaths.eval_log(sdir))
        run(cfg, args.split or None, dist_utils.parse_shard(args.shard) if args.shard else None)

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
