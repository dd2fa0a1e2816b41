"""The reference's slow formulations of the PSAM operators, kept only for comparison and benchmarking.

Same shapes and semantics as :mod:`net.psam` (see its shape shorthand); functions carry a ``_reference`` suffix.
These follow SpixelFCN's ``poolfeat`` / ``upfeat`` and SP-CAM's ``calc_affmat`` as described in docs/method.md §2.2-2.3:

* pooling and upsampling build nine shifted full-resolution tensors, one per candidate cell;
* the ASAM upsamples a 25-colour one-hot tiling of the grid to pixels, pools it back, and reorders the 25 channels of
  every cell to the offset order ``d_j`` with a lookup table;
* a walk step stacks the 25 shifted neighbours (a 5x5 unfold) and multiplies by the ASAM;
* the DRM re-indexes the kernels to the receiving cell and applies the upsampling operator with cell size 1.

Do not use these in the pipeline: they are several times slower and use far more memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from net.psam import CELL_SIZE, DEFAULT_EPS, NUM_CANDIDATES, NUM_OFFSETS, _check_psam_shape

_TILE = 5  # colours per axis of the ASAM tiling: any 5x5 window of cells sees 25 distinct colours


def _shift_cells(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out(y, x) = x(y + dy, x + dx)``, zero outside: (B, C, h, w) -> (B, C, h, w)."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1))
    return xp[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def psam_upsample_reference(g: torch.Tensor, q: torch.Tensor, cell_size: int = CELL_SIZE) -> torch.Tensor:
    """U_Q as in SpixelFCN ``upfeat``: nine shifted grids, each nearest-upsampled to pixels and weighted by q_k.

    Args:
        g: (B, C, h, w).  q: (B, 9, H, W).
    Returns:
        (B, C, H, W).
    """
    _check_psam_shape(q, cell_size)
    out = 0
    for k in range(NUM_CANDIDATES):
        shifted = _shift_cells(g, k // 3 - 1, k % 3 - 1)
        full = F.interpolate(shifted, scale_factor=cell_size, mode="nearest")
        out = out + full * q[:, k : k + 1]
    return out


def psam_pool_reference(
    f: torch.Tensor, q: torch.Tensor, cell_size: int = CELL_SIZE, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """P_Q as in SpixelFCN ``poolfeat``: for each candidate, average-pool ``[f, 1] * q_k`` and send it to cell c + o_k.

    Args:
        f: (B, C, H, W).  q: (B, 9, H, W).
    Returns:
        (B, C, h, w); ``eps`` is added to the average-pooled denominator.
    """
    _check_psam_shape(q, cell_size)
    B, _, H, W = f.shape
    feat = torch.cat([f, f.new_ones(B, 1, H, W)], dim=1)
    total = 0
    for k in range(NUM_CANDIDATES):
        pooled = F.avg_pool2d(feat * q[:, k : k + 1], kernel_size=cell_size, stride=cell_size)
        # cell c's candidate k is cell c + o_k: the receiving cell t reads from t - o_k
        total = total + _shift_cells(pooled, -(k // 3 - 1), -(k % 3 - 1))
    return total[:, :-1] / (total[:, -1:] + eps)


def _tiling(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(25, h, w) one-hot colour of every cell: ``(row mod 5) * 5 + (col mod 5)``."""
    rows = torch.arange(h, device=device).view(h, 1) % _TILE
    cols = torch.arange(w, device=device).view(1, w) % _TILE
    colour = rows * _TILE + cols
    return F.one_hot(colour, NUM_OFFSETS).permute(2, 0, 1).to(dtype)


def _offset_lookup(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(25, h, w) colour of cell ``s + d_j`` for every cell s and offset j (the reference's reordering table)."""
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    j = torch.arange(NUM_OFFSETS, device=device).view(NUM_OFFSETS, 1, 1)
    dy, dx = j // _TILE - 2, j % _TILE - 2
    return ((ys + dy) % _TILE) * _TILE + (xs + dx) % _TILE


def asam_reference(
    q: torch.Tensor, cell_size: int = CELL_SIZE, renormalize: bool = False, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """ASAM as the reference computes it: pool back an upsampled 25-colour tiling, then reorder colours to offsets.

    Args:
        q: (B, 9, H, W).
    Returns:
        (B, 25, h, w).
    """
    h, w = _check_psam_shape(q, cell_size)
    B = q.shape[0]
    tiling = _tiling(h, w, q.dtype, q.device).unsqueeze(0).expand(B, -1, -1, -1)
    by_colour = psam_pool_reference(psam_upsample_reference(tiling, q, cell_size), q, cell_size, eps)
    index = _offset_lookup(h, w, q.device).unsqueeze(0).expand(B, -1, -1, -1)
    a = by_colour.gather(1, index)
    if renormalize:
        rows = a.sum(1, keepdim=True)
        a = torch.where(rows > 0, a / rows.clamp_min(torch.finfo(a.dtype).tiny), a)
    return a


def walk_step_reference(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One walk step on a stack of the 25 shifted neighbour maps times the ASAM. (B, C, h, w), (B, 25, h, w) -> same."""
    h, w = g.shape[-2:]
    gp = F.pad(g, (2, 2, 2, 2))
    stack = torch.stack(
        [gp[:, :, 2 + j // 5 - 2 : 2 + j // 5 - 2 + h, 2 + j % 5 - 2 : 2 + j % 5 - 2 + w] for j in range(NUM_OFFSETS)],
        2,
    )  # (B, C, 25, h, w)
    return (stack * a.unsqueeze(1)).sum(2)


def random_walk_reference(g: torch.Tensor, a: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` walk steps with :func:`walk_step_reference`."""
    for _ in range(steps):
        g = walk_step_reference(g, a)
    return g


def drm_redistribute_reference(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """DRM as the reference writes it: the receiver's kernel ``r_k(t) = w_k(t + o_k)``, then U with cell size 1.

    Args:
        z: (B, C, h, w).  w: (B, 9, h, w).
    Returns:
        (B, C, h, w).
    """
    receiver = torch.stack([_shift_cells(w[:, k : k + 1], k // 3 - 1, k % 3 - 1)[:, 0] for k in range(9)], dim=1)
    return psam_upsample_reference(z, receiver, cell_size=1)
