"""Pixel-level random walk in the style of AffinityNet / IRN: the baseline the superpixel walk is compared against.

This is what users of the IRN family run after their CAMs: pairwise affinities between the pixels of the
1/4-resolution grid that lie within a radius of 5, raised to a power beta, normalised into a transition matrix,
and the transition matrix raised to ``2^8`` by repeated squaring of the dense ``N x N`` matrix (AffinityNet
``infer_aff.py``, IRN ``misc/indexing.py: propagate_to_edge``). It is kept here only to measure its cost
(``tools/benchmark.py``); the pipeline walks on superpixels (:mod:`net.psam`).

Shape shorthand
    C: number of score channels (classes)
    D: number of feature channels of the affinity guide
    h, w: grid height and width (1/4 of the image in IRN); ``N = h * w`` nodes, row-major
    R: number of neighbour offsets within the radius, the offset (0, 0) included

Affinity forms (both published, both symmetric, self-affinity 1)
    ``edge`` (IRN): ``a(i, j) = 1 - max_{p on the segment i -> j} b(p)`` for a boundary map ``b`` in [0, 1]; the segment
        is sampled at ``max(|dy|, |dx|) + 1`` evenly spaced points rounded to pixels (IRN's ``PathIndex`` idea).
    ``feature`` (AffinityNet): ``a(i, j) = exp(-mean_d |f_d(i) - f_d(j)|)`` for a feature map ``f``.
    Pairs are the offsets ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2``; the affinity of the half-disk offsets is computed
    and mirrored to the other half, so ``a(i, j) = a(j, i)`` holds exactly, as AffinityNet's ``to_dense`` does.

Transition matrix
    ``T = D^-1 A^beta`` with ``D`` the row sums of ``A^beta``: rows sum to 1 and a walk step is ``x <- T x`` for
    ``x: (N, C)``. The published code builds the column-normalised ``A^beta D^-1`` and multiplies ``cam (C, N)`` from the
    left; as ``A`` is symmetric that matrix is ``T^T`` and the two walks are identical. IRN's extra masking of the CAM
    by ``1 - b`` before the walk does not change the cost and is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AFFINITY_FORMS = ("edge", "feature")


@dataclass(frozen=True)
class PixelWalkConfig:
    """Parameters of the pixel-level walk (defaults: IRN's ``make_sem_seg_labels``)."""

    radius: int = 5  # ref (AffinityNet, IRN): pairs within radius 5 on the 1/4-resolution grid
    beta: float = 10.0  # ref: IRN beta 10 (AffinityNet uses 8)
    log_t: int = 8  # ref (AffinityNet logt, IRN exp_times): T^(2^8) by 8 squarings
    affinity: str = "edge"  # edge (IRN boundary map) | feature (AffinityNet feature map)


def disk_offsets(radius: int) -> list[tuple[int, int]]:
    """Neighbour offsets ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2``, the offset (0, 0) included.

    Ordered as: (0, 0), the AffinityNet half disk (``(0, 1..r-1)`` then rows ``dy = 1..r-1``), then the mirrored half.
    Offset ``1 + i`` and offset ``1 + H + i`` (``H`` = half-disk size) are negatives of each other.
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    half = [(0, dx) for dx in range(1, radius)]
    half += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius**2]
    return [(0, 0)] + half + [(-dy, -dx) for dy, dx in half]


def _shift(x: torch.Tensor, dy: int, dx: int, fill: float = 0.0) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]``, ``fill`` outside the grid. (..., h, w) -> (..., h, w)."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = max(0, dy), max(0, -dy)
    xs, xd = max(0, dx), max(0, -dx)
    hh, ww = h - abs(dy), w - abs(dx)
    if hh > 0 and ww > 0:
        out[..., yd : yd + hh, xd : xd + ww] = x[..., ys : ys + hh, xs : xs + ww]
    return out


def _inside(
    h: int, w: int, offsets: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(R, h, w) 1 where ``p + offset`` lies inside the grid."""
    ones = torch.ones(1, h, w, device=device, dtype=dtype)
    return torch.cat([_shift(ones, dy, dx) for dy, dx in offsets])


def _mirror(half: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Complete half-disk affinities to the full disk: ``a(p, p - d) = a(p - d, p)``. (H, h, w) -> (R, h, w)."""
    n_half = half.shape[0]
    mirrored = [_shift(half[i : i + 1], -dy, -dx) for i, (dy, dx) in enumerate(offsets[1 : 1 + n_half])]
    return torch.cat([torch.ones_like(half[:1]), half, *mirrored])


def edge_affinity(edge: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """IRN's boundary-based affinity ``1 - max b`` along the segment to every neighbour within the radius.

    Args:
        edge: (h, w) boundary probability in [0, 1].
        radius: neighbourhood radius (pairs with ``dy^2 + dx^2 < radius^2``).
    Returns:
        (R, h, w) affinity ``a(p, p + d_r)`` for the offsets of :func:`disk_offsets`; 0 where ``p + d_r`` is outside
        the grid, 1 for the offset (0, 0).
    """
    if edge.ndim != 2:
        raise ValueError(f"edge map must have shape (h, w), got {tuple(edge.shape)}")
    offsets = disk_offsets(radius)
    n_half = (len(offsets) - 1) // 2
    h, w = edge.shape
    half = []
    for dy, dx in offsets[1 : 1 + n_half]:
        n = max(abs(dy), abs(dx))
        peak = edge
        for s in range(1, n + 1):  # sampled points p + round(s/n * d), p itself at s = 0
            peak = torch.maximum(peak, _shift(edge, round(dy * s / n), round(dx * s / n), fill=1.0))
        half.append(1.0 - peak)
    aff = _mirror(torch.stack(half), offsets)
    return aff * _inside(h, w, offsets, edge.device, edge.dtype)


def feature_affinity(feat: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """AffinityNet's feature affinity ``exp(-mean_d |f_d(p) - f_d(p + d_r)|)`` within the radius.

    Args:
        feat: (D, h, w) feature map.
    Returns:
        (R, h, w) as :func:`edge_affinity`.
    """
    if feat.ndim != 3:
        raise ValueError(f"feature map must have shape (D, h, w), got {tuple(feat.shape)}")
    offsets = disk_offsets(radius)
    n_half = (len(offsets) - 1) // 2
    h, w = feat.shape[-2:]
    half = [torch.exp(-(feat - _shift(feat, dy, dx)).abs().mean(0)) for dy, dx in offsets[1 : 1 + n_half]]
    aff = _mirror(torch.stack(half), offsets)
    return aff * _inside(h, w, offsets, feat.device, feat.dtype)


def affinity(guide: torch.Tensor, cfg: PixelWalkConfig) -> torch.Tensor:
    """:func:`edge_affinity` or :func:`feature_affinity` by ``cfg.affinity``. Returns (R, h, w)."""
    if cfg.affinity == "edge":
        return edge_affinity(guide, cfg.radius)
    if cfg.affinity == "feature":
        return feature_affinity(guide, cfg.radius)
    raise ValueError(f"pixel-walk affinity must be one of {AFFINITY_FORMS}, got {cfg.affinity!r}")


def transition_weights(aff: torch.Tensor, beta: float) -> torch.Tensor:
    """Stencil form of ``T = D^-1 A^beta``: ``T(p, p + d_r) = a_r(p)^beta / sum_r a_r(p)^beta``. (R, h, w) -> same."""
    scaled = aff.pow(beta)
    return scaled / scaled.sum(0, keepdim=True)


def dense_transition(aff: torch.Tensor, beta: float, radius: int = 5) -> torch.Tensor:
    """The dense ``N x N`` transition matrix of the published walks (rows sum to 1).

    Args:
        aff: (R, h, w) affinities from :func:`edge_affinity` / :func:`feature_affinity` with the same ``radius``.
    Returns:
        (N, N) with ``T[i, j]`` the probability of stepping from node i to node j.
    """
    offsets = disk_offsets(radius)
    if aff.ndim != 3 or aff.shape[0] != len(offsets):
        raise ValueError(f"affinity must have shape ({len(offsets)}, h, w) for radius {radius}, got {tuple(aff.shape)}")
    h, w = aff.shape[-2:]
    n = h * w
    weights = transition_weights(aff, beta)
    ys, xs = torch.meshgrid(torch.arange(h, device=aff.device), torch.arange(w, device=aff.device), indexing="ij")
    trans = aff.new_zeros(n, n)
    src = (ys * w + xs).reshape(-1)
    for r, (dy, dx) in enumerate(offsets):
        ty, tx = ys + dy, xs + dx
        ok = ((ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)).reshape(-1)
        dst = (ty * w + tx).reshape(-1)
        trans[src[ok], dst[ok]] = weights[r].reshape(-1)[ok]
    return trans


def dense_walk(x: torch.Tensor, trans: torch.Tensor, log_t: int = 8) -> torch.Tensor:
    """The published walk: ``T^(2^log_t)`` by ``log_t`` squarings of the dense matrix, then one product.

    Memory is three ``N x N`` float matrices at the peak (the caller's ``T``, the current power and its square), e.g.
    1.6 GiB for the 11,750 nodes of a 375 x 500 image at 1/4 resolution; time is ``log_t * 2 N^3`` flops (about 5 min
    on one CPU core).

    Args:
        x: (C, h, w) scores on the grid.
        trans: (N, N) from :func:`dense_transition`.
    Returns:
        (C, h, w) ``T^(2^log_t) x``.
    """
    C, h, w = x.shape
    if trans.shape != (h * w, h * w):
        raise ValueError(f"transition matrix must be ({h * w}, {h * w}) for a {h}x{w} grid, got {tuple(trans.shape)}")
    power = trans
    for _ in range(log_t):
        power = power @ power
    return (power @ x.reshape(C, h * w).T).T.reshape(C, h, w)


def sparse_walk(x: torch.Tensor, weights: torch.Tensor, steps: int, radius: int = 5) -> torch.Tensor:
    """The same walk as ``steps`` sparse mat-vec steps ``x <- T x`` in stencil form (no ``N x N`` matrix).

    ``sparse_walk(x, w, 2**log_t)`` equals ``dense_walk(x, T, log_t)`` up to rounding.

    Args:
        x: (C, h, w) scores.
        weights: (R, h, w) from :func:`transition_weights`.
    Returns:
        (C, h, w).
    """
    offsets = disk_offsets(radius)
    if weights.ndim != 3 or weights.shape[0] != len(offsets) or weights.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"weights must have shape ({len(offsets)}, {x.shape[-2]}, {x.shape[-1]}), got {tuple(weights.shape)}"
        )
    if steps < 0:
        raise ValueError(f"number of walk steps must be >= 0, got {steps}")
    h, w = x.shape[-2:]
    r = radius - 1  # largest |dy|, |dx| of the disk
    wts = weights.unsqueeze(1)  # (R, 1, h, w)
    cur = x
    for _ in range(steps):
        padded = F.pad(cur, (r, r, r, r))
        out = torch.zeros_like(cur)
        for i, (dy, dx) in enumerate(offsets):
            out.addcmul_(wts[i], padded[:, r + dy : r + dy + h, r + dx : r + dx + w])
        cur = out
    return cur


def pixel_random_walk(
    x: torch.Tensor, guide: torch.Tensor, cfg: PixelWalkConfig, method: str = "dense"
) -> torch.Tensor:
    """Affinity, transition matrix and ``2^log_t`` walk steps on one image (everything after the networks).

    Args:
        x: (C, h, w) CAM scores on the 1/4-resolution grid.
        guide: (h, w) boundary map (``edge``) or (D, h, w) feature map (``feature``).
        method: ``dense`` (published: repeated squaring) or ``sparse`` (``2^log_t`` stencil mat-vec steps).
    Returns:
        (C, h, w) walked scores.
    """
    aff = affinity(guide, cfg)
    if method == "dense":
        return dense_walk(x, dense_transition(aff, cfg.beta, cfg.radius), cfg.log_t)
    if method == "sparse":
        return sparse_walk(x, transition_weights(aff, cfg.beta), 2**cfg.log_t, cfg.radius)
    raise ValueError(f"pixel-walk method must be 'dense' or 'sparse', got {method!r}")
