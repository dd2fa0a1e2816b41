import pytest
import torch
from torch import nn

from net.backbones import build_backbone
from net.classifiers import CAMModel, SPCAMModel, build_classifier
from net.cls_losses import eps_saliency_loss, multilabel_loss
from net.frozen_bn import FrozenStatsBatchNorm2d
from sp_cam.config import ClassifierConfig
from sp_cam.optim import build_optimizer

K = 3
ENC = [4, 4, 8, 8, 8]
HEAD = [16, 8]


def _cfg(**kw) -> ClassifierConfig:
    return ClassifierConfig(backbone="tiny", drm_encoder_widths=ENC, drm_head_widths=HEAD, **kw)


def build(kind: str, **kw):
    return build_classifier(kind, K, "tiny", encoder_widths=ENC, head_widths=HEAD, **kw)


def _psam(b: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(b, 9, h, w).softmax(dim=1)


def _batch(b: int = 2, size: int = 64):
    x = torch.randn(b, 3, size, size)
    labels = torch.zeros(b, K)
    labels[0, 0] = labels[1, 2] = labels[1, 1] = 1
    sal = torch.rand(b, 1, size // 16, size // 16)
    return x, labels, sal


def _spcam() -> SPCAMModel:
    return build("spcam")


def test_forward_shapes():
    x = torch.randn(2, 3, 64, 96)
    cam = build("cam")
    assert isinstance(cam, CAMModel) and cam.model_type == "cam"
    assert cam(x).shape == (2, K + 1, 4, 6)
    sp = _spcam()
    assert sp.model_type == "spcam"
    assert sp(x, _psam(2, 64, 96)).shape == (2, K + 1, 4, 6)
    with pytest.raises(ValueError, match="psam must have shape"):
        sp(x, _psam(2, 32, 96))
    with pytest.raises(ValueError, match="unknown model type"):
        build("irn")


def test_reference_module_names_and_widths():
    sp = SPCAMModel(build_backbone("tiny"), 20)
    keys = set(sp.state_dict())
    for k in (
        "classifier.weight",
        "get_qfeats.0.0.weight",
        "get_qfeats.0.1.running_var",
        "get_qfeats.4.1.weight",
        "get_tran_conv.0.0.weight",
        "get_tran_conv.3.0.bias",
    ):
        assert k in keys, k
    assert "classifier.bias" not in keys and "get_qfeats.0.0.bias" not in keys
    c0 = sp.get_qfeats[0][0]
    assert (c0.dilation, c0.padding, c0.padding_mode) == ((16, 16), (16, 16), "circular")
    assert sp.get_tran_conv[0][0].weight.shape == (1024, 32 + 128, 3, 3)
    assert sp.get_tran_conv[3][0].weight.shape == (18, 128, 1, 1)
    assert sp.classifier.weight.shape == (21, 32, 1, 1)


def _losses(model, x, labels, sal, psam=None):
    out = model(x) if psam is None else model(x, psam)
    return multilabel_loss(out, labels) + 0.5 * eps_saliency_loss(out, sal, labels, 0.4)


@pytest.mark.parametrize("model_type", ["cam", "spcam"])
def test_backward_reaches_every_trainable_parameter(model_type):
    model = build(model_type).train()
    x, labels, sal = _batch()
    psam = _psam(2, 64, 64) if model_type == "spcam" else None
    _losses(model, x, labels, sal, psam).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_drm_head_sees_detached_features():
    sp = _spcam()
    x5 = sp.backbone(torch.randn(1, 3, 64, 64))
    w_bg, w_fg = sp.kernels(x5, _psam(1, 64, 64))
    (w_bg[:, 0] * 3 + w_fg[:, 4]).sum().backward()
    assert all(p.grad is None for p in sp.backbone.parameters())
    assert sp.get_tran_conv[0][0].weight.grad is not None and sp.get_qfeats[0][0].weight.grad is not None


def test_spcam_output_is_redistribution_of_cam_logits():
    """Slow loop: SP(t) = sum_k W_k(t + o_k) z(t + o_k), bg channel with W^bg, fg channels with W^fg."""
    sp = _spcam().eval()
    x, psam = torch.randn(1, 3, 48, 64), _psam(1, 48, 64)
    with torch.no_grad():
        out = sp(x, psam)
        x5 = sp.backbone(x)
        z = sp.classifier(x5)
        w_bg, w_fg = sp.kernels(x5, psam)
    h, w = z.shape[-2:]
    expect = torch.zeros_like(z)
    for c in range(K + 1):
        wk = w_bg if c == 0 else w_fg
        for ty in range(h):
            for tx in range(w):
                for k in range(9):
                    sy, sx = ty + k // 3 - 1, tx + k % 3 - 1
                    if 0 <= sy < h and 0 <= sx < w:
                        expect[0, c, ty, tx] += wk[0, k, sy, sx] * z[0, c, sy, sx]
    assert torch.allclose(out, expect, atol=1e-5)
    assert torch.allclose(w_bg.sum(1), torch.ones(1, h, w)) and torch.allclose(w_fg.sum(1), torch.ones(1, h, w))


def test_fcn_under_no_grad_gets_no_gradient():
    fcn = nn.Sequential(nn.Conv2d(3, 9, 3, padding=1), nn.Softmax(dim=1))
    sp = _spcam().train()
    x, labels, sal = _batch()
    with torch.no_grad():
        psam = fcn(x)
    assert not psam.requires_grad
    _losses(sp, x, labels, sal, psam).backward()
    assert all(p.grad is None for p in fcn.parameters())
    assert sp.get_qfeats[0][0].weight.grad is not None


def _groups_by_param(model):
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, tuple[str, float, bool]] = {}
    for g in model.param_groups(10.0, 10.0, 500.0):
        for p in g["params"]:
            assert names[id(p)] not in seen, f"{names[id(p)]} in two groups"
            seen[names[id(p)]] = (g["name"], g["lr_mult"], g["weight_decay"])
    return seen


def test_param_groups_cover_each_parameter_once_with_reference_multipliers():
    sp = _spcam()
    seen = _groups_by_param(sp)
    assert set(seen) == {n for n, p in sp.named_parameters() if p.requires_grad}
    assert seen["backbone.layer0.0.weight"] == ("backbone_weights", 1.0, True)
    assert seen["backbone.layer0.1.weight"] == ("backbone_weights", 1.0, True)  # BN gamma with the weights (ref)
    assert seen["backbone.layer0.1.bias"] == ("backbone_biases", 2.0, False)
    assert seen["classifier.weight"] == ("classifier", 10.0, True)
    assert seen["get_qfeats.0.0.weight"] == ("drm_encoder_weights", 10.0, True)
    assert seen["get_qfeats.3.1.weight"] == ("drm_encoder_weights", 10.0, True)
    assert seen["get_qfeats.3.1.bias"] == ("drm_encoder_biases", 20.0, False)
    assert seen["get_tran_conv.0.0.weight"] == ("drm_head_weights", 500.0, True)
    assert seen["get_tran_conv.2.0.bias"] == ("drm_head_biases", 1000.0, False)
    cam = build("cam")
    assert [g["name"] for g in cam.param_groups()] == ["backbone_weights", "backbone_biases", "classifier"]
    assert set(_groups_by_param(cam)) == {n for n, _ in cam.named_parameters()}


def test_freeze_backbone_excludes_it_from_groups_and_gradients():
    sp = build("spcam", freeze_backbone=True)
    assert all(not p.requires_grad for p in sp.backbone.parameters())
    seen = _groups_by_param(sp)
    assert not any(n.startswith("backbone.") for n in seen)
    assert set(seen) == {n for n, p in sp.named_parameters() if p.requires_grad}
    x, labels, sal = _batch()
    _losses(sp, x, labels, sal, _psam(2, 64, 64)).backward()
    assert sp.classifier.weight.grad is not None


def test_train_step_keeps_backbone_bn_statistics_and_updates_drm_bn():
    sp = _spcam().train()
    bb_before = {k: v.clone() for k, v in sp.backbone.state_dict().items() if "running" in k}
    enc_before = sp.get_qfeats[1][1].running_mean.clone()
    opt, sched = build_optimizer(sp, _cfg(), total_steps=10)
    x, labels, sal = _batch()
    opt.zero_grad()
    _losses(sp, x, labels, sal, _psam(2, 64, 64)).backward()
    opt.step()
    sched.step()
    for k, v in sp.backbone.state_dict().items():
        if "running" in k:
            assert torch.equal(v, bb_before[k]), k
    assert not torch.equal(sp.get_qfeats[1][1].running_mean, enc_before)  # ordinary trainable-statistics BN


def test_convert_sync_batchnorm_touches_only_the_encoder():
    sp = _spcam().convert_sync_batchnorm()
    assert isinstance(sp.get_qfeats[0][1], nn.SyncBatchNorm)
    assert all(
        isinstance(m, FrozenStatsBatchNorm2d)
        for m in sp.backbone.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )


def test_split_first_head_conv_equals_the_concatenated_conv():
    """The kernel head's first conv runs as two convs on weight slices; it must equal one conv on concat[x5, E(Q)]."""
    torch.manual_seed(0)
    model = SPCAMModel(build_backbone("tiny"), 5, [4, 4, 4, 4, 8], [16, 8]).double()
    x5 = torch.randn(2, model.backbone.out_channels, 4, 4, dtype=torch.float64)
    psam = torch.softmax(torch.randn(2, 9, 64, 64, dtype=torch.float64), dim=1)
    w_bg, w_fg = model.kernels(x5, psam)
    k = model.get_tran_conv(torch.cat([x5, model.get_qfeats(psam)], dim=1))
    assert torch.allclose(w_bg, torch.softmax(k[:, :9], dim=1), atol=1e-12)
    assert torch.allclose(w_fg, torch.softmax(k[:, 9:], dim=1), atol=1e-12)
