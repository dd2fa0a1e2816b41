"""PSAM / ASAM operators: pooling, upsampling, superpixel affinity, random walk, DRM redistribution.

Pure tensor functions (torch only): the device and dtype come from the inputs, arguments are never modified, and every
function is differentiable where training needs it (pooling, upsampling, ASAM, walk, DRM).

Shape shorthand
    B: batch size
    C: number of channels of a map (features, class scores, ...)
    S: cell size in pixels (``cell_size``, 16 in the reference)
    H, W: pixel height and width, multiples of S
    h, w: grid height and width, ``h = H // S``, ``w = W // S``; one superpixel per grid cell

Conventions (docs/method.md §0)
    PSAM ``q``: (B, 9, H, W), a softmax over the 9 channels at every pixel. Channel k is the association of pixel p with the
        cell ``c(p) + o_k``, ``o_k = (k // 3 - 1, k % 3 - 1)`` (row-major 3x3, 4 = own cell). Candidate cells outside the
        grid are dropped (zero padding), as in the reference.
    ASAM ``a``: (B, 25, h, w). Channel j is the affinity from cell s to cell ``s + d_j``, ``d_j = (j // 5 - 2, j % 5 - 2)``
        (12 = self-affinity).

The formulations are the exact fast ones of docs/method.md §8.3: per-cell batched products plus a 3x3 unfold (gather from the 9
candidate cells) or a 3x3 fold (its adjoint: scatter to the 9 candidate cells). No nine shifted full-resolution copies are
made; :mod:`net.psam_reference` keeps the reference's slow forms for comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CELL_SIZE = 16  # superpixel grid cell in pixels (published: 16); the classifiers' output stride matches it
NUM_CANDIDATES = 9  # 3x3 candidate cells per pixel
NUM_OFFSETS = 25  # 5x5 ASAM window
PSAM_SUM_ATOL = 1e-3  # check_psam: tolerance on the channel sum of a PSAM
DEFAULT_EPS = 1e-8  # ref (SpixelFCN poolfeat): added to the *average-pooled* denominator


def _offsets3() -> list[tuple[int, int]]:
    return [(k // 3 - 1, k % 3 - 1) for k in range(NUM_CANDIDATES)]


def _offsets5() -> list[tuple[int, int]]:
    return [(j // 5 - 2, j % 5 - 2) for j in range(NUM_OFFSETS)]


def _check_psam_shape(q: torch.Tensor, cell_size: int) -> tuple[int, int]:
    if q.ndim != 4 or q.shape[1] != NUM_CANDIDATES:
        raise ValueError(f"PSAM must have shape (B, 9, H, W), got {tuple(q.shape)}")
    if cell_size < 1:
        raise ValueError(f"cell_size must be >= 1, got {cell_size}")
    H, W = q.shape[-2:]
    if H % cell_size or W % cell_size or H == 0 or W == 0:
        raise ValueError(f"PSAM size {H}x{W} is not a positive multiple of the cell size {cell_size} (pad the input)")
    return H // cell_size, W // cell_size


def check_psam(q: torch.Tensor, cell_size: int = CELL_SIZE) -> None:
    """Validate a PSAM: shape (B, 9, H, W), H and W multiples of ``cell_size``, non-negative channels summing to 1.

    Raises:
        ValueError: naming the first violated condition.
    """
    _check_psam_shape(q, cell_size)
    if not torch.is_floating_point(q):
        raise ValueError(f"PSAM must be a floating-point tensor, got {q.dtype}")
    with torch.no_grad():
        if not bool(torch.isfinite(q).all()):
            raise ValueError("PSAM contains NaN or infinite values")
        if float(q.min()) < -PSAM_SUM_ATOL:
            raise ValueError(
                f"PSAM has negative entries (min {float(q.min()):.3g}); expected a softmax over 9 channels"
            )
        err = float((q.sum(1) - 1).abs().max())
        if err > PSAM_SUM_ATOL:
            raise ValueError(f"PSAM channels do not sum to 1 (max deviation {err:.3g} > {PSAM_SUM_ATOL})")


def _check_grid(x: torch.Tensor, q: torch.Tensor, h: int, w: int, name: str) -> None:
    if x.ndim != 4 or x.shape[0] != q.shape[0] or tuple(x.shape[-2:]) != (h, w):
        raise ValueError(f"{name} must have shape (B={q.shape[0]}, C, {h}, {w}) for this PSAM, got {tuple(x.shape)}")


def _cells(x: torch.Tensor, cell_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, S, w, S), a view when ``x`` is contiguous."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // cell_size, cell_size, W // cell_size, cell_size)


def _gather3(g: torch.Tensor) -> torch.Tensor:
    """3x3 neighbourhood of every cell, zero outside: (B, C, h, w) -> (B, C, 9, h, w); [:, :, k, y, x] = g(y, x) + o_k."""
    B, C, h, w = g.shape
    return F.unfold(g, kernel_size=3, padding=1).view(B, C, NUM_CANDIDATES, h, w)


def _scatter3(v: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_gather3`: (B, C, 9, h, w) -> (B, C, h, w), ``out(s + o_k) += v[:, :, k](s)``, dropped outside."""
    B, C, K, h, w = v.shape
    return F.fold(v.reshape(B, C * K, h * w), output_size=(h, w), kernel_size=3, padding=1)


