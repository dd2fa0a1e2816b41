"""PSAM/ASAM operators against slow obvious implementations (explicit loops over pixels and candidate cells)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from net import psam_reference as ref
from net.psam import (
    asam,
    check_psam,
    drm_redistribute,
    pad_to_multiple,
    psam_pool,
    psam_upsample,
    random_walk,
    random_walk_multi,
    walk_step,
)

TOL = 1e-6
S = 4  # small cell size keeps the loops fast; the operators take any cell size
EPS = 1e-8


def random_psam(b: int, h: int, w: int, cell: int = S, sharp: float = 2.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 9, h * cell, w * cell, generator=gen, dtype=torch.float64) * sharp
    return torch.softmax(logits, dim=1)


def candidates(py: int, px: int, h: int, w: int, cell: int = S):
    """The in-grid candidate cells (k, sy, sx) of pixel (py, px)."""
    cy, cx = py // cell, px // cell
    for k in range(9):
        sy, sx = cy + k // 3 - 1, cx + k % 3 - 1
        if 0 <= sy < h and 0 <= sx < w:
            yield k, sy, sx


def slow_upsample(g: np.ndarray, q: np.ndarray, cell: int = S) -> np.ndarray:
    B, C, h, w = g.shape
    out = np.zeros((B, C, h * cell, w * cell))
    for b in range(B):
        for py in range(h * cell):
            for px in range(w * cell):
                for k, sy, sx in candidates(py, px, h, w, cell):
                    out[b, :, py, px] += q[b, k, py, px] * g[b, :, sy, sx]
    return out


def slow_pool_and_asam(f: np.ndarray, q: np.ndarray, cell: int = S) -> tuple[np.ndarray, np.ndarray]:
    """P_Q[f] and the ASAM from their definitions: sums over pixels of products of associations."""
    B, C, H, W = f.shape
    h, w = H // cell, W // cell
    num = np.zeros((B, C, h, w))
    z = np.zeros((B, h, w))
    n = np.zeros((B, 25, h, w))
    for b in range(B):
        for py in range(H):
            for px in range(W):
                cands = list(candidates(py, px, h, w, cell))
                for k, sy, sx in cands:
                    v = q[b, k, py, px]
                    num[b, :, sy, sx] += v * f[b, :, py, px]
                    z[b, sy, sx] += v
                    for l, ty, tx in cands:  # noqa: E741
                        j = (ty - sy + 2) * 5 + (tx - sx + 2)
                        n[b, j, sy, sx] += v * q[b, l, py, px]
    den = z[:, None] + EPS * cell * cell
    return num / den, n / den


def slow_drm(z: np.ndarray, wk: np.ndarray) -> np.ndarray:
    """Each source cell s sends wk[k](s) * z(s) to cell s - o_k."""
    B, C, h, w = z.shape
    out = np.zeros_like(z)
    for b in range(B):
        for sy in range(h):
            for sx in range(w):
                for k in range(9):
                    ty, tx = sy - (k // 3 - 1), sx - (k % 3 - 1)
                    if 0 <= ty < h and 0 <= tx < w:
                        out[b, :, ty, tx] += wk[b, k, sy, sx] * z[b, :, sy, sx]
    return out


@pytest.fixture(scope="module")
def small():
    b, h, w, c = 2, 3, 5, 3
    q = random_psam(b, h, w)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    f = torch.randn(b, c, h * S, w * S, generator=gen, dtype=torch.float64)
    pooled, a = slow_pool_and_asam(f.numpy(), q.numpy())
    return dict(q=q, g=g, f=f, up=slow_upsample(g.numpy(), q.numpy()), pooled=pooled, asam=a)


def maxerr(x: torch.Tensor, y) -> float:
    return float((x - torch.as_tensor(y, dtype=x.dtype)).abs().max())


def test_upsample_matches_loops(small):
    assert maxerr(psam_upsample(small["g"], small["q"], S), small["up"]) <= TOL


def test_pool_matches_loops(small):
    assert maxerr(psam_pool(small["f"], small["q"], S), small["pooled"]) <= TOL


def test_asam_matches_loops(small):
    a = asam(small["q"], S)
    assert a.shape == (2, 25, 3, 5)
    assert maxerr(a, small["asam"]) <= TOL


def test_reference_forms_match(small):
    q, g, f = small["q"], small["g"], small["f"]
    assert maxerr(ref.psam_upsample_reference(g, q, S), small["up"]) <= TOL
    assert maxerr(ref.psam_pool_reference(f, q, S), small["pooled"]) <= TOL
    assert maxerr(ref.asam_reference(q, S), small["asam"]) <= TOL
    a = asam(q, S)
    assert maxerr(ref.walk_step_reference(g, a), walk_step(g, a)) <= TOL
    assert maxerr(ref.asam_reference(q, S, renormalize=True), asam(q, S, renormalize=True)) <= TOL


def test_reference_forms_match_at_cell_16():
    q = random_psam(1, 6, 7, cell=16, seed=3)
    g = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    f = torch.randn(1, 4, 96, 112, dtype=torch.float64)
    assert maxerr(psam_upsample(g, q), ref.psam_upsample_reference(g, q)) <= TOL
    assert maxerr(psam_pool(f, q), ref.psam_pool_reference(f, q)) <= TOL
    assert maxerr(asam(q), ref.asam_reference(q)) <= TOL


def test_walk_step_is_pool_of_upsample(small):
    q, g = small["q"], small["g"]
    a = asam(q, S)
    assert maxerr(walk_step(g, a), psam_pool(psam_upsample(g, q, S), q, S)) <= TOL


def test_walk_step_matches_loops():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    a = torch.rand(2, 25, 4, 6, generator=gen, dtype=torch.float64)
    slow = np.zeros(g.shape)
    for b in range(2):
        for y in range(4):
            for x in range(6):
                for j in range(25):
                    ty, tx = y + j // 5 - 2, x + j % 5 - 2
                    if 0 <= ty < 4 and 0 <= tx < 6:
                        slow[b, :, y, x] += a[b, j, y, x].item() * g[b, :, ty, tx].numpy()
    for form in ("stencil", "unfold"):  # the CPU and the CUDA default
        assert maxerr(walk_step(g, a, form=form), slow) <= TOL
    with pytest.raises(ValueError, match="walk form"):
        walk_step(g, a, form="dense")


def test_asam_rows_sum_to_one_inside_and_less_at_border():
    q = random_psam(1, 6, 7, seed=4)
    rows = asam(q, S).sum(1)[0]
    # a cell's pixels, and the pixels of its 8 neighbours, see only in-grid candidates when it is 2 cells from the border
    assert float((rows[2:-2, 2:-2] - 1).abs().max()) <= TOL
    assert float(rows.max()) <= 1 + TOL
    border = torch.ones_like(rows, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert bool((rows[border] < 1 - 1e-3).all())  # random PSAMs lose real mass near the border
    renorm = asam(q, S, renormalize=True).sum(1)
    assert float((renorm - 1).abs().max()) <= TOL


def test_pool_is_normalised_adjoint_of_upsample(small):
    """<U g, f * m>_pixels = <g, P[f] * Z> with Z the per-cell association mass: P = diag(1/Z) U^T."""
    q, g, f = small["q"], small["g"], small["f"]
    z = _mass(q)
    lhs = (psam_upsample(g, q, S) * f).sum(dim=(2, 3))
    rhs = (g * psam_pool(f, q, S, eps=0.0) * z).sum(dim=(2, 3))
    assert maxerr(lhs, rhs) <= TOL * float(lhs.abs().max())


def _mass(q: torch.Tensor) -> torch.Tensor:
    """Z(s) = sum_p q(p, s), by upsampling unit impulses (independent of psam_pool)."""
    b, _, H, W = q.shape
    h, w = H // S, W // S
    z = torch.zeros(b, 1, h, w, dtype=q.dtype)
    for y in range(h):
        for x in range(w):
            e = torch.zeros(b, 1, h, w, dtype=q.dtype)
            e[:, :, y, x] = 1
            z[:, :, y, x] = psam_upsample(e, q, S).sum(dim=(1, 2, 3)).view(b, 1)
    return z


def test_drm_matches_loops_and_reference():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    wk = torch.softmax(torch.randn(2, 9, 4, 5, generator=gen, dtype=torch.float64), 1)
    slow = slow_drm(z.numpy(), wk.numpy())
    assert maxerr(drm_redistribute(z, wk), slow) <= TOL
    assert maxerr(ref.drm_redistribute_reference(z, wk), slow) <= TOL


def test_drm_preserves_mass_away_from_border():
    gen = torch.Generator().manual_seed(6)
    wk = torch.softmax(torch.randn(1, 9, 6, 6, generator=gen, dtype=torch.float64), 1)
    z = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    z[:, :, 1:-1, 1:-1] = torch.rand(1, 2, 4, 4, generator=gen, dtype=torch.float64)  # sources away from the border
    out = drm_redistribute(z, wk)
    assert maxerr(out.sum(dim=(2, 3)), z.sum(dim=(2, 3))) <= TOL
    z_edge = torch.zeros_like(z)
    z_edge[:, :, 0, 0] = 1
    assert float(drm_redistribute(z_edge, wk).sum()) < 2 - 1e-3  # the corner loses what it sends off-grid


def test_random_walk_multi_is_incremental_and_exact():
    q = random_psam(1, 4, 4, seed=7)
    a = asam(q, S)
    g = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    out = random_walk_multi(g, a, [3, 0, 1, 3])
    assert sorted(out) == [0, 1, 3]
    assert maxerr(out[0], g) == 0 and out[0] is not g
    expect = g
    for t in range(4):
        if t in out:
            assert maxerr(out[t], expect) <= TOL
            assert maxerr(random_walk(g, a, t), expect) <= TOL
        expect = psam_pool(psam_upsample(expect, q, S), q, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_batch_and_no_mutation(dtype):
    q = random_psam(3, 2, 3, seed=8).to(dtype)
    g = torch.rand(3, 4, 2, 3, dtype=dtype)
    f = torch.rand(3, 4, 2 * S, 3 * S, dtype=dtype)
    q0, g0, f0 = q.clone(), g.clone(), f.clone()
    outs = [psam_upsample(g, q, S), psam_pool(f, q, S), asam(q, S), walk_step(g, asam(q, S))]
    outs.append(drm_redistribute(g, q[:, :, :2, :3].contiguous()))
    assert all(o.dtype == dtype for o in outs)
    assert torch.equal(q, q0) and torch.equal(g, g0) and torch.equal(f, f0)
    # non-contiguous inputs (a transposed view) work too
    qt = random_psam(1, 3, 3, seed=9).to(dtype).transpose(-1, -2)
    assert maxerr(psam_pool(qt[:, :1], qt, S), psam_pool(qt[:, :1].contiguous(), qt.contiguous(), S)) <= 1e-6
    # each image of the batch is processed on its own
    single = psam_pool(f[1:2], q[1:2], S)
    assert maxerr(outs[1][1:2], single) <= 1e-5


def test_gradcheck():
    q_logits = torch.randn(1, 9, 2 * 2, 3 * 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    f = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    wk = torch.randn(1, 9, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(q_logits, g, f, wk):
        q = torch.softmax(q_logits, 1)
        a = asam(q, 2)
        return (
            psam_upsample(g, q, 2).sum()
            + (psam_pool(f, q, 2) ** 2).sum()
            + (walk_step(g, a) ** 2).sum()
            + (drm_redistribute(g, torch.softmax(wk, 1)) ** 2).sum()
        )

    assert torch.autograd.gradcheck(fn, (q_logits, g, f, wk))


def test_check_psam_rejects_bad_inputs():
    q = random_psam(1, 2, 2)
    check_psam(q, S)
    with pytest.raises(ValueError, match="sum to 1"):
        check_psam(q * 1.1, S)
    with pytest.raises(ValueError, match="multiple of the cell size"):
        check_psam(q[:, :, :-1], S)
    with pytest.raises(ValueError, match=r"\(B, 9, H, W\)"):
        check_psam(q[:, :8], S)
    with pytest.raises(ValueError, match="multiple of the cell size"):
        psam_pool(torch.zeros(1, 1, 7, 8), torch.zeros(1, 9, 7, 8), S)
    with pytest.raises(ValueError, match="grid map"):
        psam_upsample(torch.zeros(1, 1, 3, 3), q, S)


def test_pad_to_multiple():
    x = torch.ones(1, 2, 5, 7)
    y, size = pad_to_multiple(x, 4)
    assert y.shape == (1, 2, 8, 8) and size == (5, 7)
    assert float(y[:, :, :5, :7].min()) == 1 and float(y.sum()) == 70
    same, size = pad_to_multiple(torch.ones(1, 1, 8, 4), 4)
    assert same.shape == (1, 1, 8, 4) and size == (8, 4)


def test_drm_replicate_border_changes_only_the_border_cells():
    z = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    w = torch.softmax(torch.randn(2, 9, 6, 7, dtype=torch.float64), dim=1)
    zero, replicate = drm_redistribute(z, w), drm_redistribute(z, w, border="replicate")
    assert torch.equal(zero[..., 1:-1, 1:-1], replicate[..., 1:-1, 1:-1])
    assert not torch.allclose(zero, replicate)
    # a border cell now also receives from the copies of itself and its border neighbours outside the grid
    padded_z = torch.nn.functional.pad(z, (1, 1, 1, 1), mode="replicate")
    padded_w = torch.nn.functional.pad(w, (1, 1, 1, 1), mode="replicate")
    expected = sum(
        padded_w[:, k, 1 + dy, 1 + dx, None] * padded_z[:, :, 1 + dy, 1 + dx]
        for k, (dy, dx) in enumerate((k // 3 - 1, k % 3 - 1) for k in range(9))
    )
    assert torch.allclose(replicate[..., 0, 0], expected, atol=1e-12)
    with pytest.raises(ValueError, match="border"):
        drm_redistribute(z, w, border="reflect")
