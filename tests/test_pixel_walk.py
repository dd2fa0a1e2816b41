"""Pixel-level random walk (IRN / AffinityNet baseline of the benchmark) against slow, obvious implementations."""

from __future__ import annotations

import math

import pytest
import torch

from sp_cam.pixel_walk import (
    PixelWalkConfig,
    dense_transition,
    dense_walk,
    disk_offsets,
    edge_affinity,
    feature_affinity,
    pixel_random_walk,
    sparse_walk,
    transition_weights,
)

H, W, R = 6, 7, 3  # radius 3 keeps the graph small: offsets up to 2 away


def test_disk_offsets() -> None:
    offs = disk_offsets(5)
    assert len(offs) == 69  # AffinityNet: 34 half-disk pairs, mirrored, plus self
    assert offs[0] == (0, 0) and len(set(offs)) == len(offs)
    assert all(dy * dy + dx * dx < 25 for dy, dx in offs)
    half = (len(offs) - 1) // 2
    assert all(offs[1 + half + i] == (-dy, -dx) for i, (dy, dx) in enumerate(offs[1 : 1 + half]))
    with pytest.raises(ValueError, match="radius"):
        disk_offsets(0)


def _slow_edge_affinity(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """Loops over pixels and offsets; a pair's affinity is computed from its half-disk end (as the fast form)."""
    offs = disk_offsets(radius)
    half = set(offs[1 : 1 + (len(offs) - 1) // 2])
    h, w = edge.shape
    out = torch.zeros(len(offs), h, w, dtype=edge.dtype)
    for r, (dy, dx) in enumerate(offs):
        for y in range(h):
            for x in range(w):
                ty, tx = y + dy, x + dx
                if not (0 <= ty < h and 0 <= tx < w):
                    continue
                if (dy, dx) == (0, 0):
                    out[r, y, x] = 1.0
                    continue
                (sy, sx), (ey, ex) = ((y, x), (dy, dx)) if (dy, dx) in half else ((ty, tx), (-dy, -dx))
                n = max(abs(ey), abs(ex))
                peak = max(float(edge[sy + round(ey * s / n), sx + round(ex * s / n)]) for s in range(n + 1))
                out[r, y, x] = 1.0 - peak
    return out


def test_edge_affinity_matches_loops() -> None:
    edge = torch.rand(H, W, dtype=torch.float64)
    torch.testing.assert_close(edge_affinity(edge, R), _slow_edge_affinity(edge, R), rtol=0, atol=1e-12)


def test_feature_affinity_matches_loops() -> None:
    feat = torch.randn(4, H, W, dtype=torch.float64)
    aff = feature_affinity(feat, R)
    for r, (dy, dx) in enumerate(disk_offsets(R)):
        for y in range(H):
            for x in range(W):
                ty, tx = y + dy, x + dx
                inside = 0 <= ty < H and 0 <= tx < W
                want = math.exp(-float((feat[:, y, x] - feat[:, ty, tx]).abs().mean())) if inside else 0.0
                assert abs(float(aff[r, y, x]) - want) < 1e-12


@pytest.mark.parametrize("form", ["edge", "feature"])
def test_transition_is_stochastic_and_reversible(form: str) -> None:
    guide = torch.rand(H, W, dtype=torch.float64) if form == "edge" else torch.randn(3, H, W, dtype=torch.float64)
    aff = edge_affinity(guide, R) if form == "edge" else feature_affinity(guide, R)
    beta = 4.0
    trans = dense_transition(aff, beta, R)
    assert trans.shape == (H * W, H * W) and float(trans.min()) >= 0
    torch.testing.assert_close(trans.sum(1), torch.ones(H * W, dtype=torch.float64))
    # T = D^-1 A^beta with A symmetric: D T is symmetric (detailed balance)
    degree = aff.pow(beta).sum(0).reshape(-1, 1)
    torch.testing.assert_close(degree * trans, (degree * trans).T)
    # no edges beyond the radius
    ys, xs = torch.div(torch.arange(H * W), W, rounding_mode="floor"), torch.arange(H * W) % W
    far = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2 >= R * R
    assert float(trans[far].abs().max()) == 0.0


def test_squaring_equals_repeated_matvec() -> None:
    edge = torch.rand(H, W, dtype=torch.float64)
    aff = edge_affinity(edge, R)
    trans = dense_transition(aff, 10.0, R)
    x = torch.rand(3, H, W, dtype=torch.float64)
    log_t = 4
    ref = x.reshape(3, -1).T
    for _ in range(2**log_t):
        ref = trans @ ref
    ref = ref.T.reshape(3, H, W)
    torch.testing.assert_close(dense_walk(x, trans, log_t), ref)
    torch.testing.assert_close(sparse_walk(x, transition_weights(aff, 10.0), 2**log_t, R), ref)
    # the published form: column-normalised A^beta, multiplied from the left by cam (C, N)
    a_beta = trans * aff.pow(10.0).sum(0).reshape(-1, 1)
    published = a_beta / a_beta.sum(0, keepdim=True)
    torch.testing.assert_close(
        (x.reshape(3, -1) @ torch.linalg.matrix_power(published, 2**log_t)).reshape(3, H, W), ref
    )


def test_walk_keeps_constants_and_agrees() -> None:
    cfg = PixelWalkConfig(radius=R, log_t=3)
    edge = torch.rand(H, W, dtype=torch.float64)
    ones = torch.ones(2, H, W, dtype=torch.float64)
    torch.testing.assert_close(pixel_random_walk(ones, edge, cfg, "dense"), ones)
    x = torch.rand(2, H, W, dtype=torch.float64)
    torch.testing.assert_close(pixel_random_walk(x, edge, cfg, "dense"), pixel_random_walk(x, edge, cfg, "sparse"))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="edge map"):
        edge_affinity(torch.rand(1, H, W))
    with pytest.raises(ValueError, match="affinity"):
        dense_transition(torch.rand(5, H, W), 10.0, R)
    with pytest.raises(ValueError, match="transition matrix"):
        dense_walk(torch.rand(2, H, W), torch.eye(3))
    with pytest.raises(ValueError, match="affinity must be one of"):
        pixel_random_walk(torch.rand(2, H, W), torch.rand(H, W), PixelWalkConfig(affinity="colour"))
    with pytest.raises(ValueError, match="method"):
        pixel_random_walk(torch.rand(2, H, W), torch.rand(H, W), PixelWalkConfig(radius=R), "fast")
