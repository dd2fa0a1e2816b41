"""Stage-1 loss: affinity labels and masks against loops, reconstruction on hand-made PSAMs, gradients, both modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from net.fcn_loss import FCNLoss, affinity_labels, affinity_masks, denormalize_rgb, rgb_to_lab
from net.psam import asam, psam_pool

S = 4


def own_cell_psam(b: int, h: int, w: int, cell: int = S, own: float = 1.0) -> torch.Tensor:
    """Every pixel associated with its own cell with weight ``own``, the rest spread evenly."""
    q = torch.full((b, 9, h * cell, w * cell), (1 - own) / 8, dtype=torch.float64)
    q[:, 4] = own
    return q


def test_affinity_labels_thresholds():
    # K = 3, one cell per case: bg (all low), certain class 2, uncertain (0.3), ambiguous (two classes high)
    scores = torch.tensor(
        [[0.01, 0.02, 0.0], [0.0, 0.9, 0.01], [0.3, 0.0, 0.0], [0.7, 0.6, 0.0], [0.8, 0.0, 0.039]], dtype=torch.float64
    )
    cam_sp = scores.T.reshape(1, 3, 1, 5)
    labels = affinity_labels(cam_sp, th_bg=0.05, th_step=0.5, th_fg=0.05)
    assert labels.tolist() == [[[0, 2, 4, 4, 1]]]  # 4 = K + 1 = ignore
    ignore = torch.tensor([[[False, True, False, False, False]]])
    assert affinity_labels(cam_sp, 0.05, 0.5, 0.05, ignore).tolist() == [[[0, 4, 4, 4, 1]]]


def test_affinity_masks_match_loops():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 4, 5), generator=gen)  # 3 = ignore
    same, diff = affinity_masks(labels, ignore_index=3)
    for b in range(2):
        for y in range(4):
            for x in range(5):
                for j in range(25):
                    ty, tx = y + j // 5 - 2, x + j % 5 - 2
                    other = int(labels[b, ty, tx]) if 0 <= ty < 4 and 0 <= tx < 5 else 0
                    me = int(labels[b, y, x])
                    known = me != 3 and other != 3
                    assert bool(same[b, j, y, x]) == (known and me == other)
                    assert bool(diff[b, j, y, x]) == (known and me != other)


def test_reconstruction_exact_for_cell_constant_labels():
    """A hard own-cell PSAM reconstructs cell-constant labels exactly; the position term is the distance to the cell
    centre of mass."""
    b, h, w = 1, 2, 3
    q = own_cell_psam(b, h, w)
    sal = torch.zeros(b, 1, h * S, w * S, dtype=torch.float64)
    sal[:, :, :S, :S] = 0.9  # one salient cell
    loss = FCNLoss(num_classes=2, cell_size=S, pos_weight=0.003, recon_weight=0.005)
    out = loss(q, torch.zeros(b, 3, h * S, w * S, dtype=torch.float64), sal)
    assert abs(float(out["sem"])) < 1e-6
    c = (S - 1) / 2  # mean coordinate inside a cell
    dist = sum(math.hypot(x - c, y - c) for y in range(S) for x in range(S)) * h * w
    assert float(out["pos"]) == pytest.approx(dist * 0.003 / S, rel=1e-6)
    assert float(out["total"]) == pytest.approx(0.005 * (float(out["sem"]) + float(out["pos"])), rel=1e-9)


def test_semantic_term_is_a_sum_over_pixels_divided_by_batch():
    q = own_cell_psam(2, 2, 2, own=0.5)
    sal = (torch.rand(2, 1, 8, 8, dtype=torch.float64) > 0.5).double()
    image = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    loss = FCNLoss(num_classes=1, cell_size=S)
    both = loss(q, image, sal)
    single = [loss(q[i : i + 1], image[i : i + 1], sal[i : i + 1]) for i in range(2)]
    assert float(both["sem"]) == pytest.approx((float(single[0]["sem"]) + float(single[1]["sem"])) / 2)
    # padding excluded: only valid pixels count
    valid = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    valid[:, :, :4] = 1
    assert float(loss(q, image, sal, valid=valid)["sem"]) < float(both["sem"])


def test_affinity_terms_by_hand():
    """Two classes split the grid in halves: diff sums the ASAM entries across the boundary, press the interior."""
    K, h, w = 2, 8, 10
    gen = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(1, 9, h * S, w * S, generator=gen, dtype=torch.float64) * 3, 1)
    cams = torch.zeros(1, K, h * S, w * S, dtype=torch.float64)
    cams[:, 0, :, : 5 * S] = 1.0
    cams[:, 1, :, 5 * S :] = 1.0
    cams[:, :, : 2 * S, : 2 * S] = 0.3  # an uncertain corner (ignored)
    # th_fg = 1: never ambiguous, so the mixed boundary cells keep their majority class
    loss = FCNLoss(num_classes=K, cell_size=S, th_bg=0.05, th_step=0.5, th_fg=1.0, relu_t=0.05, interior_min_same=15)
    zeros = torch.zeros(1, 1, h * S, w * S, dtype=torch.float64)
    out = loss(q, zeros.expand(1, 3, -1, -1), zeros, cams, None, True)
    a = asam(q, S)[0]
    pooled = psam_pool(cams, q, S)[0]
    lab = np.zeros((h, w), dtype=int)
    for y in range(h):
        for x in range(w):
            top = float(pooled[:, y, x].max())
            lab[y, x] = 3 if 0.05 < top <= 0.55 else (0 if top <= 0.05 else int(pooled[:, y, x].argmax()) + 1)
    assert lab[0, 0] == 3 and lab[5, 4] == 1 and lab[5, 5] == 2
    diff = press = 0.0
    for y in range(h):
        for x in range(w):
            n_same = 0
            for j in range(25):
                ty, tx = y + j // 5 - 2, x + j % 5 - 2
                other = lab[ty, tx] if 0 <= ty < h and 0 <= tx < w else 0
                if 3 in (other, lab[y, x]):
                    continue
                n_same += other == lab[y, x]
                if other != lab[y, x] and 0 <= ty < h and 0 <= tx < w:
                    diff += float(a[j, y, x])
            if n_same > 15:
                press += max(0.0, float(a[12, y, x]) - 0.05)
    assert press > 0 and diff > 0
    assert float(out["diff"]) == pytest.approx(diff, rel=1e-9)
    assert float(out["press"]) == pytest.approx(press, rel=1e-9)
    assert float(out["total"]) == pytest.approx(float(out["recon"]) + press + 2 * diff, rel=1e-9)


def test_gradients_reach_the_psam_in_both_modes():
    q_logits = torch.randn(2, 9, 16, 16, requires_grad=True)
    image = torch.randn(2, 3, 16, 16)
    sal = torch.rand(2, 1, 16, 16)
    cams = torch.rand(2, 3, 16, 16)
    for mode in ("saliency", "labels_only"):
        loss = FCNLoss(num_classes=3, cell_size=S, mode=mode, th_bg=0.0, th_step=0.1, th_fg=2.0)
        out = loss(torch.softmax(q_logits, 1), image, sal if mode == "saliency" else None, cams, None, True)
        q_logits.grad = None
        out["total"].backward()
        assert q_logits.grad is not None and float(q_logits.grad.abs().sum()) > 0
        assert "color" in out if mode == "labels_only" else "sem" in out
        assert all(torch.isfinite(v) for v in out.values())


def test_errors():
    loss = FCNLoss(num_classes=3, cell_size=S)
    q = own_cell_psam(1, 2, 2).float()
    with pytest.raises(ValueError, match="saliency"):
        loss(q, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="CAMs"):
        loss(q, torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8), use_affinity=True)
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        loss(q, torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 20, 8, 8), use_affinity=True)
    with pytest.raises(ValueError, match="mode"):
        FCNLoss(num_classes=3, mode="colour")


def test_rgb_to_lab_matches_skimage():
    from skimage.color import rgb2lab

    rgb = torch.rand(1, 3, 5, 7, dtype=torch.float64)
    rgb[0, :, 0, 0] = 0.0  # black hits the linear branch
    ours = rgb_to_lab(rgb)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - rgb2lab(rgb[0].permute(1, 2, 0).numpy())).max() < 1e-3
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(denormalize_rgb(torch.zeros(1, 3, 2, 2)), mean.expand(1, 3, 2, 2))
