"""Prepare MS-COCO 2014 in VOC layout: semantic masks, image lists, ``cls_labels.json`` and ``labels.txt``.

    python tools/prepare_coco14.py [--coco COCO_DIR] [--splits train val]

``--coco`` (default from ``dataset_root.py``) holds ``annotations/instances_{train,val}2014.json`` and the images in
``train2014/`` and ``val2014/``. Written into it (finished masks are kept on re-runs):

* ``SegmentationClass/<id>.png``: palette PNG, 0 = background, 1..80 in ``data.classes.COCO_CLASSES`` order (the
  category ids are mapped through ``COCO_CATEGORY_IDS``). Overlaps: crowd regions are drawn first, then the instances
  by decreasing area, so a smaller object lying on a larger one stays visible (later = on top);
* ``ImageSets/Segmentation/<split>.txt``: the images with at least one annotation, sorted; ``<split>_1000.txt``: a
  seeded random subset of 1,000 of them, for per-epoch model selection (``coco14.yaml`` uses ``train_1000``);
* ``cls_labels.json``: {id: [classes of all annotations, crowd included]}, merged with an existing file;
* ``labels.txt``: background + the 80 COCO names.

Ids are file-name stems (``COCO_train2014_000000000009``). Polygons are rasterised with pycocotools when it is
installed, else with OpenCV (1/16-pixel vertices); RLE masks (compressed or not) are decoded either way.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import dataset_root  # noqa: E402
from data.classes import COCO_CATEGORY_IDS, COCO_CLASSES  # noqa: E402
from sp_cam.io import atomic_write_json, atomic_write_text, write_label_png  # noqa: E402

log = logging.getLogger(__name__)
LIST_DIR = Path("ImageSets") / "Segmentation"
SUBSET_SIZE = 1000
SUBSET_SEED = 0
CATEGORY_TO_CLASS = {cid: i + 1 for i, cid in enumerate(COCO_CATEGORY_IDS)}
_SHIFT = 4  # OpenCV polygon vertices with 1/16-pixel precision

try:  # optional: exact COCO rasterisation
    from pycocotools import mask as _mask_utils
except ImportError:  # pragma: no cover - depends on the environment
    _mask_utils = None


def rle_string_to_counts(s: str) -> list[int]:
    """Decode COCO's compressed RLE string (the LEB128-like scheme of ``maskApi.c: rleFrString``)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(counts: list[int], h: int, w: int) -> np.ndarray:
    """(H, W) bool from uncompressed RLE counts (alternating 0/1 runs, column-major, starting with 0s)."""
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    for i, n in enumerate(counts):
        if i % 2:
            flat[pos : pos + n] = True
        pos += n
    if pos != h * w:
        raise ValueError(f"RLE counts sum to {pos}, expected {h * w}")
    return flat.reshape(w, h).T