def psam_upsample(g: torch.Tensor, q: torch.Tensor, cell_size: int = CELL_SIZE) -> torch.Tensor:
    """PSAM upsampling U_Q (cells -> pixels): ``out(p) = sum_k q_k(p) * g(c(p) + o_k)``, g = 0 outside the grid.

    Args:
        g: (B, C, h, w) grid map.
        q: (B, 9, H, W) PSAM.
    Returns:
        (B, C, H, W), dtype of the inputs.
    """
    h, w = _check_psam_shape(q, cell_size)
    _check_grid(g, q, h, w, "grid map g")
    dtype = torch.promote_types(g.dtype, q.dtype)
    nb = _gather3(g.to(dtype))[:, :, :, :, None, :, None]  # (B, C, 9, h, 1, w, 1)
    qc = _cells(q.to(dtype), cell_size).unsqueeze(1)  # (B, 1, 9, h, S, w, S)
    # nine broadcast multiply-adds straight into the output layout: no 9x full-resolution temporary, no permuted copy
    # (faster on CPU than the per-cell matmul; in-place accumulation on a fresh tensor keeps autograd working)
    out = nb[:, :, 0] * qc[:, :, 0]
    for k in range(1, NUM_CANDIDATES):
        out.addcmul_(nb[:, :, k], qc[:, :, k])
    B, C = g.shape[:2]
    return out.reshape(B, C, h * cell_size, w * cell_size)


