"""Step B: multi-scale + flip CAMs of the baseline for every image of the training split (docs/method.md §4, step B variant).

    python -m sp_cam.export_cams -c CONFIG [--shard i/n] [section.key=value ...]
    torchrun --nproc_per_node N -m sp_cam.export_cams -c CONFIG     (each process takes shard RANK/WORLD_SIZE)

For each id: the baseline CAM model (``RunPaths.model(paths.cam)``) runs at ``export.scales`` with and without flip;
the per-pass softmax on the 1/16 grid is resized bilinearly to the image size, summed over the passes, normalised per
channel (PuzzleCAM ``make_cam``) and masked by the image tags (sp_cam.inference, CAM path). Only the present
foreground classes are stored, as ``paths.cams/<id>.npz`` (sp_cam.cam_store, uint8 or float16; docs/decisions.md D12, docs/method.md §8.3).
Existing files are skipped, so an interrupted export continues; ``DONE`` is written once every id has its file.
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
from sp_cam.cam_store import save_cam
from sp_cam.config import Config, load_config, save_config
from sp_cam.inference import infer_present
from sp_cam.io import atomic_write_text
from sp_cam.models import check_num_classes, load_classifier
from sp_cam.open_data import open_dataset
from sp_cam.paths import RunPaths
from sp_cam.runtime import configure_threads, resolve_device, setup_logging

log = logging.getLogger("sp_cam.export_cams")


def missing_ids(paths: RunPaths, ids: list[str]) -> list[str]:
    """The ids without a CAM file, in order."""
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
    )
    (scores,) = res.scores.values()  # the CAM path has a single key: (n, H0, W0)
    save_cam(out, scores.numpy(), res.classes.numpy(), cfg.export.dtype)


def run(cfg: Config, shard: tuple[int, int] | None = None) -> Path:
    """Export the baseline CAMs of ``data.train_split``; returns the CAM folder.

    Args:
        shard: (i, n) to process ``ids[i::n]`` only; default: RANK / WORLD_SIZE under torchrun, else everything.
    """
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    out_dir = paths.cams
    done = RunPaths.done(out_dir)
    if done.is_file():
        log.info("export: %s exists, CAMs already exported", done)
        return out_dir
    info = dist_utils.env_info()
    rank, world = shard if shard is not None else (info.rank, info.world_size)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world}: expected i/n with 0 <= i < n")
    configure_threads(cfg.run.num_threads)
    device = resolve_device(cfg.run.device, local_rank=info.local_rank)

    layout = open_dataset(cfg)
    dataset = EvalDataset(layout, cfg.data.train_split)
    weights = RunPaths.model(paths.cam)
    if not weights.is_file():
        raise FileNotFoundError(f"baseline CAM weights not found: {weights} (run python -m sp_cam.train_cls cam first)")
    model = load_classifier(weights, "cam", device)
    check_num_classes(model, weights, layout.num_classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(cfg, RunPaths.stage_config(out_dir))

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
    left = missing_ids(paths, dataset.ids)
    if left:
        log.info("export: shard %d/%d finished; %d ids of other shards still missing", rank, world, len(left))
    else:
        atomic_write_text(done, f"{len(dataset.ids)} CAMs of split {cfg.data.train_split}\n")
        log.info("export: all %d CAMs in %s", len(dataset.ids), out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--shard", type=str, default=None, help="i/n: process ids[i::n] only (default: torchrun rank)")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        shard = dist_utils.parse_shard(args.shard) if args.shard else None
        setup_logging(cfg.run.log_level, RunPaths.from_work_dir(cfg.run.work_dir).export_log)
        run(cfg, shard)

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
