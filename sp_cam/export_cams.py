"""Step B: multi-scale + flip CAMs of the baseline for every image of the training split (docs/method.md §4, step B variant).

    python -m sp_cam.export_cams -c CONFIG [--shard i/n] [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.export_cams -c CONFIG     (each process takes shard RANK/WORLD_SIZE)

For each id: the baseline CAM model (``RunPaths.model(paths.cam)``) runs at ``export.scales`` with and without flip;
the per-pass softmax on the 1/16 grid is resized bilinearly to the image size, summed over the passes, normalised per
channel (PuzzleCAM ``make_cam``) and masked by the image tags (sp_cam.inference, CAM path). Only the present
foreground classes are stored, as ``paths.cams/<id>.npz`` (sp_cam.cam_store, uint8 or float16; docs/decisions.md D12, docs/method.md §8.3).
Existing complete files are skipped (a missing, empty, truncated or damaged one is redone), so an interrupted export
continues; ``DONE`` is written once every id has its file. Both ``DONE`` and ``STARTED`` (written before the first
CAM file) record the inputs (:mod:`sp_cam.stage_guard`): a re-run for other inputs (another dataset, other baseline
weights, other export settings) is refused with one line naming what changed; ``--force`` removes the CAMs first.
The CAM files themselves carry no fingerprint: they are tied to their inputs through these two records.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.datasets import EvalDataset
from sp_cam import cli
from sp_cam import distributed as dist_utils
from sp_cam.cam_store import is_valid, save_cam
from sp_cam.config import Config, load_config, save_config
from sp_cam.guard import check_done, write_done
from sp_cam.inference import infer_present
from sp_cam.models import check_num_classes, load_classifier
from sp_cam.open_data import open_dataset
from sp_cam.paths import RunPaths
from sp_cam.runtime import configure_threads, setup_logging
from sp_cam.stage_guard import claim_shard, export_inputs, owns_folder

log = logging.getLogger("sp_cam.export_cams")


def missing_ids(paths: RunPaths, ids: list[str], check: bool = True) -> list[str]:
    """The ids without a complete CAM file, in order: missing, or (``check``) empty, truncated or damaged
    (:func:`sp_cam.cam_store.is_valid`, which reads the whole file)."""
    if check:
        return [i for i in ids if not is_valid(paths.cam_file(i))]
    return [i for i in ids if not paths.cam_file(i).is_file()]


def export_one(model: torch.nn.Module, item: dict, out: Path, cfg: Config) -> None:
    """Write the CAMs of the present classes of one dataset item.

    Args:
        item: EvalDataset item (``id``, ``image`` (3, H0, W0) normalised, ``label`` (K,)).
    """
    label = torch.as_tensor(item["label"])
    if not bool((label > 0).any()):
        raise ValueError(f"image {item['id']!r} has no positive class: no CAM to export (remove it from the split)")
    res = infer_present(
        model,
        None,
        item["image"][None],
        label,
        scales=list(cfg.export.scales),
        flip=cfg.export.flip,
        t_list=[0],
        upsamples=("bilinear",),
        cell_size=cfg.fcn.cell_size,
        max_side=cfg.export.max_side,
    )
    (scores,) = res.scores.values()  # the CAM path has a single key: (n, H0, W0)
    save_cam(out, scores.numpy(), res.classes.numpy(), cfg.export.dtype)


def run(cfg: Config, shard: tuple[int, int] | None = None, force: bool = False) -> Path:
    """Export the baseline CAMs of ``data.train_split``; returns the CAM folder.

    Args:
        shard: (i, n) to process ``ids[i::n]`` only; default: RANK / WORLD_SIZE under torchrun, else everything.
        force: remove the CAM folder first (not with ``shard``: it would remove the other shards' files).
    Raises:
        StaleOutputError: ``DONE`` (or, for an unfinished export, ``STARTED``) was written for other inputs.
    """
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    out_dir = paths.cams
    done, started = RunPaths.done(out_dir), RunPaths.started(out_dir)
    if force and shard is not None:
        raise ValueError("--force with --shard would remove the other shards' CAM files: run --force without --shard")
    configure_threads(cfg.run.num_threads)
    info, device = dist_utils.init_distributed(cfg.run.device)
    rank, world = shard if shard is not None else (info.rank, info.world_size)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world}: expected i/n with 0 <= i < n")

    layout = dist_utils.main_first(lambda: open_dataset(cfg))
    dataset = EvalDataset(layout, cfg.data.train_split)
    weights = RunPaths.model(paths.cam)
    if not weights.is_file():
        raise FileNotFoundError(f"baseline CAM weights not found: {weights} (run python -m sp_cam.train_cls cam first)")
    inputs = export_inputs(cfg, layout, weights)
    owner = owns_folder(info.is_main, shard)
    with claim_shard(cfg, out_dir, "export", shard, info.is_main, [out_dir], force, device):
        if check_done(done, inputs, stage="export"):
            log.info("export: %s exists, CAMs already exported", done)
            return out_dir
        check_done(started, inputs, stage="export", state="was started")  # CAM files of other inputs: an error
        model = load_classifier(weights, "cam", device)
        check_num_classes(model, weights, layout.num_classes)
        if owner:
            write_done(started, inputs)
        if rank == 0:
            save_config(cfg, RunPaths.stage_config(out_dir))
        _export(cfg, paths, dataset, model, rank, world)
        dist_utils.barrier()
        if missing_ids(paths, dataset.ids, check=False):
            log.info("export: shard %d/%d finished; CAMs of other shards still missing", rank, world)
        elif owner:  # every shard checked (or wrote) its own files completely
            write_done(done, inputs, {"cams": len(dataset.ids), "split": cfg.data.train_split})
            log.info("export: all %d CAMs in %s", len(dataset.ids), out_dir)
    return out_dir


def _export(cfg: Config, paths: RunPaths, dataset: EvalDataset, model: torch.nn.Module, rank: int, world: int) -> None:
    """Write the missing or damaged CAM files of shard ``rank``/``world``."""
    index = {image_id: i for i, image_id in enumerate(dataset.ids)}
    mine = dist_utils.shard(dataset.ids, rank, world)
    todo = missing_ids(paths, mine)
    log.info(
        "export: %d ids in %r, shard %d/%d has %d, %d to do (scales %s, flip %s, %s)",
        len(dataset.ids),
        cfg.data.train_split,
        rank,
        world,
        len(mine),
        len(todo),
        list(cfg.export.scales),
        cfg.export.flip,
        cfg.export.dtype,
    )
    start = time.time()
    # images are decoded by loader workers while the model runs (batch_size=None: one full-size item at a time)
    items = DataLoader(Subset(dataset, [index[i] for i in todo]), batch_size=None, num_workers=cfg.data.num_workers)
    bar = tqdm(items, total=len(todo), desc=f"export {rank}/{world}", unit="img", disable=rank != 0 and world > 1)
    for n, item in enumerate(bar, 1):
        export_one(model, item, paths.cam_file(item["id"]), cfg)
        bar.set_postfix(img_s=f"{n / max(time.time() - start, 1e-9):.2f}")
    bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--shard", type=str, default=None, help="i/n: process ids[i::n] only (default: torchrun rank)")
    parser.add_argument("--force", action="store_true", help="remove the exported CAMs and export them afresh")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        shard = dist_utils.parse_shard(args.shard) if args.shard else None
        setup_logging(cfg.run.log_level, RunPaths.from_work_dir(cfg.run.work_dir).export_log)
        run(cfg, shard, force=args.force)

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
