"""The two stage-2 classifiers: the EPS CAM baseline (docs/method.md §3.0) and SP-CAM with the DRM (docs/method.md §3.2).

Shape shorthand: B batch, K foreground classes (channel 0 of every score map is the background), H x W input
(multiples of 16), h = H/16, w = W/16 the superpixel grid, C backbone channels.

Module names follow the reference (docs/method.md §10) so released classifier state dicts can be mapped: ``classifier``,
``get_qfeats.<i>.{0,1}``, ``get_tran_conv.<i>.0``. The backbone lives under ``backbone`` (reference: ``model``, with a
duplicate ``stage1..stage5`` key family). To load a reference checkpoint: drop the ``stage*`` keys and rename the
prefix ``model.`` to ``backbone.``. The reference builds ResNeSt with the official ResNeSt module names, which timm's
``resnest50d`` keeps (``conv1.0``, ``layerN.i.conv2.{conv,bn0,fc1,bn1,fc2}``, ``downsample.{1,2}``); not checked on a
released file (none was available).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from net.backbones import build_backbone
from net.psam import CELL_SIZE, drm_redistribute

NUM_CANDIDATES = 9  # 3x3 neighbour cells of the PSAM and of the DRM kernel (docs/method.md §0)
LEAKY_SLOPE = 0.1  # ref: LeakyReLU(0.1) in get_qfeats conv blocks and get_tran_conv
PSAM_DILATION = 16  # ref: first encoder conv samples the same position in neighbouring cells
BIAS_LR_FACTOR = 2.0  # ref get_parameter_groups: biases at 2x the lr of their weights, no weight decay
DEFAULT_CLASSIFIER_LR_MULT = 10.0  # ref train.py
DEFAULT_DRM_ENCODER_LR_MULT = 10.0  # ref 800c6d5 (docs/decisions.md D2)
DEFAULT_DRM_HEAD_LR_MULT = 500.0  # ref 800c6d5 (docs/decisions.md D2)
DEFAULT_ENCODER_WIDTHS = (32, 32, 64, 128, 128)  # ref get_qfeats
DEFAULT_HEAD_WIDTHS = (1024, 256, 128)  # ref get_tran_conv

ParamGroup = dict[str, Any]


def _split_weights_biases(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of ``module`` split as the reference does: names ending in ``bias`` (conv biases, BN beta)
    vs the rest (conv weights, BN gamma)."""
    weights, biases = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    return weights, biases


def _group(name: str, params: list[nn.Parameter], lr_mult: float, weight_decay: bool) -> ParamGroup:
    return {"name": name, "params": params, "lr_mult": lr_mult, "weight_decay": weight_decay}


class CAMModel(nn.Module):
    """EPS CAM baseline: backbone + 1x1 classifier with a background channel (docs/method.md §3.0).

    forward: x (B, 3, H, W) ImageNet-normalised -> logits (B, K+1, h, w) (not upsampled).
    """

    model_type = "cam"

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes + 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def freeze_backbone(self) -> None:
        """Train only the heads: the backbone's parameters get ``requires_grad=False`` (left out of the groups)."""
        self.backbone.requires_grad_(False)

    def convert_sync_batchnorm(self) -> nn.Module:
        """Make the trainable-statistics BN layers synchronise across processes (DDP). The backbone's frozen BN is
        left alone. The CAM model has none; returns ``self``."""
        return self

    def param_groups(
        self,
        classifier_lr_mult: float = DEFAULT_CLASSIFIER_LR_MULT,
        drm_encoder_lr_mult: float = DEFAULT_DRM_ENCODER_LR_MULT,
        drm_head_lr_mult: float = DEFAULT_DRM_HEAD_LR_MULT,
    ) -> list[ParamGroup]:
        """Optimizer groups (docs/method.md §3.0): backbone weights x1 (wd), backbone biases x2 (no wd), classifier x mult (wd).

        The DRM multipliers are accepted for a uniform call and ignored. The reference's empty fourth group is
        omitted, and so is any group left empty by a frozen backbone.

        Returns:
            list of dicts ``{"name", "params", "lr_mult", "weight_decay": bool}``.
        """
        bw, bb = _split_weights_biases(self.backbone)
        groups = [
            _group("backbone_weights", bw, 1.0, True),
            _group("backbone_biases", bb, BIAS_LR_FACTOR, False),
            _group(
                "classifier", [p for p in self.classifier.parameters() if p.requires_grad], classifier_lr_mult, True
            ),
        ]
        return [g for g in groups if g["params"]]


