import math

import pytest
import torch

from net.cls_losses import eps_saliency_loss, multilabel_loss

LN3 = math.log(3.0)


def _two_cells() -> torch.Tensor:
    """K = 1, grid 1x2: cell 0 P = (0.75, 0.25), cell 1 P = (0.25, 0.75)."""
    return torch.tensor([[[[LN3, 0.0]], [[0.0, LN3]]]])


def test_multilabel_loss_by_hand():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = torch.tensor([[1.0, 3.0], [-1.0, 1.0]])  # GAP 1.0
    logits[0, 2] = -2.0
    logits[1, 1] = 0.5
    logits[1, 2] = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # GAP 1.0
    logits[:, 0] = 100.0  # background is not in the loss
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def bce(x, y):
        s = 1 / (1 + math.exp(-x))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    expect = ((bce(1.0, 1) + bce(-2.0, 0)) / 2 + (bce(0.5, 0) + bce(1.0, 1)) / 2) / 2
    assert multilabel_loss(logits, labels).item() == pytest.approx(expect, rel=1e-6)


def test_eps_loss_valid_class_by_hand():
    # round(P_1) = (0, 1), round(sal) = (0, 1): overlap 1 > tau -> valid. fg = P_1, bg = 1 - P_0 = P_1.
    sal = torch.tensor([[[[0.2, 0.9]]]])
    loss = eps_saliency_loss(_two_cells(), sal, torch.tensor([[1.0]]), tau=0.4)
    assert loss.item() == pytest.approx(((0.25 - 0.2) ** 2 + (0.75 - 0.9) ** 2) / 2, rel=1e-5)


def test_eps_loss_invalid_class_by_hand():
    # round(sal) = (1, 0): overlap 0 -> the present class is invalid: fg = 0, bg = 1 - (P_0 + P_1) = 0.
    sal = torch.tensor([[[[0.9, 0.2]]]])
    loss = eps_saliency_loss(_two_cells(), sal, torch.tensor([[1.0]]), tau=0.4)
    assert loss.item() == pytest.approx((0.9**2 + 0.2**2) / 2, rel=1e-5)


def test_eps_loss_absent_class_by_hand():
    # absent class: fg = 0, bg = 1 - P_0 = (0.25, 0.75) -> s = (0.125, 0.375).
    sal = torch.tensor([[[[0.2, 0.9]]]])
    loss = eps_saliency_loss(_two_cells(), sal, torch.tensor([[0.0]]), tau=0.4)
    assert loss.item() == pytest.approx(((0.125 - 0.2) ** 2 + (0.375 - 0.9) ** 2) / 2, rel=1e-5)


def test_eps_loss_tau_threshold():
    # round(P_1) = (1, 1), round(sal) = (0, 1): overlap = 1 / (2 + 1e-4) ~ 0.49998 -> valid at tau 0.4, not at 0.5.
    logits = torch.tensor([[[[0.0, 0.0]], [[LN3, LN3]]]])
    sal = torch.tensor([[[[0.1, 0.9]]]])
    valid = eps_saliency_loss(logits, sal, torch.tensor([[1.0]]), tau=0.4)
    invalid = eps_saliency_loss(logits, sal, torch.tensor([[1.0]]), tau=0.5)
    assert valid.item() == pytest.approx(((0.75 - 0.1) ** 2 + (0.75 - 0.9) ** 2) / 2, rel=1e-5)
    assert invalid.item() == pytest.approx((0.1**2 + 0.9**2) / 2, rel=1e-5)


def _slow_eps(logits, sal, labels, tau):
    B, C, h, w = logits.shape
    p = logits.softmax(1)
    total = 0.0
    for b in range(B):
        valid = []
        for c in range(1, C):
            num = sum(round(p[b, c, y, x].item()) * round(sal[b, 0, y, x].item()) for y in range(h) for x in range(w))
            den = sum(round(p[b, c, y, x].item()) for y in range(h) for x in range(w)) + 1e-4
            valid.append(num / den > tau)
        for y in range(h):
            for x in range(w):
                fg = sum(p[b, c, y, x].item() for c in range(1, C) if labels[b, c - 1] > 0 and valid[c - 1])
                inv = sum(p[b, c, y, x].item() for c in range(1, C) if labels[b, c - 1] > 0 and not valid[c - 1])
                bg = 1 - (p[b, 0, y, x].item() + inv)
                total += (0.5 * fg + 0.5 * bg - sal[b, 0, y, x].item()) ** 2
    return total / (B * h * w)


def test_eps_loss_matches_slow_loops():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 4, 5, generator=g) * 3
    sal = torch.rand(3, 1, 4, 5, generator=g)
    labels = (torch.rand(3, 4, generator=g) > 0.4).float()
    for tau in (0.0, 0.4, 0.8):
        assert eps_saliency_loss(logits, sal, labels, tau).item() == pytest.approx(
            _slow_eps(logits, sal, labels, tau), rel=1e-5
        )


def test_eps_loss_valid_mask_and_gradient():
    logits = _two_cells().requires_grad_(True)
    sal = torch.tensor([[[[0.2, 0.9]]]])
    mask = torch.tensor([[[[0.0, 1.0]]]])
    loss = eps_saliency_loss(logits, sal, torch.tensor([[1.0]]), tau=0.4, valid=mask)
    assert loss.item() == pytest.approx((0.75 - 0.9) ** 2, rel=1e-5)
    loss.backward()
    assert logits.grad is not None and logits.grad[..., 0].abs().sum() == 0 and logits.grad[..., 1].abs().sum() > 0


def test_loss_shape_errors():
    logits = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        multilabel_loss(logits, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="saliency must have shape"):
        eps_saliency_loss(logits, torch.zeros(2, 1, 6, 6), torch.zeros(2, 3), 0.4)
