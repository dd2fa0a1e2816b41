"""BatchNorm with frozen statistics (docs/method.md §3.1): always normalise with the running statistics, never update them.

The reference backbones keep every BN layer (including those inside ResNeSt's split attention) in "eval" behaviour
whatever the module's train/eval mode, while gamma and beta stay trainable. :func:`freeze_bn_stats` converts a built
network in place by swapping the class of each BN module, so parameter and buffer names (and therefore torchvision /
timm state dicts) are unchanged.

Caution: ``nn.SyncBatchNorm.convert_sync_batchnorm`` treats these modules as ordinary BN layers (they subclass
``nn.BatchNorm2d``) and would unfreeze them: convert only the modules that should synchronise (the DRM encoder, see
``SPCAMModel.convert_sync_batchnorm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn


def _frozen_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False); cannot freeze it")
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that uses its running statistics in train and eval mode alike; affine stays trainable.

    Shapes: x (B, C, H, W) -> (B, C, H, W).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frozen_batch_norm(self, x)


class FrozenStatsBatchNormAct2d(BatchNormAct2d):
    """timm ``BatchNormAct2d`` (BN, drop, activation; EfficientNet) with frozen statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(_frozen_batch_norm(self, x)))


def freeze_bn_stats(module: nn.Module) -> nn.Module:
    """Make every BatchNorm2d of ``module`` use frozen statistics, in place; returns ``module``.

    Plain ``nn.BatchNorm2d`` becomes :class:`FrozenStatsBatchNorm2d`, timm's ``BatchNormAct2d`` becomes
    ``FrozenStatsBatchNormAct2d``. Parameters, buffers and their names are kept (the class is swapped on the object).

    Raises:
        ValueError: for a BN variant this function does not know (it would silently keep updating statistics).
    """
    for name, m in module.named_modules():
        if isinstance(m, (FrozenStatsBatchNorm2d, FrozenStatsBatchNormAct2d)):
            continue
        if type(m) is nn.BatchNorm2d:
            m.__class__ = FrozenStatsBatchNorm2d
        elif type(m) is BatchNormAct2d:
            m.__class__ = FrozenStatsBatchNormAct2d
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"freeze_bn_stats: unsupported BatchNorm type {type(m).__name__} at {name!r}")
    return module


def freeze_bn_affine(module: nn.Module) -> nn.Module:
    """Stop training gamma and beta of every BatchNorm of ``module`` (``requires_grad=False``), in place; returns it.

    With :func:`freeze_bn_stats` each BN becomes a fixed per-channel affine map, as in deeplab-pytorch, whose BN layers
    stay in eval mode and whose optimizer groups hold no BN parameter.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(False)
    return module