class SPCAMModel(CAMModel):
    """SP-CAM classifier: backbone + classifier + DRM (PSAM encoder E, kernel head T, redistribution) (docs/method.md §3.2).

    forward: x (B, 3, H, W) ImageNet-normalised, psam (B, 9, H, W) from the frozen superpixel FCN (computed under
    ``torch.no_grad``) -> SP-CAM logits (B, K+1, h, w), one score per grid cell.
    """

    model_type = "spcam"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        encoder_widths: list[int] | tuple[int, ...] = DEFAULT_ENCODER_WIDTHS,
        head_widths: list[int] | tuple[int, ...] = DEFAULT_HEAD_WIDTHS,
        drm_border: str = "zero",
    ) -> None:
        super().__init__(backbone, num_classes)
        if drm_border not in ("zero", "replicate"):
            raise ValueError(f"drm_border must be 'zero' (ref) or 'replicate', got {drm_border!r}")
        self.drm_border = drm_border
        encoder_widths, head_widths = list(encoder_widths), list(head_widths)
        if len(encoder_widths) != 5 or min(encoder_widths) < 1:
            raise ValueError(f"drm_encoder_widths must be 5 positive ints (ref 32,32,64,128,128), got {encoder_widths}")
        if not head_widths or min(head_widths) < 1:
            raise ValueError(f"drm_head_widths must be positive ints (ref 1024,256,128), got {head_widths}")
        # E: dilated circular conv at full resolution, then four stride-2 conv blocks down to the grid.
        blocks: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(
                    NUM_CANDIDATES,
                    encoder_widths[0],
                    3,
                    padding=PSAM_DILATION,
                    dilation=PSAM_DILATION,
                    padding_mode="circular",
                    bias=False,
                ),
                nn.BatchNorm2d(encoder_widths[0]),
                nn.ReLU(inplace=True),
            )
        ]
        for cin, cout in zip(encoder_widths[:-1], encoder_widths[1:], strict=True):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
                )
            )
        self.get_qfeats = nn.Sequential(*blocks)
        # T: 3x3 convs with bias + LeakyReLU, then 1x1 -> 18 kernels + LeakyReLU (before the softmax; docs/decisions.md D16). No BN.
        widths = [backbone.out_channels + encoder_widths[-1], *head_widths]
        head: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        ]
        head.append(nn.Sequential(nn.Conv2d(widths[-1], 2 * NUM_CANDIDATES, 1), nn.LeakyReLU(LEAKY_SLOPE)))
        self.get_tran_conv = nn.Sequential(*head)

    def kernels(self, x5: torch.Tensor, psam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DRM kernels from [x5.detach(), E(psam)].

        Args:
            x5: (B, C, h, w) backbone features.
            psam: (B, 9, H, W).
        Returns:
            (w_bg, w_fg), each (B, 9, h, w), softmax over the 9 channels.
        """
        qf = self.get_qfeats(psam)
        if qf.shape[-2:] != x5.shape[-2:]:
            raise ValueError(
                f"PSAM {tuple(psam.shape)} gives a {tuple(qf.shape[-2:])} grid but the features are "
                f"{tuple(x5.shape[-2:])}; image and PSAM must have the same size, a multiple of {CELL_SIZE}"
            )
        # The first conv of T on concat[x5.detach(), qf], written as two convs on the slices of its one weight: the
        # same result and parameter names, but autograd then computes no input gradient for the 2048 detached
        # channels, which is most of the DRM's extra backward cost.
        conv, act = self.get_tran_conv[0]
        split = x5.shape[1]
        h = F.conv2d(x5.detach(), conv.weight[:, :split], conv.bias, padding=conv.padding)
        h = h + F.conv2d(qf, conv.weight[:, split:], None, padding=conv.padding)
        k = self.get_tran_conv[1:](act(h))
        # Channel order: the first 9 kernels serve the background, the last 9 all foreground classes (docs/method.md §3.2 step 4).
        return F.softmax(k[:, :NUM_CANDIDATES], dim=1), F.softmax(k[:, NUM_CANDIDATES:], dim=1)

    def forward(self, x: torch.Tensor, psam: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if psam.ndim != 4 or psam.shape[1] != NUM_CANDIDATES or psam.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"psam must have shape (B, 9, {x.shape[2]}, {x.shape[3]}), got {tuple(psam.shape)}")
        x5 = self.backbone(x)
        z = self.classifier(x5)
        w_bg, w_fg = self.kernels(x5, psam)
        bg = drm_redistribute(z[:, :1], w_bg, self.drm_border)
        return torch.cat([bg, drm_redistribute(z[:, 1:], w_fg, self.drm_border)], dim=1)

    def convert_sync_batchnorm(self) -> nn.Module:
        """Convert the PSAM encoder's BN layers (trainable statistics) to ``nn.SyncBatchNorm`` for DDP; returns self.

        Do not call ``nn.SyncBatchNorm.convert_sync_batchnorm`` on the whole model: it would also convert (and
        unfreeze) the backbone's frozen-statistics BN.
        """
        self.get_qfeats = nn.SyncBatchNorm.convert_sync_batchnorm(self.get_qfeats)
        return self

    def param_groups(
        self,
        classifier_lr_mult: float = DEFAULT_CLASSIFIER_LR_MULT,
        drm_encoder_lr_mult: float = DEFAULT_DRM_ENCODER_LR_MULT,
        drm_head_lr_mult: float = DEFAULT_DRM_HEAD_LR_MULT,
    ) -> list[ParamGroup]:
        """Optimizer groups of docs/method.md §3.5 (the reference's empty "other biases" group omitted, empty groups dropped).

        Returns:
            backbone weights x1 (wd), backbone biases x2, classifier x classifier_lr_mult (wd), E weights x
            drm_encoder_lr_mult (wd), E biases x 2*drm_encoder_lr_mult, T weights x drm_head_lr_mult (wd),
            T biases x 2*drm_head_lr_mult; biases without weight decay.
        """
        groups = super().param_groups(classifier_lr_mult)
        ew, eb = _split_weights_biases(self.get_qfeats)
        tw, tb = _split_weights_biases(self.get_tran_conv)
        groups += [
            _group("drm_encoder_weights", ew, drm_encoder_lr_mult, True),
            _group("drm_encoder_biases", eb, BIAS_LR_FACTOR * drm_encoder_lr_mult, False),
            _group("drm_head_weights", tw, drm_head_lr_mult, True),
            _group("drm_head_biases", tb, BIAS_LR_FACTOR * drm_head_lr_mult, False),
        ]
        return [g for g in groups if g["params"]]


MODEL_TYPES = ("cam", "spcam")


def build_classifier(
    model_type: str,
    num_classes: int,
    backbone: str,
    pretrained: str = "",
    *,
    freeze_backbone: bool = False,
    encoder_widths: list[int] | tuple[int, ...] = DEFAULT_ENCODER_WIDTHS,
    head_widths: list[int] | tuple[int, ...] = DEFAULT_HEAD_WIDTHS,
    drm_border: str = "zero",
) -> CAMModel:
    """Build the stage-A or stage-2 classifier.

    Args:
        model_type: ``"cam"`` or ``"spcam"``.
        num_classes: K, the number of foreground classes.
        backbone: a name of :data:`net.backbones.BACKBONE_NAMES`.
        pretrained: backbone weights, see :func:`net.backbones.build_backbone` (``""`` random init).
        freeze_backbone: train only the heads.
        encoder_widths, head_widths, drm_border: the DRM of the SP-CAM model (ignored for ``cam``).
    Returns:
        :class:`CAMModel` or :class:`SPCAMModel`.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    features = build_backbone(backbone, pretrained)
    if model_type == "cam":
        model: CAMModel = CAMModel(features, num_classes)
    else:
        model = SPCAMModel(features, num_classes, encoder_widths, head_widths, drm_border)
    if freeze_backbone:
        model.freeze_backbone()
    return model
