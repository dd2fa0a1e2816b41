"""Inference of a segmentation network on one image: single scale, or multi-scale + flip (stage 4).

The logits of every pass are upsampled (bilinear) to the image size and turned into probabilities; the passes of a
multi-scale + flip run are averaged. Dense CRF (:mod:`sp_cam.crf`) refines the averaged probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sp_cam.inference import model_device


@torch.no_grad()
def seg_probs(
    model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
) -> torch.Tensor:
    """Class probabilities of one image, averaged over the passes.

    Args:
        model: ``x (B, 3, h, w) -> logits (B, K+1, h', w')`` in eval mode.
        image: (1, 3, H, W) ImageNet-normalised.
        scales: input scales (the image is resized bilinearly to ``round(H s) x round(W s)``).
        flip: add the horizontally flipped pass of every scale (batched with the unflipped one).
    Returns:
        (K+1, H, W) float32 on the CPU, summing to 1 over the classes.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape (1, 3, H, W), got {tuple(image.shape)}")
    device = model_device(model)
    image = image.to(device, torch.float32)
    size = tuple(image.shape[-2:])
    total = None
    for s in scales:
        x = image
        if float(s) != 1.0:
            scaled = (max(1, round(size[0] * float(s))), max(1, round(size[1] * float(s))))
            x = F.interpolate(image, size=scaled, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        logits = F.interpolate(model(x).float(), size=size, mode="bilinear", align_corners=False)
        probs = torch.softmax(logits, dim=1)
        passes = probs[0] + probs[1].flip(-1) if flip else probs[0]
        total = passes if total is None else total + passes
    count = len(scales) * (2 if flip else 1)
    return (total / count).cpu()
