"""mIoU of a folder of predicted label PNGs against a folder of GT label PNGs.

    python tools/eval_miou.py --pred DIR --gt DIR [--list FILE] [--num-classes N] [--class-names FILE] [--json OUT]

Prints the per-class IoU table, the mIoU over all classes (background included, as the reference) and the
foreground-only mean, in percent with 2 decimals. GT 255 is ignored; palette and grey PNGs are read as class indices.
Without ``--list`` every ``<id>.png`` of ``--gt`` is evaluated. The number of classes is ``--num-classes``, else the
length of ``--class-names``, else 21 (VOC).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.classes import IGNORE_INDEX, VOC_CLASSES, read_class_names  # noqa: E402
from sp_cam.io import atomic_write_json, read_label_png  # noqa: E402
from sp_cam.metrics import IoUResult, confusion_matrix, iou_from_confusion  # noqa: E402

MAX_LISTED_MISSING = 5  # ids named in the missing-prediction error


def read_ids(list_file: Path | None, gt_dir: Path) -> list[str]:
    if list_file is None:
        ids = sorted(p.stem for p in gt_dir.glob("*.png"))
        if not ids:
            raise FileNotFoundError(f"no GT PNGs in {gt_dir}")
        return ids
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{list_file}: the list is empty")
    return ids


def evaluate_folders(
    pred_dir: Path, gt_dir: Path, ids: Sequence[str], num_classes: int, skip_pred_ignore: bool = False
) -> IoUResult:
    """Accumulate one confusion matrix over ``ids`` and turn it into IoUs.

    Args:
        num_classes: N, including background.
        skip_pred_ignore: pixels predicted 255 (an ignore band) are left out instead of being an error.
    """
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"GT folder not found: {gt_dir}")
    missing = [i for i in ids if not (pred_dir / f"{i}.png").is_file()]
    if missing:
        first = ", ".join(missing[:MAX_LISTED_MISSING])
        raise FileNotFoundError(f"{len(missing)} of {len(ids)} predictions missing in {pred_dir} (first: {first})")
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image_id in tqdm(ids, desc="mIoU", disable=len(ids) < 500):
        pred_path, gt_path = pred_dir / f"{image_id}.png", gt_dir / f"{image_id}.png"
        pred, gt = read_label_png(pred_path), read_label_png(gt_path)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_path}: size {pred.shape} does not match the GT {gt_path} size {gt.shape}")
        if skip_pred_ignore:
            gt = np.where(pred == IGNORE_INDEX, IGNORE_INDEX, gt).astype(np.uint8)
        valid = gt != IGNORE_INDEX
        if valid.any() and int(pred[valid].max()) >= num_classes:
            raise ValueError(f"{pred_path}: value {int(pred[valid].max())} out of range 0..{num_classes - 1}")
        bad = valid & (gt >= num_classes)
        if bad.any():
            raise ValueError(f"{gt_path}: value {int(gt[bad].max())} out of range 0..{num_classes - 1} or 255")
        conf += confusion_matrix(pred, gt, num_classes)
    return iou_from_confusion(conf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", type=str, required=True, help="folder of predicted <id>.png")
    parser.add_argument("--gt", type=str, required=True, help="folder of GT <id>.png (255 = ignore)")
    parser.add_argument("--list", type=str, default="", help="ids to evaluate, one per line (default: all GT PNGs)")
    parser.add_argument("--num-classes", type=int, default=0, help="classes including background")
    parser.add_argument("--class-names", type=str, default="", help="labels.txt, background first")
    parser.add_argument("--json", type=str, default="", help="also write the result as JSON here")
    parser.add_argument(
        "--pred-ignore", type=str, choices=("error", "skip"), default="error", help="what a predicted 255 means"
    )
    args = parser.parse_args(argv)
    try:
        names: tuple[str, ...] | None = None
        if args.class_names:
            if not Path(args.class_names).is_file():
                raise FileNotFoundError(f"class-name file not found: {args.class_names}")
            names = read_class_names(args.class_names)
        num_classes = args.num_classes or (len(names) if names else len(VOC_CLASSES))
        if names is None:
            names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else tuple(str(i) for i in range(num_classes))
        if len(names) != num_classes:
            raise ValueError(f"--num-classes {num_classes} does not match the {len(names)} names of {args.class_names}")
        if num_classes < 2:
            raise ValueError(f"--num-classes must be at least 2 (background + one class), got {num_classes}")
        gt_dir = Path(args.gt)
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"GT folder not found: {gt_dir}")
        ids = read_ids(Path(args.list) if args.list else None, gt_dir)
        result = evaluate_folders(Path(args.pred), gt_dir, ids, num_classes, args.pred_ignore == "skip")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.table(names))
    print(f"images: {len(ids)}")
    if args.json:
        atomic_write_json(
            args.json,
            {
                "miou": round(result.miou, 4),
                "fg_miou": round(result.fg_miou, 4),
                "iou": {n: round(100 * float(v), 4) for n, v in zip(names, result.iou, strict=True)},
                "num_images": len(ids),
                "pred": str(args.pred),
                "gt": str(args.gt),
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
