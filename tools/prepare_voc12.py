"""Prepare PASCAL VOC 2012 + SBD for training: ``train_aug.txt``, ``cls_labels.json``, optionally SegmentationClassAug.

    python -m tools.prepare_voc12 --sbd SBD_DATASET_DIR [--voc VOC2012_DIR] [--aug-masks write]

``--voc`` is the VOC2012 folder (``JPEGImages/``, ``Annotations/``, ``SegmentationClass/``, ``ImageSets/Segmentation/``;
default from ``dataset_root.py``). ``--sbd`` is SBD's ``benchmark_RELEASE/dataset`` folder (``train.txt``, ``val.txt``,
``cls/<id>.mat``). Written into the VOC folder (nothing is copied from elsewhere; finished files are kept):

* ``ImageSets/Segmentation/train_aug.txt`` = (SBD train + SBD val + VOC train) - VOC val, sorted (10,582 ids);
* ``cls_labels.json`` for train_aug + train + val, from ``Annotations/<id>.xml``;
* ``labels.txt`` (the 21 VOC names) if absent;
* with ``--aug-masks write`` (needs scipy): ``SegmentationClassAug/<id>.png`` for every train_aug and val id, from the
  VOC PNG where one exists (with its 255 borders), else from the SBD ``.mat``.
"""

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dataset_root
from data.classes import VOC_CLASSES, read_class_names
from data.ids import read_id_list
from data.label_png import read_label_png
from sp_cam.io import atomic_write_json, atomic_write_text, write_label_png
from tools.make_cls_labels import build_from_xml

log = logging.getLogger(__name__)
VOC_LIST_DIR = Path("ImageSets") / "Segmentation"


def read_id_lists(paths: list[Path]) -> list[str]:
    """Union of the ids of several list files, first-seen order; every id is checked as a file name
    (:func:`data.ids.check_id`: the paths below are built from ids), naming the file and line of a bad one."""
    seen: dict[str, None] = {}
    for p in paths:
        seen.update(dict.fromkeys(read_id_list(p, unique=False)))
    return list(seen)


def train_aug_ids(voc: Path, sbd: Path) -> list[str]:
    """(SBD train + SBD val + VOC train) - VOC val, sorted."""
    sbd_ids = read_id_lists([sbd / "train.txt", sbd / "val.txt"])
    voc_train = read_id_lists([voc / VOC_LIST_DIR / "train.txt"])
    voc_val = set(read_id_lists([voc / VOC_LIST_DIR / "val.txt"]))
    return sorted((set(sbd_ids) | set(voc_train)) - voc_val)


def read_sbd_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices from an SBD ``cls/<id>.mat`` (``GTcls.Segmentation``)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError("--aug-masks write needs scipy (pip install scipy)") from None
    if not path.is_file():
        raise FileNotFoundError(f"SBD mask not found: {path}")
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not an SBD class mask with GTcls.Segmentation ({e})") from None
    if seg.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D segmentation, got shape {seg.shape}")
    return seg.astype(np.uint8)


def write_aug_masks(voc: Path, sbd: Path, ids: list[str]) -> int:
    """Write missing ``SegmentationClassAug/<id>.png``; returns how many were written."""
    out_dir = voc / "SegmentationClassAug"
    written = 0
    for image_id in tqdm(ids, desc="SegmentationClassAug", disable=len(ids) < 200):
        out = out_dir / f"{image_id}.png"
        if out.is_file():
            continue
        voc_png = voc / "SegmentationClass" / f"{image_id}.png"
        mask = read_label_png(voc_png) if voc_png.is_file() else read_sbd_mask(sbd / "cls" / f"{image_id}.mat")
        write_label_png(out, mask)
        written += 1
    return written


def prepare(voc: Path, sbd: Path, aug_masks: bool) -> dict[str, int]:
    if not voc.is_dir():
        raise FileNotFoundError(f"VOC2012 folder not found: {voc}")
    if not sbd.is_dir():
        raise FileNotFoundError(f"SBD dataset folder not found: {sbd}")
    ids = train_aug_ids(voc, sbd)
    for image_id in ids:
        if not (voc / "JPEGImages" / f"{image_id}.jpg").is_file():
            raise FileNotFoundError(f"image not found: {voc / 'JPEGImages' / f'{image_id}.jpg'} (train_aug id)")
    atomic_write_text(voc / VOC_LIST_DIR / "train_aug.txt", "".join(f"{i}\n" for i in ids))
    if not (voc / "labels.txt").is_file():
        atomic_write_text(voc / "labels.txt", "".join(f"{n}\n" for n in VOC_CLASSES))
    names = read_class_names(voc / "labels.txt")
    all_ids = read_id_lists([voc / VOC_LIST_DIR / f"{s}.txt" for s in ("train_aug", "train", "val")])
    atomic_write_json(voc / "cls_labels.json", build_from_xml(voc / "Annotations", names, all_ids))
    written = 0
    if aug_masks:
        val = read_id_lists([voc / VOC_LIST_DIR / "val.txt"])
        written = write_aug_masks(voc, sbd, ids + [i for i in val if i not in set(ids)])
    return {"train_aug": len(ids), "cls_labels": len(all_ids), "aug_masks_written": written}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc", type=str, default="", help="VOC2012 folder (default: dataset_root.voc12_root())")
    parser.add_argument("--sbd", type=str, required=True, help="SBD benchmark_RELEASE/dataset folder")
    parser.add_argument("--aug-masks", type=str, choices=("skip", "write"), default="skip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        voc = Path(args.voc) if args.voc else dataset_root.voc12_root()
        counts = prepare(voc, Path(args.sbd), args.aug_masks == "write")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
