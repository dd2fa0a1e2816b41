"""Prepare MS-COCO 2014 in VOC layout: semantic masks, image lists, ``cls_labels.json`` and ``labels.txt``.

    python -m tools.prepare_coco14 [--coco COCO_DIR] [--splits train val] [--labels labels.txt]

``--coco`` (default from ``dataset_root.py``) holds ``annotations/instances_{train,val}2014.json`` and the images in
``train2014/`` and ``val2014/``. Written into it (finished masks are kept on re-runs):

* ``SegmentationClass/<id>.png``: palette PNG, 0 = background, 1..K = the class list (``--labels``, else the 80 COCO
  names of ``data.classes.COCO_CLASSES``);
* ``ImageSets/Segmentation/<split>.txt``: the images with at least one annotation, sorted; ``<split>_1000.txt``: a
  seeded random subset of 1,000 of them, for per-epoch model selection (``coco14.yaml`` uses ``train_1000``);
* ``cls_labels.json``: {id: [classes of all annotations, crowd included]}, merged with an existing file;
* ``labels.txt``: the class list, background first, one name per line.

Classes. The ``categories`` of each annotation file are mapped to the class list **by name** (exact match after
stripping spaces), never by their ids, so a file whose ids are not COCO's (person = 7, ...) gets the right classes. A
category name that is not in the class list, the background name, a duplicate category id or name, or an annotation
whose ``category_id`` is not among the categories stops the run with one line naming the file.

Masks. Every ``segmentation`` is decoded by pycocotools exactly as ``COCO.annToMask`` does: polygons (all parts of
an annotation merged), uncompressed RLE (``counts`` a list; crowd regions) and compressed RLE (``counts`` a string).
Polygon parts with fewer than 3 vertices enclose no pixel and are dropped (pycocotools reads a 4-number part as a
box); an odd number of coordinates or an RLE whose size is not the image's is an error. Overlaps: crowd regions are
painted first, then the other instances by decreasing ``area`` (the annotation's field; the mask's pixel count when
the field is missing), ties in file order, each painting over what lies below; so a smaller object lying on a larger
one stays visible and a crowd region only keeps the pixels no single instance claims. Crowd regions are labelled
with their class, like instances.

Ids are file-name stems (``COCO_train2014_000000000009``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

import dataset_root
from data.classes import COCO_CLASSES, read_class_names
from sp_cam.io import atomic_write_json, atomic_write_text, write_label_png

log = logging.getLogger(__name__)
LIST_DIR = Path("ImageSets") / "Segmentation"
SUBSET_SIZE = 1000
SUBSET_SEED = 0
MIN_POLYGON_COORDS = 6  # three (x, y) vertices


def category_to_class(categories: Any, class_names: Sequence[str], source: str) -> dict[int, int]:
    """Map each category id of an annotation file to its index in ``class_names`` (background = 0), by name."""
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{source}: 'categories' must be a non-empty list of {{'id', 'name'}}")
    index = {name: i for i, name in enumerate(class_names)}
    mapping: dict[int, int] = {}
    names_seen: dict[str, int] = {}
    for cat in categories:
        try:
            cid, name = int(cat["id"]), str(cat["name"]).strip()
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{source}: category {cat!r} has no integer 'id' and 'name'") from None
        if cid in mapping:
            raise ValueError(f"{source}: duplicate category id {cid} ({name!r})")
        if name in names_seen:
            raise ValueError(f"{source}: duplicate category name {name!r} (ids {names_seen[name]} and {cid})")
        if name not in index:
            raise ValueError(
                f"{source}: category {cid} {name!r} is not in the class list ({len(class_names) - 1} classes: "
                f"{', '.join(class_names[1:4])}, ...); pass --labels with a labels.txt that names it"
            )
        if index[name] == 0:
            raise ValueError(f"{source}: category {cid} is named {name!r}, the background class of the class list")
        mapping[cid] = index[name]
        names_seen[name] = cid
    return mapping


def _polygon_rle(parts: list[Any], h: int, w: int) -> dict[str, Any]:
    kept = []
    for part in parts:
        if not isinstance(part, list) or not all(isinstance(v, (int, float)) for v in part):
            raise ValueError("a polygon must be a list of numbers [x1, y1, x2, y2, ...]")
        if len(part) % 2:
            raise ValueError(f"a polygon has an odd number of coordinates ({len(part)})")
        if len(part) >= MIN_POLYGON_COORDS:
            kept.append([float(v) for v in part])
    if not kept:
        return mask_utils.encode(np.zeros((h, w), dtype=np.uint8, order="F"))
    return mask_utils.merge(mask_utils.frPyObjects(kept, h, w))


def annotation_rle(segmentation: Any, h: int, w: int) -> dict[str, Any]:
    """pycocotools RLE of one ``segmentation`` (polygon list, uncompressed RLE or compressed RLE), as annToRLE."""
    if isinstance(segmentation, list):
        return _polygon_rle(segmentation, h, w)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not (isinstance(size, list) and len(size) == 2) or (int(size[0]), int(size[1])) != (h, w):
            raise ValueError(f"RLE size {size} differs from the image size {[h, w]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != h * w:
                raise ValueError(f"RLE counts sum to {sum(int(c) for c in counts)}, expected {h * w}")
            return mask_utils.frPyObjects(segmentation, h, w)
        if isinstance(counts, (str, bytes)):
            return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
        raise ValueError(f"RLE counts of type {type(counts).__name__}, expected a list or a string")
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def annotation_mask(segmentation: Any, h: int, w: int) -> np.ndarray:
    """(H, W) bool mask of one ``segmentation``; equal to pycocotools' ``COCO.annToMask``."""
    m = mask_utils.decode(annotation_rle(segmentation, h, w))
    if m.shape != (h, w):
        raise ValueError(f"decoded mask of size {m.shape}, expected {(h, w)}")
    return m.astype(bool)


