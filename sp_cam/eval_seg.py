"""Stage 4 inference and evaluation: label maps of a split and their mIoU, single scale, multi-scale + flip, CRF.

    python -m sp_cam.eval_seg -c CONFIG [--split val|test|...] [--shard i/n] [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.eval_seg -c CONFIG [--split ...]        (one shard per process)

The network of ``seg.labels`` (``WORK_DIR/seg/model.pt``, or ``seg_gt/`` for ``seg.labels=gt``) labels every image of
the split (default ``seg.eval_split``) three ways: single scale (the plain network), multi-scale + flip
(``seg.test_scales`` x ``seg.test_flip``, softmax probabilities averaged) and, with ``seg.crf`` (``auto``: when
pydensecrf2 is installed), a dense CRF on the multi-scale probabilities. The label map of the last of these goes to
``<stage>/predictions/<split>/<id>.png`` (palette PNG); for VOC ``test`` also to
``<stage>/results/VOC2012/Segmentation/comp6_test_cls/<id>.png``, the layout the evaluation server expects. Where the
image has GT, the confusion matrix of each mode goes to ``<stage>/eval/<split>/<id>.npz``, with the signature of
what it was computed from (the weights, the inference settings, the dataset folder); an image whose file is complete
and of this signature is skipped, so an interrupted run continues (a damaged or stale file is redone). When every
image is done, ``<stage>/eval_<split>.json`` holds the mIoU of each mode (``eval.absent`` convention) with the
per-class IoU, and the inputs of the evaluation (:mod:`sp_cam.stage_guard`): a re-run for other inputs is refused
with one line naming what changed; ``--force`` removes this split's evaluation first.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.voc_layout import VOCLayout
from sp_cam import cli
from sp_cam import distributed as dist_utils
from sp_cam.config import Config, load_config
from sp_cam.crf import CRFParams, crf_available, dense_crf
from sp_cam.guard import StaleOutputError, check_done, fingerprint
from sp_cam.inference import resize_to_max_side
from sp_cam.io import NPZ_ERRORS, DamagedFileError, atomic_write, atomic_write_json, read_npz, write_label_png
from sp_cam.metrics import confusion_matrix, iou_from_confusion
from sp_cam.models import load_segmenter, seg_stage_name
from sp_cam.open_data import open_dataset
from sp_cam.paths import RunPaths
from sp_cam.runtime import configure_threads, setup_logging
from sp_cam.seg_inference import seg_labels, seg_probs, upsampled_argmax
from sp_cam.stage_guard import claim_shard, owns_folder, seg_eval_inputs

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
    """{mode: (H, W) uint8 label map} of one image for every mode that runs.

    Above ``seg.max_side`` the passes and the CRF run on the downscaled image (the CRF's kernel widths are in pixels of
    VOC-sized images, and it needs about 1.9 GiB per megapixel) and only the label maps are made at full size.
    """
    g, image = cfg.seg, item["image"][None]
    size = tuple(image.shape[-2:])
    out = {"single": seg_labels(model, image, max_side=g.max_side).numpy().astype(np.uint8)}
    probs = seg_probs(model, resize_to_max_side(image, g.max_side), g.test_scales, g.test_flip)  # (K+1, h, w)
    out["ms_flip"] = upsampled_argmax(probs, size).numpy().astype(np.uint8)
    if crf:
        rgb = np.asarray(item["rgb"])
        if tuple(probs.shape[-2:]) != size:
            rgb = np.asarray(Image.fromarray(rgb).resize(probs.shape[-1:-3:-1], Image.BILINEAR))
        refined = torch.from_numpy(dense_crf(rgb, probs.numpy(), crf_params(cfg)))
        out["crf"] = upsampled_argmax(refined, size).numpy().astype(np.uint8)
    return out


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def _done(path: Path, modes: list[str], signature: str) -> bool:
    """A complete evaluation file of this signature (every entry read: a damaged one is recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "signature" not in z.files or str(z["signature"]) != signature:
                return False
            if "no_gt" in z.files:
                return True
            return all(z[f"conf_{m}"].size > 0 for m in modes)
    except (*NPZ_ERRORS, TypeError):  # TypeError: a bare .npy array, which is no context manager
        return False


def is_voc_test(cfg: Config, split: str) -> bool:
    """Whether the labels also go to the layout of the VOC evaluation server."""
    return cfg.data.dataset == "voc12" and split == VOC_TEST_SPLIT


def file_signature(inputs: dict[str, Any], split: str) -> str:
    """What one image's evaluation file depends on: the weights, the inference settings and the dataset folder (not
    the split list or the class averaging, which only the summary depends on)."""
    config = {k: v for k, v in inputs["config"].items() if k != "eval"}
    return fingerprint({"config": config, "upstream": inputs["upstream"], "root": inputs["data"][split]["root"]})


def summarise(cfg: Config, sdir: Path, split: str, ids: list[str], modes: list[str], class_names) -> dict[str, Any]:
    """Sum the per-image matrices into ``eval_<split>.json``."""
    num = len(class_names)
    totals = {m: np.zeros((num, num), dtype=np.int64) for m in modes}
    scored = 0
    for image_id in ids:
        z = read_npz(RunPaths.seg_score_file(sdir, split, image_id), what="evaluation file")
        if "no_gt" in z:
            continue
        scored += 1
        for m in modes:
            if f"conf_{m}" not in z:
                raise DamagedFileError(f"{RunPaths.seg_score_file(sdir, split, image_id)}: no conf_{m}")
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


def run(
    cfg: Config, split: str | None = None, shard: tuple[int, int] | None = None, force: bool = False
) -> dict[str, Any]:
    """Label ``split`` (default ``seg.eval_split``) with the stage-4 network; returns the summary (or {} for a shard
    that left the summary to others).

    Args:
        force: remove this split's evaluation first (not with ``shard``: it would remove the other shards' files).
    Raises:
        StaleOutputError: the summary was written for other inputs (other weights, inference settings or list).
    """
    split = split or cfg.seg.eval_split
    info, device = dist_utils.init_distributed(cfg.run.device)
    configure_threads(cfg.run.num_threads)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    name = seg_stage_name(cfg)
    sdir = paths.stage(name)
    summary_path = RunPaths.seg_summary(sdir, split)
    scores_dir, predictions = RunPaths.seg_scores(sdir, split), RunPaths.seg_predictions(sdir, split)
    if force and shard is not None:
        raise ValueError("--force with --shard would remove the other shards' files: run --force without --shard")
    weights = RunPaths.model(sdir)
    if not weights.is_file():
        raise FileNotFoundError(f"segmentation weights not found: {weights} (train stage 4 first: sp_cam.train_seg)")
    layout = dist_utils.main_first(lambda: open_dataset(cfg))
    ids = layout.ids(split)
    crf = use_crf(cfg)
    modes = [m for m in MODES if m != "crf" or crf]
    inputs = seg_eval_inputs(cfg, layout, split, weights, modes)
    signature = file_signature(inputs, split)
    voc_test = is_voc_test(cfg, split)
    folders = [scores_dir, predictions] + ([RunPaths.voc_test_results(sdir)] if voc_test else [])
    outputs, clean = [*folders, summary_path], [sdir, *folders]
    label = f"stage 4 evaluation of {split!r}"
    with claim_shard(cfg, sdir, label, shard, info.is_main, outputs, force, device, clean):
        try:
            finished = check_done(summary_path, inputs, stage=name)
        except StaleOutputError as e:
            raise StaleOutputError(f"{e} (python -m sp_cam.eval_seg --force: this evaluation only)") from None
        if finished:
            log.info("stage 4: %s exists, %s already evaluated", summary_path, split)
            return json.loads(summary_path.read_text())
        return _evaluate(cfg, layout, sdir, split, ids, modes, crf, inputs, signature, shard, info, device)


def _evaluate(
    cfg: Config,
    layout: VOCLayout,
    sdir: Path,
    split: str,
    ids: list[str],
    modes: list[str],
    crf: bool,
    inputs: dict[str, Any],
    signature: str,
    shard: tuple[int, int] | None,
    info: dist_utils.DistInfo,
    device: torch.device,
) -> dict[str, Any]:
    rank, world = shard if shard is not None else (info.rank, info.world_size)
    mine = dist_utils.shard(ids, rank, world)
    todo = [i for i in mine if not _done(RunPaths.seg_score_file(sdir, split, i), modes, signature)]
    log.info("stage 4: %s, %d of %d images of this shard to label (modes %s)", split, len(todo), len(mine), modes)
    voc_test = is_voc_test(cfg, split)
    if todo:
        model = load_segmenter(RunPaths.model(sdir), device)
        loader = DataLoader(_Images(layout, todo), batch_size=None, num_workers=cfg.data.num_workers)
        start = time.time()
        for item in tqdm(loader, total=len(todo), desc=f"stage 4 {split}", unit="img", disable=rank != 0):
            labels = label_image(model, item, cfg, crf)
            final = labels[modes[-1]]
            write_label_png(RunPaths.seg_prediction(sdir, split, item["id"]), final)
            if voc_test:
                write_label_png(RunPaths.voc_test_result(sdir, item["id"]), final)
            mask = item["mask"]
            if mask is None:
                arrays = {"no_gt": np.zeros(0)}
            else:
                num = layout.num_classes + 1
                arrays = {f"conf_{m}": confusion_matrix(labels[m], mask, num) for m in modes}
            arrays["signature"] = np.asarray(signature)
            _save_npz(RunPaths.seg_score_file(sdir, split, item["id"]), arrays)
        log.info("stage 4: %d images in %.1f s", len(todo), time.time() - start)
    dist_utils.barrier()
    if not all(_done(RunPaths.seg_score_file(sdir, split, i), modes, signature) for i in ids):
        log.info("stage 4: shard %d/%d done; other shards still running", rank, world)
        return {}
    if not owns_folder(info.is_main, shard):
        return {}
    summary = summarise(cfg, sdir, split, ids, modes, layout.class_names)
    record = json.loads(json.dumps(inputs))
    summary.update(fingerprint=fingerprint(record), inputs=record)  # the summary closes the evaluation: its marker
    atomic_write_json(RunPaths.seg_summary(sdir, split), summary)
    for m, r in summary["modes"].items():
        log.info("stage 4: %s mIoU %.2f (%s, %d images with GT)", split, r["miou"], m, summary["num_gt_images"])
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__, config_required=True)
    parser.add_argument("--split", type=str, default="", help="the split to label (default seg.eval_split)")
    parser.add_argument("--shard", type=str, default="", help="i/n: process only the ids i::n (0-based i)")
    parser.add_argument("--force", action="store_true", help="remove this split's evaluation and evaluate afresh")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        sdir = RunPaths.from_work_dir(cfg.run.work_dir).stage(seg_stage_name(cfg))
        setup_logging(cfg.run.log_level, RunPaths.eval_log(sdir))
        run(cfg, args.split or None, dist_utils.parse_shard(args.shard) if args.shard else None, args.force)

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
