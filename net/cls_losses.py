"""Stage-A / stage-2 classifier losses (spec 3.4: ``SP_CAM_Loss``; the same code serves the CAM baseline).

Shape shorthand: B batch, K foreground classes, channel 0 of the logits is the background, h x w the logit grid.

The saliency given to :func:`eps_saliency_loss` must already live on the logit grid: the CAM baseline resizes the
saliency map to (h, w) with nearest interpolation (spec 3.0); SP-CAM uses the PSAM-pooled saliency
``psam_pool(sal, Q)`` (spec 3.3). The trainer does that, not this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OVERLAP_EPS = 1e-4  # ref SP_CAM_Loss: denominator guard of the class/saliency overlap
FG_WEIGHT = 0.5  # ref EPS: saliency estimate = 0.5 * fg + 0.5 * bg
BG_WEIGHT = 0.5


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (B, K+1, h, w), got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0], logits.shape[1] - 1):
        raise ValueError(
            f"labels must have shape (B={logits.shape[0]}, K={logits.shape[1] - 1}) for logits "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
        )


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label classification loss on the global-average-pooled (SP-)CAM (spec 3.4).

    Args:
        logits: (B, K+1, h, w).
        labels: (B, K) multi-hot foreground labels.
    Returns:
        scalar: ``multilabel_soft_margin_loss(mean_{h,w} logits[:, 1:], labels)`` (background not in the loss).
    """
    _check(logits, labels)
    gap = logits.float().mean(dim=(2, 3))  # fp32 under autocast
    return F.multilabel_soft_margin_loss(gap[:, 1:], labels.to(gap.dtype))


def eps_saliency_loss(
    logits: torch.Tensor,
    sal: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """EPS saliency loss (spec 3.4).

    ``P = softmax(logits)``; a present class c is valid when
    ``sum_s round(P_c) round(sal) / (sum_s round(P_c) + 1e-4) > tau`` (on detached P);
    ``fg = sum_{valid c} P_c``; ``bg = 1 - (P_0 + sum_{present, invalid c} P_c)``;
    loss = mean over cells of ``(0.5 fg + 0.5 bg - sal)^2``.

    Args:
        logits: (B, K+1, h, w).
        sal: (B, 1, h, w) soft saliency in [0, 1] on the logit grid.
        labels: (B, K) multi-hot foreground labels.
        tau: class-validity overlap threshold (ref 0.4).
        valid: optional (B, 1, h, w) mask of real-image cells (1) vs crop padding (0); the squared error is
            averaged over valid cells only. None (ref) averages over all cells.
    Returns:
        scalar loss.
    """
    _check(logits, labels)
    if sal.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(
            f"saliency must have shape (B, 1, h, w) = like logits {tuple(logits.shape)}, got {tuple(sal.shape)}"
        )
    prob = F.softmax(logits.float(), dim=1)
    sal = sal.to(prob.dtype)
    fg_prob = prob[:, 1:]
    with torch.no_grad():
        rounded = torch.round(fg_prob)
        overlap = (rounded * torch.round(sal)).sum(dim=(2, 3)) / (rounded.sum(dim=(2, 3)) + OVERLAP_EPS)
        present = labels > 0.5
        valid_cls = (present & (overlap > tau)).to(prob.dtype)[:, :, None, None]
        invalid_cls = (present & ~(overlap > tau)).to(prob.dtype)[:, :, None, None]
    fg = (fg_prob * valid_cls).sum(dim=1, keepdim=True)
    bg = 1.0 - (prob[:, :1] + (fg_prob * invalid_cls).sum(dim=1, keepdim=True))
    err = (FG_WEIGHT * fg + BG_WEIGHT * bg - sal) ** 2
    if valid is None:
        return err.mean()
    if valid.shape != sal.shape:
        raise ValueError(f"valid mask must have shape {tuple(sal.shape)}, got {tuple(valid.shape)}")
    v = valid.to(err.dtype)
    return (err * v).sum() / v.sum().clamp_min(1.0)