def psam_pool(f: torch.Tensor, q: torch.Tensor, cell_size: int = CELL_SIZE, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """PSAM pooling P_Q (pixels -> cells): ``out(s) = sum_p q(p, s) f(p) / (sum_p q(p, s) + eps * S^2)``.

    ``eps`` has the reference's meaning: SpixelFCN adds it to the 16x16 *average-pooled* denominator, i.e. ``eps * S^2``
    on the raw sums used here (256e-8 for S = 16, eps = 1e-8), so the result matches the reference to rounding.

    Args:
        f: (B, C, H, W) pixel map.
        q: (B, 9, H, W) PSAM.
    Returns:
        (B, C, h, w).
    """
    h, w = _check_psam_shape(q, cell_size)
    _check_grid(f, q, q.shape[-2], q.shape[-1], "pixel map f")
    dtype = torch.promote_types(f.dtype, q.dtype)
    B, C, H, _ = f.shape
    S = cell_size
    q = q.to(dtype)
    # per pixel row and cell: (C x S) @ (S x 9), summed over the S rows of the cell (faster on CPU than one
    # (C x S*S) @ (S*S x 9) product per cell); then each candidate k is sent to cell c + o_k (3x3 fold)
    rows = torch.matmul(
        f.to(dtype).reshape(B, C, H, w, S).permute(0, 2, 3, 1, 4),
        q.reshape(B, NUM_CANDIDATES, H, w, S).permute(0, 2, 3, 4, 1),
    )  # (B, H, w, C, 9)
    num = _scatter3(rows.reshape(B, h, S, w, C, NUM_CANDIDATES).sum(2).permute(0, 3, 4, 1, 2))
    den = _scatter3(_cells(q, S).sum(dim=(3, 5)).unsqueeze(1))  # (B, 1, h, w)
    return num / (den + eps * cell_size * cell_size)


# (k, l) -> ASAM offset index j of d = o_l - o_k, and the position of G[k, l] in the (25 x 9) fold input
def _asam_index() -> list[int]:
    zero = NUM_CANDIDATES * NUM_CANDIDATES  # index of an all-zero channel appended to the 81 Gram channels
    table = [zero] * (NUM_OFFSETS * NUM_CANDIDATES)
    o3 = _offsets3()
    for k, (ky, kx) in enumerate(o3):
        for l, (ly, lx) in enumerate(o3):  # noqa: E741 - k, l as in docs/method.md §8.3
            j = (ly - ky + 2) * 5 + (lx - kx + 2)
            table[j * NUM_CANDIDATES + k] = k * NUM_CANDIDATES + l
    return table


_ASAM_INDEX = _asam_index()


def asam(
    q: torch.Tensor, cell_size: int = CELL_SIZE, renormalize: bool = False, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """ASAM in closed form (docs/method.md §2.3): ``A(s, s + d) = sum_p q(p, s) q(p, s + d) / (sum_p q(p, s) + eps * S^2)``.

    Computed from per-cell 9x9 Gram statistics ``G_c[k, l] = sum_{p in c} q_k(p) q_l(p)`` folded to offsets:
    ``N(c + o_k, o_l - o_k) += G_c[k, l]``, ``Z(c + o_k) += sum_{p in c} q_k(p)``, ``A = N / (Z + eps * S^2)`` (the eps of
    the reference's pool-based route, so one :func:`walk_step` equals ``psam_pool(psam_upsample(g))`` exactly).

    Rows sum to 1 for interior cells and to less than 1 at the image border (mass of out-of-grid candidates is lost).

    Args:
        q: (B, 9, H, W) PSAM.
        renormalize: divide every row by its sum (docs/decisions.md D6; the reference does not).
    Returns:
        (B, 25, h, w).
    """
    h, w = _check_psam_shape(q, cell_size)
    B = q.shape[0]
    qc = _cells(q, cell_size)
    gram = torch.einsum("bkyixj,blyixj->bklyx", qc, qc)
    # candidate l of cell c is the target c + o_l: drop it where that lies outside the grid (the fold drops c + o_k)
    inside = _gather3(torch.ones(1, 1, h, w, dtype=q.dtype, device=q.device)).view(1, 1, NUM_CANDIDATES, h, w)
    gram = (gram * inside).reshape(B, NUM_CANDIDATES * NUM_CANDIDATES, h, w)
    gram = torch.cat([gram, gram.new_zeros(B, 1, h, w)], dim=1)
    index = torch.tensor(_ASAM_INDEX, device=q.device)
    spread = gram.index_select(1, index).view(B, NUM_OFFSETS, NUM_CANDIDATES, h, w)  # [j, k]: G[k, l(j, k)]
    num = _scatter3(spread)  # (B, 25, h, w)
    den = _scatter3(qc.sum(dim=(3, 5)).unsqueeze(1))  # (B, 1, h, w)
    a = num / (den + eps * cell_size * cell_size)
    if renormalize:
        rows = a.sum(1, keepdim=True)
        a = torch.where(rows > 0, a / rows.clamp_min(torch.finfo(a.dtype).tiny), a)
    return a


WALK_FORMS = ("stencil", "unfold")


def walk_step(g: torch.Tensor, a: torch.Tensor, form: str | None = None) -> torch.Tensor:
    """One random-walk step on the grid: ``out(s) = sum_j a_j(s) * g(s + d_j)``, g = 0 outside the grid.

    Equals ``psam_pool(psam_upsample(g, q), q)`` when ``a = asam(q)``. Two exact forms of the same sum:
    ``stencil``, 25 multiply-adds of shifted views (the fastest on CPU, docs/method.md §11), and ``unfold``, one 5x5 unfold and one
    contraction (a few kernel launches instead of 25, the fastest on CUDA, where the walk is launch-bound).

    Args:
        g: (B, C, h, w) grid map.
        a: (B, 25, h, w) ASAM.
        form: "stencil" | "unfold"; None picks unfold on CUDA and stencil elsewhere.
    Returns:
        (B, C, h, w).
    """
    if a.ndim != 4 or a.shape[1] != NUM_OFFSETS:
        raise ValueError(f"ASAM must have shape (B, 25, h, w), got {tuple(a.shape)}")
    if g.ndim != 4 or g.shape[0] != a.shape[0] or g.shape[-2:] != a.shape[-2:]:
        raise ValueError(
            f"grid map must have shape (B={a.shape[0]}, C, {a.shape[2]}, {a.shape[3]}), got {tuple(g.shape)}"
        )
    form = form or ("unfold" if g.is_cuda else "stencil")
    if form not in WALK_FORMS:
        raise ValueError(f"walk form must be one of {WALK_FORMS}, got {form!r}")
    B, C, h, w = g.shape
    dtype = torch.promote_types(g.dtype, a.dtype)
    g, a = g.to(dtype), a.to(dtype)
    if form == "unfold":  # unfold enumerates the 5x5 window row-major: column j is the offset d_j
        cols = F.unfold(g, kernel_size=5, padding=2).view(B, C, NUM_OFFSETS, h, w)
        return torch.einsum("bcjyx,bjyx->bcyx", cols, a)
    gp = F.pad(g, (2, 2, 2, 2))
    out = None
    for j, (dy, dx) in enumerate(_offsets5()):
        shifted = gp[:, :, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]
        if out is None:
            out = a[:, j : j + 1] * shifted
        else:
            out.addcmul_(a[:, j : j + 1], shifted)  # in place on a fresh tensor: autograd-safe, no temporaries
    return out


def random_walk(g: torch.Tensor, a: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` walk steps: ``A^steps g``. (B, C, h, w) -> (B, C, h, w); ``steps = 0`` returns a copy of g."""
    if steps < 0:
        raise ValueError(f"number of walk steps must be >= 0, got {steps}")
    out = g.clone()
    for _ in range(steps):
        out = walk_step(out, a)
    return out


def random_walk_multi(g: torch.Tensor, a: torch.Tensor, t_list: list[int]) -> dict[int, torch.Tensor]:
    """``A^t g`` for every t in ``t_list``, computed incrementally (each step done once: 20, then +10, ...).

    Returns:
        {t: (B, C, h, w)} for every distinct t.
    """
    if any(t < 0 for t in t_list):
        raise ValueError(f"walk steps must be >= 0, got {list(t_list)}")
    out: dict[int, torch.Tensor] = {}
    cur, done = g, 0
    for t in sorted(set(int(t) for t in t_list)):
        cur = random_walk(cur, a, t - done) if t > done else cur.clone()
        done = t
        out[t] = cur
    return out


def drm_redistribute(z: torch.Tensor, w: torch.Tensor, border: str = "zero") -> torch.Tensor:
    """DRM redistribution (docs/method.md §3.2 step 5): ``out(t) = sum_k w_k(t + o_k) * z(t + o_k)``, zero outside the grid.

    Each source cell s sends the fraction ``w_k(s)`` of its value to the cell ``s - o_k = s + o_{8-k}``: a 3x3 fold of
    ``w * z`` with the kernel index mirrored. Mass is preserved away from the border when ``w`` sums to 1 over k.

    Args:
        z: (B, C, h, w) grid scores.
        w: (B, 9, h, w) per-source kernels (the same kernel for all C channels).
        border: "zero" (ref): nothing comes from outside the grid, so border cells lose the mass their missing
            neighbours would send; on logits this pulls border scores towards 0, i.e. raises negative foreground
            logits. "replicate": the cells just outside the grid copy their border cell (scores and kernels) and
            send like real cells; cells away from the border get exactly the same result.
    Returns:
        (B, C, h, w).
    """
    if w.ndim != 4 or w.shape[1] != NUM_CANDIDATES:
        raise ValueError(f"DRM kernels must have shape (B, 9, h, w), got {tuple(w.shape)}")
    if z.ndim != 4 or z.shape[0] != w.shape[0] or z.shape[-2:] != w.shape[-2:]:
        raise ValueError(
            f"scores must have shape (B={w.shape[0]}, C, {w.shape[2]}, {w.shape[3]}), got {tuple(z.shape)}"
        )
    if border == "zero":
        return _scatter3(z.unsqueeze(2) * w.flip(1).unsqueeze(1))
    if border != "replicate":
        raise ValueError(f"DRM border must be 'zero' or 'replicate', got {border!r}")
    zp, wp = F.pad(z, (1, 1, 1, 1), mode="replicate"), F.pad(w, (1, 1, 1, 1), mode="replicate")
    return _scatter3(zp.unsqueeze(2) * wp.flip(1).unsqueeze(1))[..., 1:-1, 1:-1]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad bottom and right so that H and W become multiples of ``multiple``.

    Args:
        x: (B, C, H, W).
    Returns:
        (padded (B, C, H', W'), (H, W) the original size).
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph == 0 and pw == 0:
        return x, (H, W)
    return F.pad(x, (0, pw, 0, ph)), (H, W)


def hard_assignment(q: torch.Tensor, cell_size: int = CELL_SIZE) -> torch.Tensor:
    """Hard superpixel labels: each pixel goes to its most associated in-grid candidate cell ``c(p) + o_k``.

    Args:
        q: (B, 9, H, W) PSAM.
    Returns:
        (B, H, W) int64 cell indices ``row * w + col`` of the grid (h, w).
    """
    h, w = _check_psam_shape(q, cell_size)
    inside = _gather3(torch.ones(1, 1, h, w, dtype=q.dtype, device=q.device)).view(1, NUM_CANDIDATES, h, 1, w, 1) > 0
    qc = _cells(q, cell_size).masked_fill(~inside, -1.0)  # out-of-grid candidates never win (q >= 0)
    k = qc.argmax(1)  # (B, h, S, w, S)
    rows = torch.arange(h, device=q.device).view(1, h, 1, 1, 1) + k // 3 - 1
    cols = torch.arange(w, device=q.device).view(1, 1, 1, w, 1) + k % 3 - 1
    B = q.shape[0]
    return (rows * w + cols).reshape(B, h * cell_size, w * cell_size)