def semantic_mask(anns: list[dict[str, Any]], h: int, w: int, cat_to_class: dict[int, int], source: str) -> np.ndarray:
    """(H, W) uint8 class map of one image's annotations (crowd first, then by decreasing area, later on top)."""
    decoded = []
    for pos, ann in enumerate(anns):
        try:
            m = annotation_mask(ann["segmentation"], h, w)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{source}: annotation {ann.get('id')}: {e}") from None
        area = float(ann["area"]) if "area" in ann else float(m.sum())
        decoded.append((not ann.get("iscrowd", 0), -area, pos, m, cat_to_class[int(ann["category_id"])]))
    out = np.zeros((h, w), dtype=np.uint8)
    for *_, m, cls in sorted(decoded, key=lambda d: d[:3]):
        out[m] = cls
    return out


def load_instances(
    path: Path, class_names: Sequence[str]
) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]], dict[int, int]]:
    """Images by id, their annotations, and the category-id -> class map of the file's ``categories``."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a COCO instances file (a JSON object with images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            raise ValueError(f"{path}: not a COCO instances file (missing '{key}')")
    cat_to_class = category_to_class(raw["categories"], class_names, str(path))
    try:
        images: dict[int, dict[str, Any]] = {}
        for im in raw["images"]:
            if int(im["id"]) in images:
                raise ValueError(f"{path}: duplicate image id {im['id']}")
            images[int(im["id"])] = im
        anns: dict[int, list[dict[str, Any]]] = {}
        for ann in raw["annotations"]:
            if int(ann["category_id"]) not in cat_to_class:
                raise ValueError(
                    f"{path}: annotation {ann.get('id')}: category id {ann['category_id']} is not in 'categories'"
                )
            if int(ann["image_id"]) not in images:
                raise ValueError(f"{path}: annotation {ann.get('id')}: unknown image id {ann['image_id']}")
            anns.setdefault(int(ann["image_id"]), []).append(ann)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO instances file (missing {e})") from None
    return images, anns, cat_to_class


def prepare_split(
    coco: Path, split: str, cls_labels: dict[str, list[int]], class_names: Sequence[str]
) -> tuple[int, int]:
    """Masks and list of one split; adds its image labels to ``cls_labels``. Returns (listed, masks written)."""
    src = coco / "annotations" / f"instances_{split}2014.json"
    images, anns, cat_to_class = load_instances(src, class_names)
    ids, written = [], 0
    for image_id, im_anns in tqdm(sorted(anns.items()), desc=f"{split}2014 masks", disable=len(anns) < 200):
        im = images[image_id]
        name = Path(im["file_name"]).stem
        ids.append(name)
        cls_labels[name] = sorted({cat_to_class[int(a["category_id"])] for a in im_anns})
        out = coco / "SegmentationClass" / f"{name}.png"
        if out.is_file():
            continue
        write_label_png(out, semantic_mask(im_anns, int(im["height"]), int(im["width"]), cat_to_class, str(src)))
        written += 1
    ids.sort()
    atomic_write_text(coco / LIST_DIR / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    if len(ids) > SUBSET_SIZE:  # ref: model selection on a 1,000-image subset (train_1000, val_1000)
        subset = sorted(np.random.default_rng(SUBSET_SEED).choice(ids, SUBSET_SIZE, replace=False).tolist())
        atomic_write_text(coco / LIST_DIR / f"{split}_{SUBSET_SIZE}.txt", "".join(f"{i}\n" for i in subset))
    return len(ids), written


def prepare(coco: Path, splits: list[str], class_names: Sequence[str] = COCO_CLASSES) -> dict[str, int]:
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
        counts[split], counts[f"{split}_masks_written"] = prepare_split(coco, split, cls_labels, class_names)
    atomic_write_json(labels_path, dict(sorted(cls_labels.items())))
    atomic_write_text(coco / "labels.txt", "".join(f"{n}\n" for n in class_names))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", type=str, default="", help="COCO 2014 folder (default: dataset_root.coco14_root())")
    parser.add_argument("--splits", type=str, nargs="+", choices=("train", "val"), default=["train", "val"])
    parser.add_argument(
        "--labels", type=str, default="", help="labels.txt naming the classes, background first (default: COCO-80)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        class_names: tuple[str, ...] = COCO_CLASSES
        if args.labels:
            if not Path(args.labels).is_file():
                raise FileNotFoundError(f"class list not found: {args.labels}")
            class_names = read_class_names(args.labels)
        if len(class_names) > 255:
            raise ValueError(f"{args.labels}: {len(class_names)} classes; a label PNG holds at most 255 (0..254)")
        coco = Path(args.coco) if args.coco else dataset_root.coco14_root()
        counts = prepare(coco, args.splits, class_names)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
