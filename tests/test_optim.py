import pytest
import torch

from sp_cam.config import ClassifierConfig
from sp_cam.models import build_classifier
from sp_cam.optim import build_optimizer

K = 2


def _cfg(**kw) -> ClassifierConfig:
    return ClassifierConfig(backbone="tiny", drm_encoder_widths=[4, 4, 4, 8, 8], drm_head_widths=[8], **kw)


def test_group_lrs_and_weight_decay_follow_the_reference_table():
    model = build_classifier(_cfg(), "spcam", K)
    opt, _ = build_optimizer(model, _cfg(), total_steps=100)
    got = [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert got == [
        ("backbone_weights", pytest.approx(0.01), 4e-5),
        ("backbone_biases", pytest.approx(0.02), 0.0),
        ("classifier", pytest.approx(0.1), 4e-5),
        ("drm_encoder_weights", pytest.approx(0.1), 4e-5),
        ("drm_encoder_biases", pytest.approx(0.2), 0.0),
        ("drm_head_weights", pytest.approx(5.0), 4e-5),
        ("drm_head_biases", pytest.approx(10.0), 0.0),
    ]
    assert all(g["nesterov"] for g in opt.param_groups)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_config_multipliers_are_used():
    cfg = _cfg(lr=0.1, classifier_lr_mult=3.0, drm_encoder_lr_mult=4.0, drm_head_lr_mult=7.0)
    opt, _ = build_optimizer(build_classifier(cfg, "spcam", K), cfg, total_steps=10)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["classifier"] == pytest.approx(0.3)
    assert lrs["drm_encoder_biases"] == pytest.approx(0.8)
    assert lrs["drm_head_weights"] == pytest.approx(0.7)


def test_poly_decay():
    cfg = _cfg(poly_power=0.9)
    model = build_classifier(cfg, "cam", K)
    opt, sched = build_optimizer(model, cfg, total_steps=10)
    base = [g["lr"] for g in opt.param_groups]
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    for step in range(1, 12):
        opt.step()
        sched.step()
        factor = max(0.0, 1 - min(step, 10) / 10) ** 0.9
        for g, b in zip(opt.param_groups, base, strict=True):
            assert g["lr"] == pytest.approx(b * factor, abs=1e-12)
    assert opt.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize("mode, momentum", [("reference", 4e-5), ("intended", 0.9)])
def test_momentum_modes(mode, momentum):
    cfg = _cfg(momentum=mode)
    opt, _ = build_optimizer(build_classifier(cfg, "cam", K), cfg, total_steps=5)
    assert all(g["momentum"] == pytest.approx(momentum) for g in opt.param_groups)


def test_momentum_errors_name_the_key():
    with pytest.raises(ValueError, match="spcam.momentum: unknown value 'adam'"):
        build_optimizer(build_classifier(_cfg(), "spcam", K), _cfg(momentum="adam"), total_steps=5)
    with pytest.raises(ValueError, match="cam.momentum: unknown value"):
        build_optimizer(build_classifier(_cfg(), "cam", K), _cfg(momentum="x"), total_steps=5)
    # reference momentum = weight decay; with no weight decay Nesterov has no momentum to work with
    with pytest.raises(ValueError, match="cam.nesterov=true needs momentum > 0"):
        build_optimizer(build_classifier(_cfg(), "cam", K), _cfg(weight_decay=0.0), total_steps=5)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        build_optimizer(build_classifier(_cfg(), "cam", K), _cfg(), total_steps=0)


def test_frozen_backbone_is_not_optimised():
    cfg = _cfg(freeze_backbone=True)
    opt, _ = build_optimizer(build_classifier(cfg, "cam", K), cfg, total_steps=5)
    assert [g["name"] for g in opt.param_groups] == ["classifier"]
