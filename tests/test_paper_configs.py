"""scripts/configs/voc12.yaml and coco14.yaml hold the published code's settings (release 800c6d5) and build every
network of the pipeline on CPU (random weights, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from net.spixel_fcn import SpixelNet
from sp_cam.config import load_config
from sp_cam.models import build_classifier, build_fcn, build_segmenter, check_init_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("voc12", "coco14")
NUM_CLASSES = {"voc12": 20, "coco14": 80}
OFFLINE = ["cam.pretrained=", "spcam.pretrained=", "fcn.init=none", "seg.init=none"]  # random weights for the builds


def published_checklist(cfg) -> dict[str, object]:
    """The values of the published code's default checklist (docs/method.md §9) that a config holds."""
    return {
        "crop / resize range": (cfg.data.crop_size, cfg.data.resize_long_min, cfg.data.resize_long_max),
        "cell size": cfg.fcn.cell_size,
        "stage-1 optimizer": (cfg.fcn.lr, cfg.fcn.adam_beta1, cfg.fcn.adam_beta2, cfg.fcn.weight_decay),
        "stage-1 epochs / batch": (cfg.fcn.epochs, cfg.fcn.batch_size),
        "saliency binarisation": cfg.fcn.sal_threshold,
        "L_p constants": (cfg.fcn.pos_weight, cfg.fcn.recon_weight),
        "affinity-label thresholds": (cfg.fcn.th_bg, cfg.fcn.th_step, cfg.fcn.th_fg),
        "press / diff": (cfg.fcn.relu_t, cfg.fcn.interior_min_same, cfg.fcn.press_weight, cfg.fcn.diff_weight),
        "affinity warm-up": cfg.fcn.affinity_warmup,
        "stage-1 validation": (cfg.fcn.val_grid, cfg.fcn.val_walk_steps),
        "classifier backbones": (cfg.cam.backbone, cfg.spcam.backbone),
        "DRM widths": (cfg.spcam.drm_encoder_widths, cfg.spcam.drm_head_widths, cfg.spcam.drm_border),
        "SGD": tuple((c.lr, c.weight_decay, c.nesterov, c.momentum, c.poly_power) for c in (cfg.cam, cfg.spcam)),
        "lr multipliers": (cfg.spcam.classifier_lr_mult, cfg.spcam.drm_encoder_lr_mult, cfg.spcam.drm_head_lr_mult),
        "epochs / batch": tuple((c.epochs, c.batch_size) for c in (cfg.cam, cfg.spcam)),
        "EPS": tuple((c.alpha, c.tau) for c in (cfg.cam, cfg.spcam)),
        "in-training evaluation": (cfg.spcam.eval_t, cfg.spcam.eval_th, cfg.spcam.select),
        "final evaluation": (cfg.pseudo.scales, cfg.pseudo.flip, cfg.pseudo.t_list, cfg.pseudo.th_list),
        "stage-3 options": (
            cfg.pseudo.select,
            cfg.pseudo.renormalize_asam,
            cfg.pseudo.upsample,
            cfg.pseudo.ignore_band,
        ),
        "CAM export": (cfg.export.scales, cfg.export.flip),
    }


EXPECTED = {
    "crop / resize range": (512, 320, 640),
    "cell size": 16,
    "stage-1 optimizer": (5e-4, 0.9, 0.999, 0.0),
    "stage-1 epochs / batch": (150, 32),
    "saliency binarisation": 0.2,
    "L_p constants": (0.003, 0.005),
    "affinity-label thresholds": (0.05, 0.5, 0.05),
    "press / diff": (0.75, 15, 1.0, 2.0),
    "affinity warm-up": 0.7,
    "stage-1 validation": (12, 19),
    "classifier backbones": ("resnest50", "resnest50"),
    "DRM widths": ([32, 32, 64, 128, 128], [1024, 256, 128], "zero"),
    "SGD": ((0.01, 4e-5, True, "reference", 0.9),) * 2,
    "lr multipliers": (10.0, 10.0, 500.0),
    "epochs / batch": ((12, 32),) * 2,
    "EPS": ((0.5, 0.4),) * 2,
    "in-training evaluation": ([0, 20], [0.2, 0.3, 0.4], "gt"),
    "final evaluation": ([0.5, 1.0, 1.5, 2.0], True, [0, 20, 30, 40], [0.2, 0.3, 0.4]),
    "stage-3 options": ("gt", False, "psam", 0.0),
    "CAM export": ([0.5, 1.0, 1.5, 2.0], True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_config_is_the_published_setting(name):
    cfg = load_config(ROOT / "scripts" / "configs" / f"{name}.yaml")
    assert published_checklist(cfg) == EXPECTED
    assert Path(cfg.fcn.init).name == "SpixelNet_bsd_ckpt.tar"  # the published code always fine-tunes it
    assert cfg.fcn.mask_padding is False  # the published loss counts padded crop pixels
    assert cfg.data.eval_split == ("train" if name == "voc12" else "train_1000")  # GT selection as published
    seg = cfg.seg
    assert (seg.backbone, seg.batch_size, seg.crop_size, seg.lr, seg.momentum, seg.weight_decay) == (
        "resnet101",
        10,
        321,
        2.5e-4,
        0.9,
        5e-4,
    )
    assert (seg.head_lr_mult, seg.poly_power, seg.msc_scales, seg.eval_split) == (10.0, 0.9, [0.75, 0.5], "val")
    assert Path(seg.init).name == "deeplabv1_resnet101-coco.pth" and seg.gt_reference is False


@pytest.mark.parametrize("name", CONFIGS)
def test_missing_init_files_say_where_to_get_them(name):
    cfg = load_config(ROOT / "scripts" / "configs" / f"{name}.yaml", ["fcn.init=/nonexistent/SpixelNet_bsd_ckpt.tar"])
    with pytest.raises(FileNotFoundError, match=r"fcn.init=.*not found.*superpixel_fcn.*fcn.init=none"):
        check_init_file("fcn.init", cfg.fcn.init)
    with pytest.raises(FileNotFoundError, match=r"seg.init=.*deeplab-pytorch.*seg.init=named"):
        check_init_file("seg.init", "/nonexistent/deeplabv1_resnet101-coco.pth")


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_config_builds_every_network(name):
    cfg = load_config(ROOT / "scripts" / "configs" / f"{name}.yaml", OFFLINE)
    k = NUM_CLASSES[name]
    torch.manual_seed(0)
    cam = build_classifier(cfg.cam, "cam", k)
    spcam = build_classifier(cfg.spcam, "spcam", k)
    fcn = build_fcn(cfg.fcn)
    seg = build_segmenter(cfg.seg, k)
    assert isinstance(fcn, SpixelNet)
    block = spcam.backbone.layer4[0]  # the published ResNeSt layout (docs/decisions.md D21)
    assert isinstance(block.avd_last, nn.AvgPool2d) and block.avd_last.kernel_size == 3
    assert block.avd_last.stride == 1 and block.downsample[0].kernel_size == 1
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert cam.eval()(x).shape == (1, k + 1, 4, 4)
        q = fcn.eval()(x)
        assert spcam.eval()(x, q).shape == (1, k + 1, 4, 4)
        assert seg(torch.randn(1, 3, 65, 65)).shape == (1, k + 1, 9, 9)
