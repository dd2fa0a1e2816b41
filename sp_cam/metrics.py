"""Confusion-matrix segmentation metrics: the one implementation every stage's evaluation uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.classes import IGNORE_INDEX


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


@dataclass
class IoUResult:
    iou: np.ndarray  # (N,) per-class IoU in [0, 1]
    miou: float  # percent, mean over all classes, background included (as the reference)
    fg_miou: float  # percent, mean over the foreground classes

    def table(self, class_names: tuple[str, ...] | list[str] | None = None) -> str:
        """Per-class IoU table in percent, then the two means."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.iou))]
        width = max(len(n) for n in names + ["mIoU (fg only)"])
        lines = [f"{n:<{width}}  {100 * v:6.2f}" for n, v in zip(names, self.iou, strict=True)]
        lines.append(f"{'mIoU':<{width}}  {self.miou:6.2f}")
        lines.append(f"{'mIoU (fg only)':<{width}}  {self.fg_miou:6.2f}")
        return "\n".join(lines)


def iou_from_confusion(conf: np.ndarray) -> IoUResult:
    """IoU_c = TP / (GT + Pred - TP); a class absent from both counts as 0, as the reference does."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    iou = tp / (denom + 1e-10)
    return IoUResult(
        iou=iou, miou=float(100 * iou.mean()), fg_miou=float(100 * iou[1:].mean()) if len(iou) > 1 else 0.0
    )
