"""Stage-1 loss of the superpixel FCN (docs/method.md §2.4, ref ``core/loss.py: QLoss``): reconstruction plus affinity terms.

Shape shorthand: B batch, H x W pixels (multiples of the cell size S), h x w grid cells, K foreground classes.

* L_p, reconstruction (SpixelFCN): pool a pixel feature map with the PSAM, upsample it back, and compare.
  Saliency mode (ref): features = one-hot of the binarised saliency (2 channels) + pixel position;
  ``L_p = recon_weight * (L_sem + L_pos)`` with ``L_sem = -sum_{p,c} l_c(p) log(R_c(p) + 1e-8) / B`` (a sum over pixels,
  as the reference) and ``L_pos = sum_p ||R_xy(p) - xy(p)||_2 / B * pos_weight / S``.
  Labels-only mode (datasets without saliency maps; SpixelFCN's unsupervised setting): the features are CIELAB colour
  (in units of 100, so L is in [0, 1]) + position; ``L_color = color_weight * sum_p ||R_lab(p) - lab(p)||_2 / B``.
* Affinity labels (no gradient): CAMs pooled to cells with the PSAM, thresholded into a label per cell
  (0 = background, 1..K, K + 1 = ignore; docs/decisions.md D11 generalises the reference's 21/22 channels).
* L_press = ``sum_s interior(s) * relu(A(s, s) - relu_t) / B``; L_diff = ``sum_{s,d} diff(s, d) * A(s, s + d) / B``;
  total ``L_p + press_weight * L_press + diff_weight * L_diff`` once the trainer switches the affinity terms on.

Padding (``valid``; an extension, the reference counts padded pixels): padded pixels are left out of the
reconstruction sums, and cells that are mostly padding are ignored by the affinity terms.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from net.imagenet import IMAGENET_MEAN, IMAGENET_STD
from net.psam import CELL_SIZE, NUM_OFFSETS, asam, psam_pool, psam_upsample

LOG_EPS = 1e-8  # ref (SpixelFCN compute_semantic_pos_loss): log(R + 1e-8)
LAB_UNIT = 100.0  # labels-only colour features: CIELAB divided by 100 (L in [0, 1], a and b roughly in [-1, 1])
PADDING_CELL_MIN_VALID = 0.5  # a cell with less than half real pixels is ignored by the affinity terms
MODES = ("saliency", "labels_only")

# sRGB (D65) -> CIE XYZ -> CIELAB constants (IEC 61966-2-1 and CIE 15)
_SRGB_THRESHOLD, _SRGB_SLOPE, _SRGB_A, _SRGB_GAMMA = 0.04045, 12.92, 0.055, 2.4
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_LAB_DELTA = 6.0 / 29.0


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] to CIELAB (D65), differentiable. (B, 3, H, W) -> (B, 3, H, W) with L in [0, 100]."""
    linear = torch.where(rgb > _SRGB_THRESHOLD, ((rgb + _SRGB_A) / (1 + _SRGB_A)) ** _SRGB_GAMMA, rgb / _SRGB_SLOPE)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / white
    f = torch.where(
        xyz > _LAB_DELTA**3, xyz.clamp_min(_LAB_DELTA**3) ** (1 / 3), xyz / (3 * _LAB_DELTA**2) + 4.0 / 29.0
    )
    fx, fy, fz = f[:, 0:1], f[:, 1:2], f[:, 2:3]
    return torch.cat([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def denormalize_rgb(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) back to RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * std + mean).clamp(0, 1)


def pixel_coordinates(b: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) raw pixel coordinates, channel 0 = x (column), channel 1 = y (row), as the reference."""
    ys = torch.arange(h, dtype=like.dtype, device=like.device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.arange(w, dtype=like.dtype, device=like.device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([xs, ys], dim=1)


def affinity_labels(
    cam_sp: torch.Tensor, th_bg: float, th_step: float, th_fg: float, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Superpixel labels from pooled CAMs (docs/method.md §2.4 b).

    Args:
        cam_sp: (B, K, h, w) foreground scores per cell (class c in channel c - 1).
        ignore: optional (B, h, w) bool, cells to ignore regardless of their scores (e.g. padding).
    Returns:
        (B, h, w) int64: 0 background, 1..K class, K + 1 ignore.
    """
    B, K, h, w = cam_sp.shape
    lo = torch.full((B, 1, h, w), th_bg, dtype=cam_sp.dtype, device=cam_sp.device)
    y1 = torch.cat([lo, cam_sp], 1).argmax(1)
    y2 = torch.cat([lo + th_step, cam_sp], 1).argmax(1)
    uncertain = y1 != y2  # the top foreground score lies between th_bg and th_bg + th_step
    if K > 1:
        top2 = cam_sp.topk(2, dim=1).values
        ambiguous = (y1 > 0) & (top2[:, 1] > th_fg * top2[:, 0])
    else:
        ambiguous = torch.zeros_like(uncertain)
    drop = uncertain | ambiguous
    if ignore is not None:
        drop = drop | ignore
    return torch.where(drop, torch.full_like(y1, K + 1), y1)


def affinity_masks(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-label and different-label masks over the 25 ASAM offsets.

    Out-of-grid neighbours count as background and not ignored (as the reference).

    Args:
        labels: (B, h, w) int64 from :func:`affinity_labels`.
    Returns:
        same, diff: (B, 25, h, w) bool; channel j compares cell s with cell ``s + d_j``.
    """
    h, w = labels.shape[-2:]
    padded = F.pad(labels, (2, 2, 2, 2), value=0)
    neigh = torch.stack(
        [padded[:, 2 + j // 5 - 2 : 2 + j // 5 - 2 + h, 2 + j % 5 - 2 : 2 + j % 5 - 2 + w] for j in range(NUM_OFFSETS)],
        dim=1,
    )
    centre = labels.unsqueeze(1)
    known = (centre != ignore_index) & (neigh != ignore_index)
    return known & (neigh == centre), known & (neigh != centre)


class FCNLoss(nn.Module):
    """Stage-1 loss. Every constant is a constructor argument (fields of ``FCNConfig``).

    Args:
        num_classes: K, foreground classes of the dataset.
        cell_size: S.
        mode: ``saliency`` (reconstruct binarised saliency, ref) or ``labels_only`` (reconstruct CIELAB colour).
    """

    def __init__(
        self,
        num_classes: int,
        cell_size: int = CELL_SIZE,
        mode: str = "saliency",
        sal_threshold: float = 0.2,
        pos_weight: float = 0.003,
        color_weight: float = 1.0,
        recon_weight: float = 0.005,
        th_bg: float = 0.05,
        th_step: float = 0.5,
        th_fg: float = 0.05,
        relu_t: float = 0.75,
        interior_min_same: int = 15,
        press_weight: float = 1.0,
        diff_weight: float = 2.0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"stage-1 loss mode must be one of {MODES}, got {mode!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.cell_size = cell_size
        self.mode = mode
        self.sal_threshold = sal_threshold
        self.pos_weight = pos_weight
        self.color_weight = color_weight
        self.recon_weight = recon_weight
        self.th_bg = th_bg
        self.th_step = th_step
        self.th_fg = th_fg
        self.relu_t = relu_t
        self.interior_min_same = interior_min_same
        self.press_weight = press_weight
        self.diff_weight = diff_weight

    def reconstruction(
        self, q: torch.Tensor, image: torch.Tensor, saliency: torch.Tensor | None, valid: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """L_p and its parts. q (B, 9, H, W); image (B, 3, H, W) normalised; saliency (B, 1, H, W) in [0, 1]."""
        B, _, H, W = q.shape
        S = self.cell_size
        xy = pixel_coordinates(B, H, W, q)
        if self.mode == "saliency":
            if saliency is None:
                raise ValueError("stage-1 loss in saliency mode needs saliency maps; use mode labels_only")
            fg = (saliency > self.sal_threshold).to(q.dtype)
            target = torch.cat([1 - fg, fg], 1)
        else:
            with torch.no_grad():
                target = rgb_to_lab(denormalize_rgb(image.to(q.dtype))) / LAB_UNIT
        feats = torch.cat([target, xy], 1)
        recon = psam_upsample(psam_pool(feats, q, S), q, S)
        weight = valid.to(q.dtype) if valid is not None else None
        r_target, r_xy = recon[:, :-2], recon[:, -2:]

        def total(per_pixel: torch.Tensor) -> torch.Tensor:  # (B, 1|C, H, W) -> sum over pixels / B
            return (per_pixel if weight is None else per_pixel * weight).sum() / B

        pos = total(torch.linalg.vector_norm(r_xy - xy, dim=1, keepdim=True)) * self.pos_weight / S
        if self.mode == "saliency":
            first = total(-(target * torch.log(r_target + LOG_EPS)))
            name = "sem"
        else:
            first = total(torch.linalg.vector_norm(r_target - target, dim=1, keepdim=True)) * self.color_weight
            name = "color"
        return {name: first, "pos": pos, "recon": self.recon_weight * (first + pos)}

    def affinity(self, q: torch.Tensor, cams: torch.Tensor, valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """L_press and L_diff. cams: (B, K, H, W) foreground CAMs in [0, 1] (the background channel is not needed)."""
        B = q.shape[0]
        S = self.cell_size
        if cams.shape[1] != self.num_classes or cams.shape[-2:] != q.shape[-2:]:
            raise ValueError(
                f"CAMs must have shape (B, {self.num_classes}, {q.shape[-2]}, {q.shape[-1]}), got {tuple(cams.shape)}"
            )
        with torch.no_grad():
            cam_sp = psam_pool(cams.to(q.dtype), q.detach(), S)
            ignore = None
            if valid is not None:
                ignore = F.avg_pool2d(valid.to(q.dtype), S)[:, 0] < PADDING_CELL_MIN_VALID
            labels = affinity_labels(cam_sp, self.th_bg, self.th_step, self.th_fg, ignore)
            same, diff = affinity_masks(labels, self.num_classes + 1)
            interior = (same.sum(1) > self.interior_min_same).to(q.dtype)  # (B, h, w)
        a = asam(q, S)
        self_affinity = a[:, NUM_OFFSETS // 2]
        press = (interior * F.relu(self_affinity - self.relu_t)).sum() / B
        diff_loss = (diff.to(q.dtype) * a).sum() / B
        return {"press": press, "diff": diff_loss, "ignored_cells": (labels == self.num_classes + 1).float().mean()}

    def forward(
        self,
        q: torch.Tensor,
        image: torch.Tensor,
        saliency: torch.Tensor | None = None,
        cams: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        use_affinity: bool = False,
    ) -> dict[str, torch.Tensor]:
        """All terms.

        Args:
            q: (B, 9, H, W) PSAM from the FCN.
            image: (B, 3, H, W) ImageNet-normalised images (labels-only mode reads their colour).
            saliency: (B, 1, H, W) in [0, 1] (saliency mode).
            cams: (B, K, H, W) foreground CAMs, needed when ``use_affinity``.
            valid: (B, 1, H, W), 1 on real pixels, 0 on padding; None counts every pixel.
            use_affinity: add L_press and L_diff (the trainer turns them on after the warm-up).
        Returns:
            ``total``, ``recon`` (L_p), ``sem`` or ``color``, ``pos``, ``press``, ``diff`` (scalars; press and diff
            are 0 while the affinity terms are off), and ``ignored_cells`` (fraction, for logging).
        """
        out = self.reconstruction(q, image, saliency, valid)
        zero = q.new_zeros(())
        if use_affinity:
            if cams is None:
                raise ValueError("the affinity terms of the stage-1 loss need CAMs")
            out.update(self.affinity(q, cams, valid))
            out["total"] = out["recon"] + self.press_weight * out["press"] + self.diff_weight * out["diff"]
        else:
            out.update(press=zero, diff=zero, ignored_cells=zero)
            out["total"] = out["recon"]
        return out
