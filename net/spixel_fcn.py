"""SpixelNet (SpixelFCN ``SpixelNet1l_bn``): the stage-1 superpixel FCN that predicts the PSAM (docs/method.md §2.1).

Module and parameter names follow the published state dicts (docs/method.md §10), so ``Q_model_final.pth`` (a bare state dict) and
``SpixelNet_bsd_ckpt.tar`` (``{"state_dict": ...}``) load with :func:`load_spixel_weights`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

LEAKY_SLOPE = 0.1  # ref (SpixelFCN model_util): LeakyReLU(0.1) after every conv
KAIMING_A = 0.1  # ref: kaiming_normal_(weight, 0.1)
NUM_CANDIDATES = 9  # PSAM channels: the 3x3 candidate cells
INPUT_MULTIPLE = 16  # the encoder downsamples 4 times: inputs must be multiples of 2**4
UNUSED_HEADS = ("pred_mask1", "pred_mask2", "pred_mask3")  # present in published files, never used in forward


def conv(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> LeakyReLU(0.1); keys ``.0.weight``, ``.1.*``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


def deconv(c_in: int, c_out: int) -> nn.Sequential:
    """ConvTranspose2d 4x4 stride 2 (bias) -> LeakyReLU(0.1): doubles the resolution; keys ``.0.weight``, ``.0.bias``."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=True), nn.LeakyReLU(LEAKY_SLOPE))


def predict_mask(c_in: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, NUM_CANDIDATES, kernel_size=3, stride=1, padding=1, bias=True)


class SpixelNet(nn.Module):
    """U-Net style encoder-decoder producing a 9-channel softmax PSAM at full resolution.

    Input: (B, 3, H, W) ImageNet-normalised, H and W multiples of 16. Output: (B, 9, H, W) softmax over channel 1.
    About 2.29 M parameters (with the three unused heads).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv0a = conv(3, 16)
        self.conv0b = conv(16, 16)
        self.conv1a = conv(16, 32, stride=2)
        self.conv1b = conv(32, 32)
        self.conv2a = conv(32, 64, stride=2)
        self.conv2b = conv(64, 64)
        self.conv3a = conv(64, 128, stride=2)
        self.conv3b = conv(128, 128)
        self.conv4a = conv(128, 256, stride=2)
        self.conv4b = conv(256, 256)

        self.deconv3 = deconv(256, 128)
        self.conv3_1 = conv(256, 128)
        self.pred_mask3 = predict_mask(128)
        self.deconv2 = deconv(128, 64)
        self.conv2_1 = conv(128, 64)
        self.pred_mask2 = predict_mask(64)
        self.deconv1 = deconv(64, 32)
        self.conv1_1 = conv(64, 32)
        self.pred_mask1 = predict_mask(32)
        self.deconv0 = deconv(32, 16)
        self.conv0_1 = conv(32, 16)
        self.pred_mask0 = predict_mask(16)
        # the unused heads take no part in forward: keep them out of the optimizer and of gradient checks
        for name in UNUSED_HEADS:
            getattr(self, name).requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, a=KAIMING_A)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def convert_sync_batchnorm(self) -> SpixelNet:
        """Convert every BN layer (all have trainable statistics) to ``nn.SyncBatchNorm`` for DDP, in place.

        Parameters, buffers and their names are kept. Returns self.
        """
        return nn.SyncBatchNorm.convert_sync_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> PSAM (B, 9, H, W)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"SpixelNet expects (B, 3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[-2] % INPUT_MULTIPLE or x.shape[-1] % INPUT_MULTIPLE:
            raise ValueError(
                f"SpixelNet input {x.shape[-2]}x{x.shape[-1]} is not a multiple of {INPUT_MULTIPLE}; pad it"
            )
        c0 = self.conv0b(self.conv0a(x))
        c1 = self.conv1b(self.conv1a(c0))
        c2 = self.conv2b(self.conv2a(c1))
        c3 = self.conv3b(self.conv3a(c2))
        c4 = self.conv4b(self.conv4a(c3))
        d3 = self.conv3_1(torch.cat([c3, self.deconv3(c4)], 1))
        d2 = self.conv2_1(torch.cat([c2, self.deconv2(d3)], 1))
        d1 = self.conv1_1(torch.cat([c1, self.deconv1(d2)], 1))
        d0 = self.conv0_1(torch.cat([c0, self.deconv0(d1)], 1))
        return F.softmax(self.pred_mask0(d0), dim=1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"SpixelNet weights not found: {path}")
    from net.backbones import load_safetensors_file, load_torch_file  # here: timm is not needed to build SpixelNet

    if path.suffix == ".safetensors":
        return load_safetensors_file(path)
    raw = load_torch_file(path)  # an empty, truncated or pickled file: one ValueError line naming it
    # published layouts: bare state dict (Q_model_final.pth), {"state_dict": ...} (SpixelNet_bsd_ckpt.tar),
    # and this project's {"model": ...} (final weights of train_fcn)
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (optionally under 'state_dict' or 'model')")
    return raw


def load_spixel_weights(model: SpixelNet, path: str | Path) -> None:
    """Load SpixelNet weights tolerantly (docs/method.md §10).

    Unwraps ``state_dict`` (or ``model``), strips a ``module.`` prefix, accepts files without the unused heads
    ``pred_mask1..3``. Any other missing or unexpected key, or a shape mismatch, is an error naming the keys.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a SpixelNet state dict (e.g. a checkpoint of another architecture).
    """
    path = Path(path)
    state = _read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    optional = {k for k in own if k.split(".")[0] in UNUSED_HEADS}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatches {_short(shapes)}")
    if problems:
        raise ValueError(f"{path}: not a SpixelNet state dict: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)
    skipped = sorted(set(own) - set(state))
    if skipped:
        log.info(
            "%s: loaded; unused heads absent from the file keep their initial values (%d keys)", path, len(skipped)
        )


def _short(items: list[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return f"[{head}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


def build_spixel_fcn(weights: str | Path = "") -> SpixelNet:
    """A SpixelNet, randomly initialised or loaded from ``weights`` (put in eval mode when weights are given)."""
    model = SpixelNet()
    if weights:
        load_spixel_weights(model, weights)
        model.eval()
    return model
