"""Stage 3: pseudo labels for ``data.pseudo_split`` (docs/method.md §4, §5.1; docs/decisions.md D6-docs/decisions.md D9).

    python -m sp_cam.make_pseudo -c CONFIG [--shard i/n] [key=value ...]
    torchrun --nproc_per_node N -m sp_cam.make_pseudo -c CONFIG        (one shard per process)

Two phases, both resumable:

1. **Scores** (sharded): for every image the passes of docs/method.md §4 give the fused scores of the present classes for every t of
   ``pseudo.t_list``; they go to ``PSEUDO/scores/<id>.npz`` (float16), with the image's confusion matrices for every
   (t, th) pair when it has GT. With ``pseudo.ablation`` the same pass also scores the other upsampling mode, the
   baseline CAM (if its model exists) and the two superpixel upper bounds, for :mod:`sp_cam.ablation`.
   Finished ids are skipped.
2. **Selection and labels**: the per-image confusion matrices are summed (one pass, every pair), (t, th) is chosen by
   ``pseudo.select`` (``gt``: best mIoU, the reference's docs/decisions.md D8; ``fixed``: ``pseudo.t``/``pseudo.th``), the choice goes
   to ``PSEUDO/selection.json`` and the sweep to ``PSEUDO/sweep.json``, then ``pseudo_labels/<id>.png`` are written
   (palette PNGs, values 0..K; 255 where the top-2 margin is below ``pseudo.ignore_band`` if that is > 0).
   ``pseudo.save_scores`` adds the fused maps of the chosen t as ``PSEUDO/score_maps/<id>.npz`` (cam_store format).

The per-image scores files are :mod:`sp_cam.score_store`'s format. The labels and their confusion matrices are both
computed from the float16-rounded scores, so the PNGs match the reported mIoU exactly.

``DONE`` records the inputs (:func:`sp_cam.stage_guard.pseudo_inputs`). A re-run whose scores would differ (other
weights, dataset, split list, score settings) is refused with one line naming what changed (``--force`` removes every
output of the stage first); one with other selection settings only (``pseudo.select``, ``t``, ``th``,
``ignore_band``, ``save_scores``, ``eval.absent``) re-selects from the stored scores and rewrites the labels. Each
scores file carries the signature of what it was computed from (settings, weights, dataset folder): one that is
missing, damaged or of another signature is recomputed.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.classes import IGNORE_INDEX
from sp_cam import cli
from sp_cam import distributed as dist_utils
from sp_cam.config import Config, PseudoConfig, load_config
from sp_cam.guard import check_done, write_done
from sp_cam.inference import (
    UPSAMPLE_MODES,
    best_pair,
    grid_ids,
    infer_present,
    labels_from_present,
    majority_labels,
    resize_to_max_side,
    superpixel_ids,
)
from sp_cam.io import atomic_write_json, write_label_png
from sp_cam.metrics import IoUResult, confusion_matrix, iou_from_confusion
from sp_cam.models import Stage3Models, load_stage3_models
from sp_cam.paths import LabelOutputs, RunPaths
from sp_cam.score_store import (
    TH_DECIMALS,
    fused_at,
    has_signature,
    load_scores,
    save_scores,
    sum_confusions,
    t_values,
    th_values,
)
from sp_cam.stage_guard import PSEUDO_FOLLOWS, PSEUDO_RELABEL, claim_shard, pseudo_inputs

log = logging.getLogger("spcam.make_pseudo")

# ----------------------------------------------------------------------------------------------------------- phase 1


def _confusions(fused: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor, ths: Sequence[float], num: int):
    """(TH, num, num) confusion matrices of the labels of ``fused`` (n, H, W) for every th."""
    preds = labels_from_present(fused, classes, list(ths))
    return np.stack([confusion_matrix(p, mask, num) for p in preds])


def process_image(
    models: Stage3Models, item: dict[str, Any], pcfg: PseudoConfig, cell_size: int, extras: bool
) -> dict[str, np.ndarray]:
    """Everything phase 1 stores for one image (see the module docstring for the keys).

    Args:
        item: EvalDataset item (``image`` (3, H, W), ``label`` (K,), ``mask`` (H, W), 255 = ignore).
        extras: also compute the ablation entries (only used where the image has GT).
    """
    label = torch.as_tensor(item["label"]).reshape(-1)
    mask = torch.as_tensor(item["mask"]).long()
    num = int(label.numel()) + 1
    has_gt = bool((mask != IGNORE_INDEX).any())
    extras = extras and has_gt
    ts, ths = t_values(pcfg), th_values(pcfg)
    modes = [pcfg.upsample] + ([m for m in UPSAMPLE_MODES if m != pcfg.upsample] if extras else [])
    image = item["image"][None]
    res = infer_present(
        models.spcam, models.fcn, image, label, pcfg.scales, pcfg.flip, ts, modes, pcfg.renormalize_asam, cell_size,
        keep_psam=extras, max_side=pcfg.max_side,
    )  # fmt: skip
    # Round once: the stored scores, the PNG labels and the confusion matrices all come from the float16 values.
    rounded = {k: v.half() for k, v in res.scores.items()}
    out: dict[str, np.ndarray] = {
        "classes": res.classes.numpy().astype(np.int16),
        "size": np.asarray(res.size, dtype=np.int32),
        "t_list": np.asarray(ts, dtype=np.int32),
        "th_list": np.asarray(ths, dtype=np.float32),
        "upsample": np.asarray(pcfg.upsample),
        "scores": torch.stack([rounded[(pcfg.upsample, t)] for t in ts]).numpy(),
    }
    if not has_gt:
        return out
    for mode in modes:
        out[f"conf_{mode}"] = np.stack(
            [_confusions(rounded[(mode, t)].float(), res.classes, mask, ths, num) for t in ts]
        )
    if not extras:
        return out
    if models.cam is not None:
        cam = infer_present(
            models.cam, None, image, label, pcfg.scales, pcfg.flip, [0], ("bilinear",), cell_size=cell_size,
            max_side=pcfg.max_side,
        )  # fmt: skip
        out["conf_cam"] = _confusions(cam.scores[("bilinear", 0)].half().float(), cam.classes, mask, ths, num)
    size = res.size
    grid = majority_labels(grid_ids(size, cell_size), mask, num)
    out["conf_grid_ub"] = confusion_matrix(grid, mask, num)
    q = res.psam
    if q is None:  # scale 1 was not among the test scales: one more FCN forward
        from data.transforms import inference_inputs

        with torch.no_grad():
            _, fcn_in = inference_inputs(resize_to_max_side(image, pcfg.max_side), 1.0, cell_size)
            q = models.fcn(fcn_in.to(next(models.fcn.parameters()).device)).float().cpu()
    sp = majority_labels(superpixel_ids(q, size, cell_size), mask, num)
    out["conf_sp_ub"] = confusion_matrix(sp, mask, num)
    return out


def score_signature(inputs: dict[str, Any]) -> str:
    """What a stored scores file depends on (from the stage's inputs, :func:`sp_cam.stage_guard.pseudo_inputs`): the
    score settings, the weights and the dataset folder, not the split list; a scores file made otherwise is
    recomputed."""
    config = inputs["config"]
    return json.dumps(
        {
            **config["scores"],
            "weights": inputs["upstream"],
            "data": {"dataset": config["data"]["dataset"], "root": inputs["data"]["pseudo"]["root"]},
        },
        sort_keys=True,
    )


def compute_scores(
    cfg: Config,
    layout,
    ids: Sequence[str],
    device: torch.device,
    out: LabelOutputs,
    signature: str,
    progress: bool = True,
) -> int:
    """Phase 1 for ``ids`` (one shard): write every scores file that is missing, damaged or of another ``signature``.
    Returns the number computed."""
    from data.datasets import EvalDataset

    pcfg = cfg.pseudo
    todo = [i for i in ids if not has_signature(out.scores_file(i), signature)]
    log.info("scores: %d of %d images of this shard to compute", len(todo), len(ids))
    if not todo:
        return 0
    models = load_stage3_models(cfg, device, layout.num_classes, need_cam=pcfg.ablation)
    dataset = EvalDataset(layout, cfg.data.pseudo_split)
    index = {image_id: k for k, image_id in enumerate(dataset.ids)}
    subset = torch.utils.data.Subset(dataset, [index[i] for i in todo])
    loader = torch.utils.data.DataLoader(subset, batch_size=None, shuffle=False, num_workers=cfg.data.num_workers)
    start = time.time()
    bar = tqdm(loader, total=len(todo), desc="pseudo scores", unit="img", disable=not progress)
    for item in bar:
        arrays = process_image(models, item, pcfg, cfg.fcn.cell_size, pcfg.ablation)
        arrays["signature"] = np.asarray(signature)
        save_scores(out.scores_file(item["id"]), arrays)
    log.info(
        "scores: %d images in %.1f s (%.2f img/s)", len(todo), time.time() - start, len(todo) / (time.time() - start)
    )
    return len(todo)


# ----------------------------------------------------------------------------------------------------------- phase 2


def sweep(cfg: Config, ids: Sequence[str], out: LabelOutputs) -> tuple[dict[tuple[int, float], IoUResult], int]:
    """mIoU of every (t, th) pair over the images with GT, from the stored per-image confusion matrices."""
    pcfg = cfg.pseudo
    key = f"conf_{pcfg.upsample}"
    conf, count = sum_confusions(out, ids, [key], progress=True)[key]
    if conf is None:
        return {}, 0
    return pair_results(conf, t_values(pcfg), th_values(pcfg), cfg.eval.absent), count


def pair_results(
    conf: np.ndarray, ts: Sequence[int], ths: Sequence[float], absent: str = "present"
) -> dict[tuple[int, float], IoUResult]:
    """(T, TH, N, N) summed matrices -> {(t, th): IoUResult}."""
    return {
        (t, th): iou_from_confusion(conf[i, j], absent=absent) for i, t in enumerate(ts) for j, th in enumerate(ths)
    }


def select_pair(cfg: Config, results: dict[tuple[int, float], IoUResult]) -> dict[str, Any]:
    """The (t, th) choice and how it was made."""
    pcfg = cfg.pseudo
    if pcfg.select == "gt":
        if not results:
            raise ValueError(
                f"pseudo.select=gt needs GT masks, but no image of split {cfg.data.pseudo_split!r} has one; "
                "use pseudo.select=fixed with pseudo.t and pseudo.th"
            )
        (t, th), _ = best_pair(results)
    else:
        t, th = int(pcfg.t), round(float(pcfg.th), TH_DECIMALS)
    res = results.get((t, th))
    return {
        "select": pcfg.select,
        "t": t,
        "th": th,
        "miou": None if res is None else res.miou,
        "fg_miou": None if res is None else res.fg_miou,
    }


def labels_for(arrays: dict[str, np.ndarray], t: int, th: float, ignore_band: float) -> np.ndarray:
    """(H0, W0) uint8 pseudo label of one stored image at (t, th); 255 where the top-2 margin is below the band."""
    classes, fused = fused_at(arrays, t)
    label = labels_from_present(fused, classes, th)
    if ignore_band > 0 and classes.numel():
        # the competitors of every pixel: background at th, then the present classes
        stack = torch.cat([torch.full((1, *fused.shape[-2:]), float(th)), fused])
        top = stack.topk(2, dim=0).values if stack.shape[0] > 1 else None
        if top is not None:
            label = torch.where(top[0] - top[1] < ignore_band, torch.full_like(label, IGNORE_INDEX), label)
    return label.numpy().astype(np.uint8)


def write_outputs(
    cfg: Config, ids: Sequence[str], selection: dict[str, Any], out: LabelOutputs, progress: bool
) -> None:
    """Pseudo-label PNGs (and score maps) of ``ids`` for the selected pair; existing ones (same selection) are kept."""
    from sp_cam.cam_store import save_cam

    pcfg = cfg.pseudo
    t, th = int(selection["t"]), float(selection["th"])
    for image_id in tqdm(ids, desc="pseudo labels", unit="img", disable=not progress):
        png = out.label(image_id)
        maps = out.score_map(image_id)
        need_png = not png.is_file()
        need_maps = pcfg.save_scores and not maps.is_file()
        if not (need_png or need_maps):
            continue
        arrays = load_scores(out.scores_file(image_id))
        if need_png:
            write_label_png(png, labels_for(arrays, t, th, pcfg.ignore_band))
        if need_maps:
            k = arrays["t_list"].tolist().index(t)
            save_cam(maps, arrays["scores"][k].astype(np.float32), arrays["classes"], dtype="float16")


def score_pair(cfg: Config, ids: Sequence[str], t: int, th: float, out: LabelOutputs) -> IoUResult:
    """mIoU of one (t, th) pair from the stored scores and the GT masks (a pair outside the stored sweep)."""
    from sp_cam.open_data import open_dataset

    layout = open_dataset(cfg)
    conf = np.zeros((layout.num_classes + 1,) * 2, dtype=np.int64)
    for image_id in tqdm(ids, desc=f"score t={t} th={th:g}", unit="img"):
        mask = layout.load_mask(image_id)
        if mask is None:
            continue
        arrays = load_scores(out.scores_file(image_id))
        conf += confusion_matrix(labels_for(arrays, t, th, 0.0), mask, layout.num_classes + 1)
    return iou_from_confusion(conf, absent=cfg.eval.absent)


def finalize(
    cfg: Config,
    ids: Sequence[str],
    out: LabelOutputs,
    inputs: dict[str, Any],
    write_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Phase 2: sweep, selection, ``sweep.json``/``selection.json``, and the PNGs of ``write_ids`` (default all).

    The selection records the stage's ``inputs``; labels of a selection made from other inputs are removed first.
    """
    pcfg = cfg.pseudo
    results, num_gt = sweep(cfg, ids, out)
    choice = select_pair(cfg, results)
    if choice["miou"] is None and num_gt:  # select=fixed with a th outside the sweep: score it from the stored maps
        res = score_pair(cfg, ids, choice["t"], choice["th"], out)
        choice["miou"], choice["fg_miou"] = res.miou, res.fg_miou
    record = {
        **choice,
        "split": cfg.data.pseudo_split,
        "num_images": len(ids),
        "num_gt_images": num_gt,
        "upsample": pcfg.upsample,
        "ignore_band": pcfg.ignore_band,
        "absent": cfg.eval.absent,
        "config": json.loads(json.dumps(inputs)),
    }
    sweep_record = {
        "split": cfg.data.pseudo_split,
        "num_gt_images": num_gt,
        "upsample": pcfg.upsample,
        "absent": cfg.eval.absent,
        "pairs": [{"t": t, "th": th, "miou": r.miou, "fg_miou": r.fg_miou} for (t, th), r in sorted(results.items())],
    }
    atomic_write_json(out.sweep, sweep_record)
    previous = _read_json(out.selection)
    same = previous is not None and all(previous.get(k) == record[k] for k in ("t", "th", "ignore_band", "config"))
    if not same:  # labels of another selection are stale: remove them before recording the new one (crash-safe)
        for image_id in ids:
            out.label(image_id).unlink(missing_ok=True)
            out.score_map(image_id).unlink(missing_ok=True)
    atomic_write_json(out.selection, record)
    if choice["miou"] is not None:
        log.info("selected t=%d th=%.2f (%s): mIoU %.2f on %d images", choice["t"], choice["th"], pcfg.select,
                 choice["miou"], num_gt)  # fmt: skip
    else:
        log.info("selected t=%d th=%.2f (%s): no GT to score it", choice["t"], choice["th"], pcfg.select)
    if write_ids is None:
        write_ids = ids
    write_outputs(cfg, write_ids, record, out, progress=True)
    return record


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def seg_label_config(cfg: Config, selection: dict[str, Any]) -> Config:
    """The config of the pass that labels ``seg.train_split``: the (t, th) selected on ``data.pseudo_split``."""
    derived = copy.deepcopy(cfg)
    derived.data.pseudo_split = cfg.seg.train_split
    p = derived.pseudo
    p.select, p.t, p.th = "fixed", int(selection["t"]), float(selection["th"])
    p.t_list, p.th_list, p.ablation = [p.t], [p.th], False
    return derived


def heldout_config(cfg: Config) -> Config:
    """The config of the pass that chooses (t, th) with GT on ``pseudo.heldout_split`` (no ablation, no PNGs)."""
    derived = copy.deepcopy(cfg)
    derived.data.pseudo_split = cfg.pseudo.heldout_split
    derived.pseudo.select, derived.pseudo.ablation, derived.pseudo.save_scores = "gt", False, False
    return derived


def label_pass(
    cfg: Config,
    layout,
    inputs: dict[str, Any],
    out: LabelOutputs,
    shard: tuple[int, int] | None,
    recompute: Sequence[str],
    write_labels: bool = True,
) -> dict[str, Any]:
    """Scores and labels of ``data.pseudo_split`` into ``out`` (resumable, sharded); the selection record or {}.

    Args:
        inputs: what the outputs are computed from (:func:`sp_cam.stage_guard.pseudo_inputs`), checked against
            ``DONE``; a change under ``recompute`` brings the outputs up to date, any other is an error.
        write_labels: write the label PNGs (the held-out pass only selects).
    """
    info, device = dist_utils.init_distributed(cfg.run.device)
    if check_done(out.done, inputs, stage="pseudo", recompute=recompute):
        log.info("pseudo labels of %r already written (%s)", cfg.data.pseudo_split, out.done)
        return _read_json(out.selection) or {}
    rank, world = shard if shard is not None else (info.rank, info.world_size)
    ids = layout.ids(cfg.data.pseudo_split)
    mine = dist_utils.shard(ids, rank, world)
    signature = score_signature(inputs)
    compute_scores(cfg, layout, mine, device, out, signature, progress=rank == 0)
    record: dict[str, Any] = {}
    if info.distributed:
        dist_utils.barrier()
        if info.is_main:
            record = finalize(cfg, ids, out, inputs, write_ids=[])
        dist_utils.barrier()
        record = _read_json(out.selection) or {}
        if write_labels:
            write_outputs(cfg, mine, record, out, progress=info.is_main)
        dist_utils.barrier()
    else:
        missing = [i for i in ids if not has_signature(out.scores_file(i), signature)]
        if missing:
            log.info("shard %d/%d done; %d images of other shards still missing", rank, world, len(missing))
            return {}
        record = finalize(cfg, ids, out, inputs, write_ids=None if write_labels else [])
    if info.is_main:
        write_done(out.done, inputs, {k: v for k, v in record.items() if k != "config"})
        log.info("pseudo labels: %s (%d images)", out.labels, len(ids))
    return record


def run(cfg: Config, shard: tuple[int, int] | None = None, force: bool = False) -> dict[str, Any]:
    """Pseudo labels for ``cfg.data.pseudo_split``, then (stage 4 enabled, ``seg.train_split`` another split) the
    labels stage 4 trains on, at the (t, th) selected on the first.

    Args:
        shard: (i, n) to process only ids ``i::n`` (processes launched by hand); default: the torchrun rank and world
            size (a single process without torchrun). Without a process group the shard that finds every scores file
            present finishes phase 2.
        force: remove every output of stage 3 first (not with ``shard``: it would remove the other shards' files).
    Returns:
        The selection record (``t``, ``th``, ``select``, ``miou`` ...), or {} for a shard that left phase 2 to others.
    Raises:
        StaleOutputError: ``DONE`` was written for other scores (other weights, dataset, split list or score settings;
            other selection settings only re-select and relabel).
    """
    from sp_cam.open_data import open_dataset
    from sp_cam.runtime import configure_threads, setup_logging

    info, device = dist_utils.init_distributed(cfg.run.device)
    configure_threads(cfg.run.num_threads)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    setup_logging(cfg.run.log_level, paths.pseudo_log, rank=info.rank)
    if force and shard is not None:
        raise ValueError("--force with --shard would remove the other shards' scores: run --force without --shard")
    layout = dist_utils.main_first(lambda: open_dataset(cfg))
    inputs = pseudo_inputs(cfg, layout)
    out, seg_out, heldout_out = paths.pseudo_outputs, paths.seg_label_outputs, paths.heldout_outputs
    folders = [*out.folders, *seg_out.folders, *heldout_out.folders]
    with claim_shard(cfg, paths.pseudo, "pseudo labels", shard, info.is_main, folders, force, device):
        record = label_pass(cfg, layout, inputs, out, shard, PSEUDO_RELABEL)
        weights = {**inputs["upstream"], "cam": None}  # the passes below run no ablation
        g = cfg.seg
        if record and g.enabled and g.train_split and g.train_split != cfg.data.pseudo_split:
            log.info("stage 3: labels of seg.train_split=%r at t=%d th=%g (chosen on %r)", g.train_split, record["t"],
                     record["th"], cfg.data.pseudo_split)  # fmt: skip
            derived = seg_label_config(cfg, record)
            label_pass(derived, layout, pseudo_inputs(derived, layout, weights), seg_out, shard, PSEUDO_FOLLOWS)
        heldout = cfg.pseudo.heldout_split
        if record and heldout and heldout != cfg.data.pseudo_split:
            if any(layout.has_gt(i) for i in layout.ids(heldout)):
                log.info("stage 3: (t, th) chosen with GT on pseudo.heldout_split=%r too (the GT-free row)", heldout)
                derived = heldout_config(cfg)
                label_pass(derived, layout, pseudo_inputs(derived, layout, weights), heldout_out, shard,
                           PSEUDO_RELABEL, write_labels=False)  # fmt: skip
            else:
                log.info("stage 3: no GT masks on pseudo.heldout_split=%r: no GT-free row", heldout)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__, config_required=True)
    parser.add_argument("--shard", type=str, default="", help="i/n: process only the ids i::n (0-based i)")
    parser.add_argument("--force", action="store_true", help="remove every output of stage 3 and make it afresh")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        run(cfg, dist_utils.parse_shard(args.shard) if args.shard else None, force=args.force)

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
