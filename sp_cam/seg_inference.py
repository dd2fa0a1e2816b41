"""Inference of a segmentation network on one image: single scale, or multi-scale + flip (stage 4).

The logits of every pass are upsampled (bilinear) to the image size and turned into probabilities; the passes of a
multi-scale + flip run are averaged. Dense CRF (:mod:`sp_cam.crf`) refines the averaged probabilities.

Memory (``tools/benchmark.py --sections large``): the network's forward of the largest scale and the full-size
probabilities of the passes. ``max_side`` bounds both: an image whose longer side exceeds it is resized (bilinear,
antialiased, aspect kept) to that longer side, the passes run there, and the averaged probabilities are resized back
to (H, W) on the CPU at the end, so only the returned (K+1, H, W) float32 map is held at full size (84 B per pixel for
VOC's 21 classes, 0.94 GiB for 12 megapixels). :func:`seg_labels` returns the argmax without that map (12 B per pixel
and a chunk of classes of at most ``LABEL_CHUNK_BYTES``).
Exact savings at any size: the two passes of a flip pair are upsampled one after the other, and the sums are in place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sp_cam.inference import max_side_size, model_device, resize_to_max_side, upsample_maps

log = logging.getLogger(__name__)

LABEL_CHUNK_BYTES = 256 * 2**20  # :func:`upsampled_argmax` upsamples as many classes at once as fit in this


@torch.no_grad()
def seg_probs(
    model: nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    *,
    max_side: int = 0,
) -> torch.Tensor:
    """Class probabilities of one image, averaged over the passes.

    Args:
        model: ``x (B, 3, h, w) -> logits (B, K+1, h', w')`` in eval mode.
        image: (1, 3, H, W) ImageNet-normalised.
        scales: input scales (the image is resized bilinearly to ``round(H s) x round(W s)``).
        flip: add the horizontally flipped pass of every scale (batched with the unflipped one).
        max_side: 0 = off. An image whose longer side is above it runs at
            :func:`sp_cam.inference.max_side_size` (resized by :func:`sp_cam.inference.resize_to_max_side`) and the
            averaged probabilities are resized back to (H, W) (bilinear, on the CPU): exactly the probabilities of the
            resized image, upsampled. Logged.
    Returns:
        (K+1, H, W) float32 on the CPU, summing to 1 over the classes.
    """
    probs, size = _probs_at_max_side(model, image, scales, flip, max_side)
    return upsample_maps(probs, size)


@torch.no_grad()
def seg_labels(
    model: nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    *,
    max_side: int = 0,
) -> torch.Tensor:
    """``seg_probs(...).argmax(0)`` without the full-size (K+1, H, W) map (see :func:`upsampled_argmax`).

    Returns:
        (H, W) int64 class map on the CPU: the argmax of :func:`seg_probs` with the same arguments (up to the last
        bit where that map is resized in chunks, see :func:`upsampled_argmax`).
    """
    probs, size = _probs_at_max_side(model, image, scales, flip, max_side)
    return upsampled_argmax(probs, size)


def upsampled_argmax(probs: torch.Tensor, size: tuple[int, int], chunk_bytes: int = LABEL_CHUNK_BYTES) -> torch.Tensor:
    """Argmax over the classes of the bilinear upsampling of ``probs``, without the full-size map of every class.

    ``F.interpolate(probs[None], size, mode="bilinear", align_corners=False)[0].argmax(0)`` when the C maps at (H, W)
    fit in ``chunk_bytes``. Above it the classes are upsampled a chunk at a time and a later chunk wins only where it is
    strictly higher (ties go to the lower class, as ``argmax`` does); the running maximum and its index cost 12 B per
    pixel. The labels are then the same wherever the two best classes differ by more than float rounding: PyTorch's
    CPU resize may round the last bit of a chunk differently from that of all C maps (it has a kernel that vectorises
    across channels, chosen by the channel count and the size).

    Args:
        probs: (C, h, w) float.
        size: (H, W).
    Returns:
        (H, W) int64, on the device of ``probs``.
    """
    size = (int(size[0]), int(size[1]))
    per_class = probs.element_size() * size[0] * size[1]
    step = max(1, chunk_bytes // per_class)
    best = index = None
    for c in range(0, probs.shape[0], step):
        chunk = upsample_maps(probs[c : c + step], size)
        value, arg = chunk.max(0)
        del chunk
        if best is None:
            best, index = value, arg
            continue
        higher = value > best
        best = torch.where(higher, value, best)
        index = torch.where(higher, arg + c, index)
    if index is None:
        raise ValueError("upsampled_argmax: no classes")
    return index


def _probs_at_max_side(
    model: nn.Module, image: torch.Tensor, scales: Sequence[float], flip: bool, max_side: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(probabilities of the image at its inference size (K+1, h, w) on the CPU, the image's own size (H, W))."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape (1, 3, H, W), got {tuple(image.shape)}")
    if max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0 = off), got {max_side}")
    size = (int(image.shape[-2]), int(image.shape[-1]))
    run_size = max_side_size(size, max_side)
    if run_size == size:
        return _seg_probs(model, image, scales, flip), size
    log.info("image %dx%d is above max_side=%d: inference at %dx%d, probabilities resized back", *size, max_side,
             *run_size)  # fmt: skip
    small = resize_to_max_side(image.to(model_device(model), torch.float32), max_side)
    return _seg_probs(model, small, scales, flip), size


def _seg_probs(model: nn.Module, image: torch.Tensor, scales: Sequence[float], flip: bool) -> torch.Tensor:
    """:func:`seg_probs` at the image's own size: (K+1, H, W) float32 on the CPU."""
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
        logits = model(x).float()
        del x
        # the passes of a flip pair are upsampled one at a time: (K+1, H, W) each instead of (2, K+1, H, W) twice
        passes = _pass_probs(logits[0:1], size)
        if flip:
            passes += _pass_probs(logits[1:2], size).flip(-1)
        del logits
        if total is None:
            total = passes
        else:
            total += passes
        del passes
    count = len(scales) * (2 if flip else 1)
    return total.div_(count).cpu()


def _pass_probs(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, K+1, h, w) logits -> (K+1, H, W) probabilities (bilinear upsampling, then softmax)."""
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return torch.softmax(up, dim=1)[0]
