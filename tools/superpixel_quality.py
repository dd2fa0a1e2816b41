"""Superpixel quality of the stage-1 FCN against scikit-image SLIC at the same superpixel count.

    python -m tools.superpixel_quality --data-root DIR --split NAME [--weights FILE] [--json OUT] [--max-images N]

Scores every image of the split that has a GT mask: ASA, boundary recall (r = 2 px) and undersegmentation error
(Neubert-Protzel; definitions in ``sp_cam/superpixel_metrics.py``), all in percent and averaged over images, the
number of superpixels and the milliseconds per image. FCN superpixels are the hard assignment of the PSAM (each pixel
to its argmax candidate cell ``c(p) + o_k``); images are zero-padded bottom/right to a multiple of 16 (and of the cell
size) for the FCN and scored at their original size. SLIC runs on the original image with ``n_segments`` = the FCN's
superpixel count of that image. Without ``--weights`` the FCN is randomly initialised (seeded): the baseline a trained
FCN must beat. ``--json`` writes ``{"fcn": {"asa", "br", "ue", "n_superpixels", "ms_per_image"}, "slic": {...}}``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data.transforms import to_tensor_image
from data.voc_layout import VOCLayout
from net.psam import CELL_SIZE, hard_assignment, pad_to_multiple
from net.spixel_fcn import INPUT_MULTIPLE, SpixelNet, build_spixel_fcn
from sp_cam import superpixel_metrics as M
from sp_cam.io import atomic_write_json
from sp_cam.runtime import configure_threads, place_model, resolve_device, setup_logging

log = logging.getLogger("superpixel_quality")

SLIC_COMPACTNESS = 10.0  # scikit-image's default compactness for SLIC
KEYS = ("asa", "br", "ue", "n_superpixels", "ms_per_image")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def fcn_superpixels(model: SpixelNet, image: np.ndarray, cell_size: int, device: torch.device) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) int64 superpixel labels at the original size."""
    x = to_tensor_image(image)[None].to(device)
    padded, (h, w) = pad_to_multiple(x, math.lcm(INPUT_MULTIPLE, cell_size))
    labels = hard_assignment(model(padded), cell_size)[0, :h, :w]
    return labels.cpu().numpy()


def slic_superpixels(image: np.ndarray, n_segments: int, compactness: float) -> np.ndarray:
    from skimage.segmentation import slic

    return slic(image, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)


def score(sp: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    return {
        "asa": M.achievable_segmentation_accuracy(sp, gt),
        "br": M.boundary_recall(sp, gt),
        "ue": M.undersegmentation_error(sp, gt),
        "n_superpixels": M.number_of_superpixels(sp),
    }


def summarise(rows: list[dict[str, float]], ms: list[float]) -> dict[str, float]:
    out = {}
    for key in ("asa", "br", "ue"):
        values = [r[key] for r in rows if not math.isnan(r[key])]
        out[key] = 100.0 * float(np.mean(values)) if values else float("nan")
    out["n_superpixels"] = float(np.mean([r["n_superpixels"] for r in rows]))
    out["ms_per_image"] = float(np.mean(ms))
    return {k: out[k] for k in KEYS}


def evaluate(
    layout: VOCLayout,
    split: str,
    model: SpixelNet,
    cell_size: int,
    device: torch.device,
    max_images: int = 0,
    compactness: float = SLIC_COMPACTNESS,
) -> dict[str, dict[str, float]]:
    ids = [i for i in layout.ids(split) if layout.has_gt(i)]
    if max_images > 0:
        ids = ids[:max_images]
    if not ids:
        raise ValueError(f"{layout.list_file(split)}: no image of split {split!r} has a GT mask under {layout.root}")
    from tqdm import tqdm

    place_model(model, device).eval()
    first = layout.load_image(ids[0])
    fcn_superpixels(model, first, cell_size, device)  # warm-up: the first call pays for allocation and kernel choice
    rows: dict[str, list[dict[str, float]]] = {"fcn": [], "slic": []}
    ms: dict[str, list[float]] = {"fcn": [], "slic": []}
    for image_id in tqdm(ids, desc="superpixel quality", unit="img", dynamic_ncols=True):
        image = layout.load_image(image_id)
        gt = layout.load_mask(image_id, image.shape[:2])
        _sync(device)
        t0 = time.perf_counter()
        sp = fcn_superpixels(model, image, cell_size, device)
        _sync(device)
        ms["fcn"].append(1000 * (time.perf_counter() - t0))
        rows["fcn"].append(score(sp, gt))
        n = rows["fcn"][-1]["n_superpixels"]
        t0 = time.perf_counter()
        sp_slic = slic_superpixels(image, n, compactness)
        ms["slic"].append(1000 * (time.perf_counter() - t0))
        rows["slic"].append(score(sp_slic, gt))
    return {name: summarise(rows[name], ms[name]) for name in ("fcn", "slic")}


def table(result: dict[str, dict[str, float]]) -> str:
    lines = [f"{'method':<6} {'ASA %':>7} {'BR %':>7} {'UE %':>7} {'#sp':>8} {'ms/img':>8}"]
    for name, r in result.items():
        lines.append(
            f"{name:<6} {r['asa']:7.2f} {r['br']:7.2f} {r['ue']:7.2f} {r['n_superpixels']:8.1f} {r['ms_per_image']:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=str, required=True, help="VOC-layout dataset folder")
    parser.add_argument("--split", type=str, required=True, help="list under ImageSets/Segmentation")
    parser.add_argument("--weights", type=str, default="", help="FCN weights (stage-1 model.pt or published file)")
    parser.add_argument("--json", type=str, default="", help="write the results to this JSON file")
    parser.add_argument("--max-images", type=int, default=0, help="score at most N images (0 = all)")
    parser.add_argument("--cell-size", type=int, default=CELL_SIZE, help="superpixel grid cell in pixels")
    parser.add_argument("--compactness", type=float, default=SLIC_COMPACTNESS, help="SLIC compactness")
    parser.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed when no weights are given")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    try:
        root = Path(args.data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        if args.cell_size < 1:
            raise ValueError(f"--cell-size must be >= 1, got {args.cell_size}")
        configure_threads(args.threads)
        layout = VOCLayout(root)
        device = resolve_device(args.device)
        if args.weights:
            model = build_spixel_fcn(args.weights)
        else:
            log.info("no --weights: scoring a randomly initialised FCN (seed %d)", args.seed)
            torch.manual_seed(args.seed)
            model = SpixelNet()
        result = evaluate(layout, args.split, model, args.cell_size, device, args.max_images, args.compactness)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
