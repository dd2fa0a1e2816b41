"""Superpixel quality metrics on one image (pure numpy): ASA, boundary recall, undersegmentation error.

Shapes: ``sp`` (H, W) integer superpixel labels (any values); ``gt`` (H, W) integer class or segment labels with
``ignore`` (255) for void pixels. Results are fractions in [0, 1]; the report tool prints percent.

* ASA, achievable segmentation accuracy: ``sum_s max_g |s & g| / N`` over the non-void pixels (the accuracy of the best
  segmentation that assigns one GT label per superpixel).
* UE, undersegmentation error, the "corrected" definition of Neubert and Protzel (2012):
  ``sum_g sum_{s & g != 0} min(|s & g|, |s - g|) / N``, non-void pixels only. It does not count a superpixel's whole
  area against every segment it touches (the Achanta et al. form), only its smaller part inside or outside.
* BR, boundary recall at tolerance r: the fraction of GT boundary pixels with a superpixel boundary pixel within the
  (2r + 1) x (2r + 1) square around them. A pixel is a boundary pixel when one of its 4 neighbours has another label;
  void pixels of the GT first take the label of the nearest non-void pixel, so a void band between two objects
  becomes one boundary through its middle.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

IGNORE = 255
BOUNDARY_RADIUS = 2  # px, the usual tolerance of superpixel benchmarks


def _contingency(sp: np.ndarray, gt: np.ndarray, ignore: int) -> np.ndarray:
    """(n_superpixels, n_gt_labels) pixel counts over the non-void pixels."""
    if sp.shape != gt.shape:
        raise ValueError(f"superpixel map {sp.shape} and GT {gt.shape} differ in size")
    keep = gt != ignore
    _, s = np.unique(sp[keep], return_inverse=True)
    _, g = np.unique(gt[keep], return_inverse=True)
    ns, ng = (int(s.max()) + 1, int(g.max()) + 1) if s.size else (0, 0)
    return np.bincount(s.ravel() * ng + g.ravel(), minlength=ns * ng).reshape(ns, ng)


def achievable_segmentation_accuracy(sp: np.ndarray, gt: np.ndarray, ignore: int = IGNORE) -> float:
    table = _contingency(sp, gt, ignore)
    return float(table.max(1).sum() / table.sum()) if table.size else float("nan")


def undersegmentation_error(sp: np.ndarray, gt: np.ndarray, ignore: int = IGNORE) -> float:
    table = _contingency(sp, gt, ignore)
    if not table.size:
        return float("nan")
    outside = table.sum(1, keepdims=True) - table
    return float(np.minimum(table, outside)[table > 0].sum() / table.sum())


def fill_ignore(gt: np.ndarray, ignore: int = IGNORE) -> np.ndarray:
    """Void pixels take the label of the nearest non-void pixel (unchanged when all or none are void)."""
    void = gt == ignore
    if not void.any() or void.all():
        return gt
    _, (iy, ix) = ndimage.distance_transform_edt(void, return_indices=True)
    return gt[iy, ix]


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels with a 4-neighbour of another label."""
    b = np.zeros(labels.shape, dtype=bool)
    dy = labels[1:] != labels[:-1]
    dx = labels[:, 1:] != labels[:, :-1]
    b[1:] |= dy
    b[:-1] |= dy
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    return b


def boundary_recall(sp: np.ndarray, gt: np.ndarray, radius: int = BOUNDARY_RADIUS, ignore: int = IGNORE) -> float:
    """NaN when the GT has no boundary."""
    if sp.shape != gt.shape:
        raise ValueError(f"superpixel map {sp.shape} and GT {gt.shape} differ in size")
    gt_b = boundary_map(fill_ignore(gt, ignore))
    if not gt_b.any():
        return float("nan")
    near = ndimage.maximum_filter(boundary_map(sp), size=2 * radius + 1, mode="constant", cval=0)
    return float((gt_b & near).sum() / gt_b.sum())


def number_of_superpixels(sp: np.ndarray) -> int:
    return int(np.unique(sp).size)