def rasterize(segmentation: Any, h: int, w: int) -> np.ndarray:
    """(H, W) bool mask of one COCO ``segmentation`` (polygon list or RLE dict)."""
    if isinstance(segmentation, list):
        if _mask_utils is not None:
            return _mask_utils.decode(_mask_utils.merge(_mask_utils.frPyObjects(segmentation, h, w))).astype(bool)
        canvas = np.zeros((h, w), dtype=np.uint8)
        polys = [
            np.round(np.asarray(p, dtype=np.float64).reshape(-1, 2) * (1 << _SHIFT)).astype(np.int32)
            for p in segmentation
            if len(p) >= 6
        ]
        if polys:
            cv2.fillPoly(canvas, polys, 1, lineType=cv2.LINE_8, shift=_SHIFT)
        return canvas.astype(bool)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        rh, rw = (int(v) for v in segmentation.get("size", (h, w)))
        counts = segmentation["counts"]
        counts = rle_string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
        if (rh, rw) != (h, w):
            raise ValueError(f"RLE size {(rh, rw)} differs from the image size {(h, w)}")
        return rle_decode(counts, h, w)
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def semantic_mask(anns: list[dict[str, Any]], h: int, w: int, source: str) -> np.ndarray:
    """(H, W) uint8 class map of one image's annotations (crowd first, then by decreasing area)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    order = sorted(anns, key=lambda a: (not a.get("iscrowd", 0), -float(a.get("area", 0.0))))
    for ann in order:
        try:
            m = rasterize(ann["segmentation"], h, w)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{source}: annotation {ann.get('id')}: {e}") from None
        mask[m] = CATEGORY_TO_CLASS[ann["category_id"]]
    return mask


def load_instances(path: Path) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """Images by id and their annotations, checked against the 80 known category ids."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        raw = json.loads(path.read_text())
        images = {int(im["id"]): im for im in raw["images"]}
        anns: dict[int, list[dict[str, Any]]] = {}
        for ann in raw["annotations"]:
            if ann["category_id"] not in CATEGORY_TO_CLASS:
                raise ValueError(f"{path}: annotation {ann.get('id')}: unknown category id {ann['category_id']}")
            if int(ann["image_id"]) not in images:
                raise ValueError(f"{path}: annotation {ann.get('id')}: unknown image id {ann['image_id']}")
            anns.setdefault(int(ann["image_id"]), []).append(ann)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO instances file (missing {e})") from None
    return images, anns


def prepare_split(coco: Path, split: str, cls_labels: dict[str, list[int]]) -> tuple[int, int]:
    """Masks and list of one split; adds its image labels to ``cls_labels``. Returns (listed, masks written)."""
    src = coco / "annotations" / f"instances_{split}2014.json"
    images, anns = load_instances(src)
    ids, written = [], 0
    for image_id, im_anns in tqdm(sorted(anns.items()), desc=f"{split}2014 masks", disable=len(anns) < 200):
        im = images[image_id]
        name = Path(im["file_name"]).stem
        ids.append(name)
        cls_labels[name] = sorted({CATEGORY_TO_CLASS[a["category_id"]] for a in im_anns})
        out = coco / "SegmentationClass" / f"{name}.png"
        if out.is_file():
            continue
        write_label_png(out, semantic_mask(im_anns, int(im["height"]), int(im["width"]), str(src)))
        written += 1
    ids.sort()
    atomic_write_text(coco / LIST_DIR / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    if len(ids) > SUBSET_SIZE:  # ref: model selection on a 1,000-image subset (train_1000, val_1000)
        subset = sorted(np.random.default_rng(SUBSET_SEED).choice(ids, SUBSET_SIZE, replace=False).tolist())
        atomic_write_text(coco / LIST_DIR / f"{split}_{SUBSET_SIZE}.txt", "".join(f"{i}\n" for i in subset))
    return len(ids), written


def prepare(coco: Path, splits: list[str]) -> dict[str, int]:
    if not coco.is_dir():
        raise FileNotFoundError(f"COCO folder not found: {coco}")
    labels_path = coco / "cls_labels.json"
    cls_labels: dict[str, list[int]] = {}
    if labels_path.is_file():
        try:
            cls_labels = json.loads(labels_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{labels_path}: not valid JSON ({e}); delete it to rebuild") from None
    counts = {}
    for split in splits:
        counts[split], counts[f"{split}_masks_written"] = prepare_split(coco, split, cls_labels)
    atomic_write_json(labels_path, dict(sorted(cls_labels.items())))
    atomic_write_text(coco / "labels.txt", "".join(f"{n}\n" for n in COCO_CLASSES))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=str, default="", help="COCO 2014 folder (default: dataset_root.coco14_root())")
    parser.add_argument("--splits", type=str, nargs="+", choices=("train", "val"), default=["train", "val"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        coco = Path(args.coco) if args.coco else dataset_root.coco14_root()
        counts = prepare(coco, args.splits)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
