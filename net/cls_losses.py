"""Stage-A / stage-2 classifier losses (docs/method.md §3.4: ``SP_CAM_Loss``; the same code serves the CAM baseline).

Shape shorthand: B batch, K foreground classes, channel 0 of the logits is the background, h x w the logit grid.

The saliency given to :func:`eps_saliency_loss` must already live on the logit grid: the CAM baseline resizes the
saliency map to (h, w) with nearest interpolation (docs/method.md §3.0); SP-CAM uses the PSAM-pooled saliency
``psam_pool(sal, Q)`` (docs/method.md §3.3). :func:`classifier_loss` does both and adds the terms as the trainer uses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from net.psam import CELL_SIZE, psam_pool

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
    """Multi-label classification loss on the global-average-pooled (SP-)CAM (docs/method.md §3.4).

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
    """EPS saliency loss (docs/method.md §3.4).

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


def saliency_on_grid(
    sal: torch.Tensor, psam: torch.Tensor | None, grid: tuple[int, int], cell_size: int = CELL_SIZE
) -> torch.Tensor:
    """(B, 1, S, S) saliency -> (B, 1, h, w): PSAM pooling for SP-CAM (docs/method.md §3.3), nearest resize for CAM (docs/method.md §3.0)."""
    if psam is not None:
        return psam_pool(sal, psam, cell_size=cell_size)
    return F.interpolate(sal, size=tuple(grid), mode="nearest")


def classifier_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    saliency: torch.Tensor | None,
    psam: torch.Tensor | None,
    alpha: float,
    tau: float,
    cell_size: int = CELL_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of stages A and 2: multilabel + ``alpha`` * EPS saliency loss (docs/method.md §3.4).

    Args:
        logits: (B, K+1, h, w) float32 (CAM or SP-CAM logits).
        labels: (B, K) multi-hot.
        saliency: (B, 1, S, S) in [0, 1], or None (labels-only mode: the saliency term is 0).
        psam: (B, 9, S, S) for SP-CAM (the saliency is PSAM-pooled to the grid), None for the CAM baseline.
    Returns:
        (total, multilabel term, saliency term), scalars.
    """
    loss_cls = multilabel_loss(logits, labels)
    loss_sal = logits.new_zeros(())
    if saliency is not None:
        sal_grid = saliency_on_grid(saliency, psam, logits.shape[-2:], cell_size)
        loss_sal = eps_saliency_loss(logits, sal_grid, labels, tau)
    return loss_cls + alpha * loss_sal, loss_cls, loss_sal
