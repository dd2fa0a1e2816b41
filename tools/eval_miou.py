"""mIoU and per-class scores of a folder of predicted label PNGs against a folder of GT label PNGs.

    python -m tools.eval_miou --pred DIR --gt DIR [--list FILE] [--num-classes N] [--class-names FILE]
        [--absent present|zero] [--pred-ignore error|background|skip] [--json OUT]

Prints, per class, IoU, FP rate, FN rate, precision, recall and GT pixel count (absent classes marked), then the mIoU
with the classes it averages over, the foreground-only mean, the foreground FP/FN means, pixel accuracy, mean accuracy
and frequency-weighted IoU, all in percent with 2 decimals. The definitions are those of ``sp_cam/metrics.py``:
IoU = TP / (TP + FP + FN), FP rate = FP / (TP + FP + FN), FN rate = FN / (TP + FP + FN) (IRN's and PuzzleCAM's
over- and under-activation).

Inputs: PNGs of class indices, 8-bit palette (P) or 8-bit grey (L). RGB, 16-bit or otherwise non-8-bit PNGs, a size
mismatch, a missing prediction or a value outside 0..N-1 (or 255) stop the run with one line naming the file. GT 255
is not scored. Without ``--list`` every ``<id>.png`` of ``--gt`` is evaluated; ``--list`` takes plain ids (one per
line, the first word) or the lines ``/JPEGImages/<id>.jpg /SegmentationClassPseudo/<id>.png`` that
``tools/deeplab_handoff.py`` writes. The number of classes is ``--num-classes``, else the length of
``--class-names`` (a ``labels.txt`` in either format of ``data.classes.read_class_names``), else 21 (VOC).

--absent: how a class with no GT pixel and no predicted pixel enters the means.
  present (default)  left out: the mean is over the classes present in GT or prediction. IRN (nanmean),
                     deeplab-pytorch and mmsegmentation do this; GT scored against itself gives 100.00 on any subset.
  zero               counted as IoU 0 over all N classes: the published SP-CAM/PuzzleCAM code does this. A subset
                     without some classes then scores low even for a perfect prediction; on full VOC train (every
                     class present) both agree.

--pred-ignore: what a predicted 255 (an ignore band in pseudo labels) means, on pixels whose GT is scored.
  error (default)    refused: a prediction should hold class indices only.
  background         read as class 0, IRN's convention (step/eval_sem_seg.py sets 255 to 0 before scoring), so the
                     band counts against the score where the GT is an object.
  skip               those pixels are left out of the score, like GT 255. This scores only the confident part of the
                     labels and inflates the number; a warning gives the share of pixels left out.
  (PuzzleCAM's and mmsegmentation's calculators count such a pixel in no class's prediction: a miss for its GT class
  but nobody's false positive. That convention is not offered here.)
  In this project a predicted 255 comes only from stage 3 with ``pseudo.ignore_band`` > 0 (the stage's own sweep
  scores the labels without the band). deeplab-pytorch leaves those pixels out of its training loss
  (DATASET.IGNORE_LABEL 255), which ``skip`` mirrors; to compare with IRN-style published numbers use ``background``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.classes import IGNORE_INDEX, VOC_CLASSES, read_class_names
from data.label_png import read_label_png
from sp_cam.io import atomic_write_json
from sp_cam.metrics import ABSENT_CONVENTIONS, IoUResult, confusion_matrix, iou_from_confusion

MAX_LISTED_MISSING = 5  # ids named in the missing-prediction error
PRED_IGNORE_MODES = ("error", "background", "skip")  # see the module docstring
BACKGROUND = 0


@dataclass
class Evaluation:
    result: IoUResult
    num_images: int
    pred_ignore_pixels: int  # scored-GT pixels predicted 255 (turned into background or left out)
    scored_pixels: int  # pixels in the confusion matrix


def _list_id(line: str) -> str:
    """The id of a list line: a plain id (its first word) or a ``/JPEGImages/<id>.jpg <label path>`` line."""
    first = line.split()[0]
    if first.startswith("/"):
        name = first.rsplit("/", 1)[-1]
        return name.rsplit(".", 1)[0] if "." in name else name
    return first


def read_ids(list_file: Path | None, gt_dir: Path) -> list[str]:
    if list_file is None:
        ids = sorted(p.stem for p in gt_dir.glob("*.png"))
        if not ids:
            raise FileNotFoundError(f"no GT PNGs in {gt_dir}")
        return ids
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    ids = []
    for no, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        image_id = _list_id(line)
        if not image_id:
            raise ValueError(f"{list_file}:{no}: no id in {line.strip()!r}")
        ids.append(image_id)
    if not ids:
        raise ValueError(f"{list_file}: the list is empty")
    return ids


def evaluate_folders(
    pred_dir: Path,
    gt_dir: Path,
    ids: Sequence[str],
    num_classes: int,
    pred_ignore: str = "error",
    absent: str = "present",
) -> Evaluation:
    """Accumulate one confusion matrix over ``ids`` and score it.

    Args:
        num_classes: N, including background.
        pred_ignore: one of ``PRED_IGNORE_MODES`` (module docstring).
        absent: one of ``sp_cam.metrics.ABSENT_CONVENTIONS``.
    """
    if pred_ignore not in PRED_IGNORE_MODES:
        raise ValueError(f"--pred-ignore {pred_ignore!r}: expected one of {', '.join(PRED_IGNORE_MODES)}")
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"GT folder not found: {gt_dir}")
    missing = [i for i in ids if not (pred_dir / f"{i}.png").is_file()]
    if missing:
        first = ", ".join(missing[:MAX_LISTED_MISSING])
        raise FileNotFoundError(f"{len(missing)} of {len(ids)} predictions missing in {pred_dir} (first: {first})")
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    ignored = 0
    for image_id in tqdm(ids, desc="mIoU", disable=len(ids) < 500):
        pred_path, gt_path = pred_dir / f"{image_id}.png", gt_dir / f"{image_id}.png"
        pred, gt = read_label_png(pred_path), read_label_png(gt_path)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_path}: size {pred.shape} does not match the GT {gt_path} size {gt.shape}")
        bad = (gt != IGNORE_INDEX) & (gt >= num_classes)
        if bad.any():
            raise ValueError(f"{gt_path}: value {int(gt[bad].max())} out of range 0..{num_classes - 1} or 255")
        valid = gt != IGNORE_INDEX
        band = valid & (pred == IGNORE_INDEX)
        if band.any():
            if pred_ignore == "error":
                raise ValueError(
                    f"{pred_path}: {int(band.sum())} pixels predicted {IGNORE_INDEX} (ignore); a prediction holds "
                    f"class indices 0..{num_classes - 1} (see --pred-ignore background|skip)"
                )
            ignored += int(band.sum())
            if pred_ignore == "background":
                pred = np.where(band, BACKGROUND, pred).astype(np.uint8)
            else:
                gt = np.where(band, IGNORE_INDEX, gt).astype(np.uint8)
                valid = valid & ~band
        if valid.any() and int(pred[valid].max()) >= num_classes:
            raise ValueError(f"{pred_path}: value {int(pred[valid].max())} out of range 0..{num_classes - 1}")
        conf += confusion_matrix(pred, gt, num_classes)
    return Evaluation(iou_from_confusion(conf, absent=absent), len(ids), ignored, int(conf.sum()))


def class_names_for(num_classes: int, names_file: str) -> tuple[str, ...]:
    names: tuple[str, ...] | None = None
    if names_file:
        if not Path(names_file).is_file():
            raise FileNotFoundError(f"class-name file not found: {names_file}")
        names = read_class_names(names_file)
    n = num_classes or (len(names) if names else len(VOC_CLASSES))
    if names is None:
        names = VOC_CLASSES if n == len(VOC_CLASSES) else tuple(str(i) for i in range(n))
    if len(names) != n:
        raise ValueError(f"--num-classes {n} does not match the {len(names)} names of {names_file}")
    if n < 2:
        raise ValueError(f"--num-classes must be at least 2 (background + one class), got {n}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=str, required=True, help="folder of predicted <id>.png")
    parser.add_argument("--gt", type=str, required=True, help="folder of GT <id>.png (255 = not scored)")
    parser.add_argument(
        "--list", type=str, default="", help="ids to evaluate: plain ids or hand-off list lines (default: all GT PNGs)"
    )
    parser.add_argument("--num-classes", type=int, default=0, help="classes including background")
    parser.add_argument("--class-names", type=str, default="", help="labels.txt, background first")
    parser.add_argument("--json", type=str, default="", help="also write every score and the confusion matrix here")
    parser.add_argument(
        "--absent",
        type=str,
        choices=ABSENT_CONVENTIONS,
        default="present",
        help="a class with no GT and no predicted pixel: present = left out of the mean (IRN, deeplab-pytorch, "
        "mmsegmentation; default), zero = counted as IoU 0 (the published PuzzleCAM-based code)",
    )
    parser.add_argument(
        "--pred-ignore",
        type=str,
        choices=PRED_IGNORE_MODES,
        default="error",
        help="a predicted 255: error = refused (default), background = class 0 (IRN), skip = pixel left out of the "
        "score (inflates it; warned)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names = class_names_for(args.num_classes, args.class_names)
        gt_dir = Path(args.gt)
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"GT folder not found: {gt_dir}")
        ids = read_ids(Path(args.list) if args.list else None, gt_dir)
        ev = evaluate_folders(Path(args.pred), gt_dir, ids, len(names), args.pred_ignore, args.absent)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.pred_ignore == "skip" and ev.pred_ignore_pixels:
        total = ev.scored_pixels + ev.pred_ignore_pixels
        print(
            f"warning: --pred-ignore skip left out {ev.pred_ignore_pixels} of {total} scored pixels "
            f"({100 * ev.pred_ignore_pixels / total:.2f} %) predicted {IGNORE_INDEX}: the scores cover only the rest "
            "and are higher than those of a labelling of every pixel (IRN's convention: --pred-ignore background)",
            file=sys.stderr,
        )
    print(ev.result.table(names))
    print(f"images: {ev.num_images}")
    if args.json:
        record = ev.result.as_dict(names)
        record.update(
            pred_ignore=args.pred_ignore,
            pred_ignore_pixels=ev.pred_ignore_pixels,
            scored_pixels=ev.scored_pixels,
            ignore_index=IGNORE_INDEX,
            num_images=ev.num_images,
            pred=str(args.pred),
            gt=str(args.gt),
            list=str(args.list) if args.list else None,
        )
        atomic_write_json(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
