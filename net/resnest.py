"""The published SP-CAM ResNeSt layout at output stride 16 (docs/method.md §3.1), made from timm's stride-32 ResNeSt.

The reference builds the official ResNeSt (zhanghang1989/ResNeSt ``resnet.py``: deep stem, avg-down shortcuts,
``radix=2``, ``avd=True``, ``avd_first=False``) with ``dilated=False, dilation=2``. Only layer4 differs from the
stride-32 network; timm's ``resnest50d`` / ``resnest101e`` are the same network under the same parameter names
(timm's ImageNet files for them are the official ``resnest50-528c19ca`` / ``resnest101-22405ba7``).

Layer4 of the published layout, input (B, 1024, h, w) -> (B, 2048, h, w), h = H/16:

* block 0: 1x1 conv; split-attention 3x3 conv with stride 1, dilation 1, padding 1; then the avd pool
  ``AvgPool2d(3, stride=1, padding=1)`` (kept although the block no longer downsamples: a 3x3 blur); 1x1 conv.
  Shortcut: ``AvgPool2d(kernel_size=1, stride=1, ceil_mode=True, count_include_pad=False)`` (an identity), 1x1 conv,
  BN.
* blocks 1..: split-attention 3x3 conv with stride 1, dilation 2, padding 2; no avd pool, identity shortcut.

timm's own ``output_stride=16`` variant (kept as ``resnest50d_timm`` / ``resnest101e_timm`` in
:mod:`net.backbones`) has the same convolutions but no avd pool in block 0 and a 2x2 "same" average pool
(``AvgPool2dSame(2, stride=1)``, zero padding on the right and bottom) in the shortcut; with equal (random) weights
its layer4 output differs from the published one by 20-27 % (relative L2, 128-256 px inputs).
"""

from __future__ import annotations

from timm.models.resnest import ResNestBottleneck
from torch import nn

LAYER4_DILATION = 2  # official ResNet(dilated=False, dilation=2): layer4 blocks after the first use dilation 2
# official Bottleneck: avd_layer = AvgPool2d(3, stride, padding=1), with stride 1 once the stage no longer downsamples
AVD_KERNEL = 3
AVD_PADDING = 1
# official _make_layer, avg_down shortcut of a dilated stage: AvgPool2d(kernel_size=1, stride=1, ceil_mode=True,
# count_include_pad=False)
SHORTCUT_POOL_KERNEL = 1
STRIDE32_AVD_STRIDE = 2  # what timm builds at output stride 32 (the input this module expects)


def _published_shortcut_pool() -> nn.AvgPool2d:
    return nn.AvgPool2d(kernel_size=SHORTCUT_POOL_KERNEL, stride=1, ceil_mode=True, count_include_pad=False)


def _set_dilation(conv: nn.Conv2d, dilation: int, where: str) -> None:
    if conv.padding_mode != "zeros" or conv.kernel_size != (3, 3) or conv.stride != (1, 1):
        raise ValueError(f"{where}: expected a zero-padded stride-1 3x3 conv, got {conv}")
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)  # keeps the spatial size of a 3x3 kernel


def to_published_os16(model: nn.Module) -> nn.Module:
    """Turn layer4 of a timm ResNeSt built at output stride 32 into the published OS16 layout, in place.

    Only strides, dilations, paddings and two parameter-free pools change, so the parameters (names and tensors) are
    untouched and timm / official ResNeSt state dicts load as before.

    Args:
        model: timm ``resnest50d`` or ``resnest101e`` created without ``output_stride`` (stride 32).
    Returns:
        ``model``; its features become (B, 3, H, W) -> (B, 2048, H/16, W/16).
    Raises:
        ValueError: a model that is not a stride-32 timm ResNeSt with avg-down shortcuts and ``avd_first=False``
            (e.g. one already built with ``output_stride=16``).
    """
    layer4 = getattr(model, "layer4", None)
    if not isinstance(layer4, nn.Sequential) or not all(isinstance(b, ResNestBottleneck) for b in layer4):
        raise ValueError("to_published_os16: expected a timm ResNeSt (layer4 of ResNestBottleneck blocks)")
    first = layer4[0]
    avd = first.avd_last
    if first.avd_first is not None or not isinstance(avd, nn.AvgPool2d) or avd.stride != STRIDE32_AVD_STRIDE:
        raise ValueError(
            "to_published_os16: layer4.0 must have timm's stride-2 avd_last pool (a model built at output stride 32 "
            f"with avd_first=False), got avd_first={first.avd_first}, avd_last={avd}"
        )
    down = first.downsample
    if not isinstance(down, nn.Sequential) or type(down[0]) is not nn.AvgPool2d:
        raise ValueError(f"to_published_os16: layer4.0.downsample must start with an AvgPool2d (avg-down), got {down}")

    first.avd_last = nn.AvgPool2d(AVD_KERNEL, stride=1, padding=AVD_PADDING)
    down[0] = _published_shortcut_pool()
    _set_dilation(first.conv2.conv, 1, "layer4.0.conv2.conv")
    for i, block in enumerate(layer4[1:], start=1):
        if block.avd_last is not None or block.downsample is not None:
            raise ValueError(f"to_published_os16: layer4.{i} should have no avd pool and an identity shortcut")
        _set_dilation(block.conv2.conv, LAYER4_DILATION, f"layer4.{i}.conv2.conv")
    return model
