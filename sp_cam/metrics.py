"""Confusion-matrix segmentation metrics: the one implementation every stage's evaluation uses.

Shape shorthand: N = number of classes including background (K + 1); rows of a confusion matrix are GT classes,
columns predicted classes; pixels whose GT is the ignore value (255) are never counted.

Per class c, with TP = conf[c, c], FP = column sum - TP (predicted c, GT another class), FN = row sum - TP:

* IoU = TP / (TP + FP + FN);
* FP rate = FP / (TP + FP + FN) and FN rate = FN / (TP + FP + FN): the over- and under-activation that IRN
  (``step/eval_sem_seg.py``, written there as 1 - GT / union and 1 - Pred / union) and PuzzleCAM (``evaluate.py``,
  ``Calculator_For_mIoU``) report; IoU + FP rate + FN rate = 1;
* precision = TP / (TP + FP), recall = TP / (TP + FN).

A class is *absent* when its union TP + FP + FN is 0: no GT pixel and no predicted pixel (on the scored pixels). Two
conventions for the means (``ABSENT_CONVENTIONS``):

* ``"present"`` (default): absent classes are left out of every mean, as IRN (``np.nanmean``), deeplab-pytorch
  (``libs/utils/metric.py``) and mmsegmentation (``IoUMetric``) do. GT scored against itself gives 100 on any subset;
* ``"zero"``: absent classes count as IoU 0 (and FP = FN = 0), as the published code (PuzzleCAM's calculator, a 1e-10
  in the denominator) does. On a subset where classes are missing this gives a low number for a perfect prediction;
  on full VOC ``train`` (every class present) both conventions agree.

Pixel accuracy = trace / total; mean accuracy = mean recall over the classes with GT pixels; frequency-weighted IoU =
sum over classes of (GT pixels / total) * IoU. These three do not depend on the convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.classes import IGNORE_INDEX

ABSENT_CONVENTIONS = ("present", "zero")  # see the module docstring


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Count (gt, pred) pairs over the pixels whose GT is not ``ignore_index``.

    Args:
        pred: (...) integer class map (numpy or torch), values in 0..num_classes-1.
        gt: (...) integer class map of the same shape.
    Returns:
        (num_classes, num_classes) int64, rows = GT class, columns = predicted class.
    """
    pred_t = torch.as_tensor(pred).reshape(-1).long()
    gt_t = torch.as_tensor(gt).reshape(-1).long()
    if pred_t.shape != gt_t.shape:
        raise ValueError(f"prediction and GT differ in size: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    keep = gt_t != ignore_index
    pred_t, gt_t = pred_t[keep], gt_t[keep]
    if pred_t.numel() and (int(pred_t.min()) < 0 or int(pred_t.max()) >= num_classes):
        raise ValueError(f"prediction value out of range 0..{num_classes - 1}: found {int(pred_t.max())}")
    if gt_t.numel() and int(gt_t.max()) >= num_classes:
        raise ValueError(f"GT value out of range 0..{num_classes - 1} (or {ignore_index}): found {int(gt_t.max())}")
    counts = torch.bincount(gt_t * num_classes + pred_t, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _pct_mean(values: np.ndarray) -> float:
    """100 * mean of the non-NaN values; NaN when there are none."""
    values = values[~np.isnan(values)]
    return float(100 * values.mean()) if values.size else float("nan")


def _json_float(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


@dataclass
class IoUResult:
    """Scores of one confusion matrix. Arrays are (N,) fractions in [0, 1]; scalar means are percent.

    Undefined per-class values are NaN: IoU, FP and FN of an absent class under ``"present"`` (0 under ``"zero"``),
    precision of a class never predicted, recall of a class without GT pixels.
    """

    iou: np.ndarray  # (N,) float64
    miou: float  # percent, over the classes the convention keeps (background included)
    fg_miou: float  # percent, the same over the foreground classes 1..N-1
    convention: str  # one of ABSENT_CONVENTIONS
    absent: np.ndarray  # (N,) bool, no GT and no predicted pixel
    fp: np.ndarray  # (N,) float64, FP / (TP + FP + FN)
    fn: np.ndarray  # (N,) float64, FN / (TP + FP + FN)
    precision: np.ndarray  # (N,) float64, TP / (TP + FP)
    recall: np.ndarray  # (N,) float64, TP / (TP + FN)
    gt_pixels: np.ndarray  # (N,) int64, scored GT pixels of each class
    pred_pixels: np.ndarray  # (N,) int64, scored pixels predicted as each class
    fg_fp: float  # percent, mean FP rate over the foreground classes the convention keeps
    fg_fn: float  # percent, mean FN rate over the same classes
    pixel_acc: float  # percent
    mean_acc: float  # percent, mean recall over the classes with GT pixels
    fw_iou: float  # percent
    conf: np.ndarray  # (N, N) int64, rows = GT, columns = prediction

    @property
    def num_classes(self) -> int:
        return len(self.iou)

    @property
    def num_scored(self) -> int:
        """How many classes the mIoU averages over."""
        return self.num_classes if self.convention == "zero" else int((~self.absent).sum())

    def miou_scope(self) -> str:
        """One line saying which classes the mIoU averages over."""
        n_absent = int(self.absent.sum())
        if self.convention == "zero":
            return f"over all {self.num_classes} classes, absent ones counted as 0 ({n_absent} absent)"
        return f"over the {self.num_scored} classes present in GT or prediction ({n_absent} absent ones left out)"

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """Per-class table in percent (IoU, FP, FN, precision, recall, GT pixels, absent mark), then the means."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        summary = ("mIoU", "mIoU (fg only)", "FP (fg mean)", "FN (fg mean)", "pixel acc", "mean acc", "fwIoU")
        width = max(len(n) for n in [*names, *summary, "class"])

        def pct(v: float) -> str:
            return f"{100 * v:7.2f}" if np.isfinite(v) else f"{'-':>7}"

        lines = [f"{'class':<{width}}  {'IoU':>7} {'FP':>7} {'FN':>7} {'prec':>7} {'recall':>7} {'GT pixels':>11}"]
        for c, name in enumerate(names):
            cells = " ".join(pct(a[c]) for a in (self.iou, self.fp, self.fn, self.precision, self.recall))
            mark = ""
            if self.absent[c]:
                mark = "  absent (counted as 0)" if self.convention == "zero" else "  absent (left out)"
            lines.append(f"{name:<{width}}  {cells} {int(self.gt_pixels[c]):>11d}{mark}")

        def row(label: str, value: float, note: str = "") -> str:
            text = f"{value:7.2f}" if np.isfinite(value) else f"{'-':>7}"
            return f"{label:<{width}}  {text}" + (f"  {note}" if note else "")

        n_gt = int((self.gt_pixels > 0).sum())
        lines += [
            row("mIoU", self.miou, self.miou_scope()),
            row("mIoU (fg only)", self.fg_miou),
            row("FP (fg mean)", self.fg_fp, "false positives / (TP + FP + FN): over-activation"),
            row("FN (fg mean)", self.fg_fn, "false negatives / (TP + FP + FN): under-activation"),
            row("pixel acc", self.pixel_acc),
            row("mean acc", self.mean_acc, f"over the {n_gt} classes with GT pixels"),
            row("fwIoU", self.fw_iou),
        ]
        return "\n".join(lines)

    def as_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready dict of everything, in percent (NaN written as null), with the confusion matrix."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")

        def pct(v: float) -> float | None:
            return _json_float(100 * float(v))

        classes = [
            {
                "index": c,
                "name": names[c],
                "iou": pct(self.iou[c]),
                "fp": pct(self.fp[c]),
                "fn": pct(self.fn[c]),
                "precision": pct(self.precision[c]),
                "recall": pct(self.recall[c]),
                "gt_pixels": int(self.gt_pixels[c]),
                "pred_pixels": int(self.pred_pixels[c]),
                "tp": int(self.conf[c, c]),
                "absent": bool(self.absent[c]),
            }
            for c in range(self.num_classes)
        ]
        return {
            "absent": self.convention,
            "miou_scope": self.miou_scope(),
            "num_classes": self.num_classes,
            "num_scored": self.num_scored,
            "absent_classes": [names[c] for c in np.flatnonzero(self.absent)],
            "miou": _json_float(self.miou),
            "fg_miou": _json_float(self.fg_miou),
            "fg_fp": _json_float(self.fg_fp),
            "fg_fn": _json_float(self.fg_fn),
            "pixel_acc": _json_float(self.pixel_acc),
            "mean_acc": _json_float(self.mean_acc),
            "fw_iou": _json_float(self.fw_iou),
            "iou": {names[c]: pct(self.iou[c]) for c in range(self.num_classes)},
            "classes": classes,
            "confusion": self.conf.tolist(),
        }


def iou_from_confusion(conf: np.ndarray, absent: str = "present") -> IoUResult:
    """Every score of a summed confusion matrix.

    Args:
        conf: (N, N) counts, rows = GT class, columns = predicted class.
        absent: how a class with no GT and no predicted pixel enters the means, one of ``ABSENT_CONVENTIONS``:
            ``"present"`` leaves it out (IRN, deeplab-pytorch, mmsegmentation), ``"zero"`` counts it as IoU 0
            (the published PuzzleCAM-based code).
    Returns:
        IoUResult; its arrays are (N,).
    """
    if absent not in ABSENT_CONVENTIONS:
        raise ValueError(f"absent={absent!r}: expected one of {', '.join(ABSENT_CONVENTIONS)}")
    counts = np.asarray(conf)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 1:
        raise ValueError(f"confusion matrix must be square (N, N), got shape {counts.shape}")
    if (counts < 0).any():
        raise ValueError("confusion matrix has negative counts")
    counts = counts.astype(np.int64)
    c = counts.astype(np.float64)
    tp = np.diag(c)
    gt_pixels = c.sum(1)
    pred_pixels = c.sum(0)
    union = gt_pixels + pred_pixels - tp
    is_absent = union == 0
    iou = _ratio(tp, union)
    fp = _ratio(pred_pixels - tp, union)
    fn = _ratio(gt_pixels - tp, union)
    if absent == "zero":
        iou, fp, fn = (np.where(is_absent, 0.0, a) for a in (iou, fp, fn))
    precision = _ratio(tp, pred_pixels)
    recall = _ratio(tp, gt_pixels)
    total = c.sum()
    freq = gt_pixels / total if total > 0 else np.zeros_like(gt_pixels)
    has_gt = gt_pixels > 0
    return IoUResult(
        iou=iou,
        miou=_pct_mean(iou),
        fg_miou=_pct_mean(iou[1:]),
        convention=absent,
        absent=is_absent,
        fp=fp,
        fn=fn,
        precision=precision,
        recall=recall,
        gt_pixels=counts.sum(1),
        pred_pixels=counts.sum(0),
        fg_fp=_pct_mean(fp[1:]),
        fg_fn=_pct_mean(fn[1:]),
        pixel_acc=float(100 * tp.sum() / total) if total > 0 else float("nan"),
        mean_acc=_pct_mean(recall[has_gt]),
        fw_iou=float(100 * (freq[has_gt] * iou[has_gt]).sum()) if total > 0 else float("nan"),
        conf=counts,
    )
