"""The published SP-CAM ResNeSt layout (official ResNeSt, ``dilated=False, dilation=2``) against timm's variants."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import AvgPool2dSame
from torch import nn

from net.backbones import build_backbone, load_backbone_state_dict
from net.resnest import to_published_os16

RADIX = 2  # ResNeSt-50/101: radix 2, cardinality 1
RESNEST50_PARAMS = 25_434_240  # timm resnest50d without its ImageNet fc (2048 x 1000 + 1000)


@pytest.fixture(scope="module")
def published() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnest50").eval()


def _pool_spec(pool: nn.AvgPool2d) -> tuple:
    return type(pool), pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad


def _conv_spec(conv: nn.Conv2d) -> tuple:
    return conv.kernel_size, conv.stride, conv.dilation, conv.padding


def test_layer4_first_block_structure(published):
    block = published.layer4[0]
    assert _conv_spec(block.conv1) == ((1, 1), (1, 1), (1, 1), (0, 0))
    assert _conv_spec(block.conv2.conv) == ((3, 3), (1, 1), (1, 1), (1, 1))
    assert _conv_spec(block.conv3) == ((1, 1), (1, 1), (1, 1), (0, 0))
    assert block.avd_first is None
    # official avd_layer: AvgPool2d(3, stride, padding=1), stride 1 here since the stage does not downsample
    assert _pool_spec(block.avd_last) == (nn.AvgPool2d, 3, 1, 1, False, True)
    # official avg-down shortcut of a dilated stage: AvgPool2d(kernel_size=1, stride=1, ceil_mode, no pad count)
    assert _pool_spec(block.downsample[0]) == (nn.AvgPool2d, 1, 1, 0, True, False)
    assert _conv_spec(block.downsample[1]) == ((1, 1), (1, 1), (1, 1), (0, 0))


@pytest.mark.parametrize("index", [1, 2])
def test_layer4_later_blocks_structure(published, index):
    block = published.layer4[index]
    assert _conv_spec(block.conv2.conv) == ((3, 3), (1, 1), (2, 2), (2, 2))
    assert block.avd_first is None and block.avd_last is None and block.downsample is None


def test_timm_variant_differs_in_pools_only():
    timm16 = build_backbone("resnest50d_timm")
    block = timm16.layer4[0]
    assert block.avd_last is None  # timm drops the stride-1 avd pool ...
    assert isinstance(block.downsample[0], AvgPool2dSame) and block.downsample[0].kernel_size == (2, 2)  # ... and blurs
    assert _conv_spec(block.conv2.conv) == ((3, 3), (1, 1), (1, 1), (1, 1))
    assert _conv_spec(timm16.layer4[1].conv2.conv) == ((3, 3), (1, 1), (2, 2), (2, 2))


def test_layers_before_layer4_are_timms_stride32(published):
    ref = timm.create_model("resnest50d")
    for name in ("conv1", "layer1", "layer2", "layer3"):
        ours = [(n, repr(m)) for n, m in getattr(published, name).named_modules() if not list(m.children())]
        theirs = [(n, repr(m)) for n, m in getattr(ref, name).named_modules() if not list(m.children())]
        assert [n for n, _ in ours] == [n for n, _ in theirs], name
        for (n, a), (_, b) in zip(ours, theirs, strict=True):
            assert a.replace("FrozenStatsBatchNorm2d", "BatchNorm2d") == b, (name, n)


def test_parameter_count_and_os16_shape(published):
    assert sum(p.numel() for p in published.parameters()) == RESNEST50_PARAMS
    ref = timm.create_model("resnest50d", num_classes=0)
    assert RESNEST50_PARAMS == sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        y = published(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 2048, 4, 6)


def _up_to_layer3(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for name in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"):
        x = getattr(model, name)(x)
    return x


def test_timm_state_dict_loads_and_matches_timm_up_to_layer3(published):
    torch.manual_seed(1)
    ref = timm.create_model("resnest50d").eval()
    state = ref.state_dict()  # random, with its ImageNet fc, which the loader drops
    load_backbone_state_dict(published, state, "timm resnest50d")
    own = published.state_dict()
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(own[k], state[k]) for k in own)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = _up_to_layer3(published, x), _up_to_layer3(ref, x)
    assert torch.allclose(ours, theirs, atol=1e-5)


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _split_attention(x: torch.Tensor, sa: nn.Module, dilation: int) -> torch.Tensor:
    y = F.relu(_bn(F.conv2d(x, sa.conv.weight, padding=dilation, dilation=dilation, groups=RADIX), sa.bn0))
    parts = y.chunk(RADIX, dim=1)
    gap = sum(parts).mean(dim=(2, 3), keepdim=True)
    attn = F.conv2d(F.relu(_bn(F.conv2d(gap, sa.fc1.weight, sa.fc1.bias), sa.bn1)), sa.fc2.weight, sa.fc2.bias)
    attn = attn.view(x.shape[0], RADIX, -1, 1, 1).softmax(dim=1)
    return sum(attn[:, r] * parts[r] for r in range(RADIX))


def _published_block(x: torch.Tensor, block: nn.Module, first: bool) -> torch.Tensor:
    """Official ResNeSt Bottleneck of layer4 with dilated=False, dilation=2, written out with explicit geometry."""
    out = F.relu(_bn(F.conv2d(x, block.conv1.weight), block.bn1))
    out = _split_attention(out, block.conv2, dilation=1 if first else 2)
    if first:
        out = F.avg_pool2d(out, 3, stride=1, padding=1)  # avd_layer, count_include_pad=True
    out = _bn(F.conv2d(out, block.conv3.weight), block.bn3)
    if first:
        pooled = F.avg_pool2d(x, 1, stride=1, ceil_mode=True, count_include_pad=False)
        shortcut = _bn(F.conv2d(pooled, block.downsample[1].weight), block.downsample[2])
    else:
        shortcut = x
    return F.relu(out + shortcut)


def test_layer4_equals_hand_written_published_forward_and_differs_from_timm():
    torch.manual_seed(2)
    ours = build_backbone("resnest50").double().eval()
    for m in ours.modules():  # non-trivial BN statistics and affine
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    timm16 = build_backbone("resnest50d_timm").double().eval()
    timm16.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1024, 9, 7, dtype=torch.float64).relu()
    with torch.no_grad():
        y = ours.layer4(x)
        h = x
        for i, block in enumerate(ours.layer4):
            h = _published_block(h, block, first=i == 0)
        y_timm = timm16.layer4(x)
    assert y.shape == (2, 2048, 9, 7)
    assert torch.allclose(y, h, rtol=1e-9, atol=1e-10)
    assert (y - y_timm).norm() / y.norm() > 0.05  # same weights, another function


def test_rejects_models_not_at_stride_32():
    with pytest.raises(ValueError, match="layer4.0 must have timm's stride-2 avd_last"):
        to_published_os16(timm.create_model("resnest14d", output_stride=16))
    with pytest.raises(ValueError, match="expected a timm ResNeSt"):
        to_published_os16(timm.create_model("resnet18"))
