"""Training and inference transforms (ref: PuzzleCAM augmentation as used by SP-CAM, docs/method.md §1.3 and 4 step 1).

Training, applied jointly to the image, the saliency map and any extra per-pixel maps (e.g. CAMs):
random long-side resize (image bicubic, saliency nearest, maps bilinear) -> horizontal flip (p = 0.5) -> ImageNet
normalisation of the image -> random crop with zero padding to a square canvas, with a ``valid`` mask of the real pixels.
All randomness comes from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.classes import IGNORE_INDEX
from net.imagenet import IMAGENET_MEAN, IMAGENET_STD
from net.psam import CELL_SIZE

FLIP_PROB = 0.5  # ref: RandomHorizontalFlip p = 0.5
_CV_MAX_CHANNELS = 128  # cv2.resize fails on arrays with many channels (200 fails with OpenCV 5), so maps go in chunks


def normalize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32, ``(x / 255 - mean) / std``."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalised -> same shape in [0, 1] (for visualisation)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised."""
    return torch.from_numpy(np.ascontiguousarray(normalize(image).transpose(2, 0, 1)))


def long_side_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(H', W') with the longer side equal to ``long_side``, aspect kept, sides rounded (at least 1)."""
    scale = long_side / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def resize_sample(
    image: np.ndarray, saliency: np.ndarray | None, maps: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Resize jointly to ``size`` = (H', W'): image bicubic, saliency nearest, maps bilinear.

    Args:
        image: (H, W, 3) uint8. saliency: (H, W) uint8 or None. maps: (H, W, C) float32 or None.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image, saliency, maps
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    if saliency is not None:
        saliency = np.asarray(Image.fromarray(saliency).resize((w, h), Image.NEAREST))
    if maps is not None:
        maps = _resize_maps(maps, (h, w))
    return image, saliency, maps


def _resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float32 -> (H', W', C) with OpenCV bilinear (ref), in chunks (cv2 takes fewer than 256 channels per call)."""
    h, w = size
    chunks = [
        cv2.resize(np.ascontiguousarray(maps[..., i : i + _CV_MAX_CHANNELS]), (w, h), interpolation=cv2.INTER_LINEAR)
        for i in range(0, maps.shape[2], _CV_MAX_CHANNELS)
    ]
    chunks = [c[..., None] if c.ndim == 2 else c for c in chunks]
    return np.concatenate(chunks, axis=2) if chunks else np.zeros((h, w, 0), dtype=np.float32)


def random_resize_long(
    image: np.ndarray,
    saliency: np.ndarray | None,
    maps: np.ndarray | None,
    long_range: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Draw an integer L uniformly in ``[min, max]`` (inclusive) and resize so that the longer side is L."""
    lo, hi = long_range
    if lo < 1 or hi < lo:
        raise ValueError(f"resize_long range must satisfy 1 <= min <= max, got {long_range}")
    long_side = int(rng.integers(lo, hi + 1))
    return resize_sample(image, saliency, maps, long_side_size(*image.shape[:2], long_side))


def random_flip(
    image: np.ndarray, saliency: np.ndarray | None, maps: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Flip all inputs horizontally together with probability ``FLIP_PROB``."""
    if rng.random() >= FLIP_PROB:
        return image, saliency, maps
    return (
        image[:, ::-1],
        None if saliency is None else saliency[:, ::-1],
        None if maps is None else maps[:, ::-1],
    )


@dataclass
class CropBox:
    """Where a crop takes its pixels: source window ``[src_y:src_y+h, src_x:src_x+w]`` pasted at ``(dst_y, dst_x)``."""

    src_y: int
    src_x: int
    dst_y: int
    dst_x: int
    h: int
    w: int


def random_crop_box(h: int, w: int, crop_size: int, rng: np.random.Generator) -> CropBox:
    """A random window when a side is longer than ``crop_size``, a random offset inside the canvas when shorter."""

    def axis(n: int) -> tuple[int, int, int]:
        space = n - crop_size
        if space > 0:
            return int(rng.integers(0, space + 1)), 0, crop_size
        return 0, int(rng.integers(0, -space + 1)), n

    sy, dy, ch = axis(h)
    sx, dx, cw = axis(w)
    return CropBox(src_y=sy, src_x=sx, dst_y=dy, dst_x=dx, h=ch, w=cw)


def random_crop_pad(
    image: np.ndarray,
    saliency: np.ndarray | None,
    maps: np.ndarray | None,
    crop_size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Crop / zero-pad jointly to ``crop_size`` x ``crop_size``.

    Padding is 0 everywhere: image 0 after normalisation (the mean colour, ref), maps 0 (ref), saliency 0 (docs/decisions.md D5;
    the reference pads dim maps with 255).

    Args:
        image: (H, W, 3) float32 normalised. saliency: (H, W) uint8 or None. maps: (H, W, C) float32 or None.
    Returns:
        image (S, S, 3), saliency (S, S) or None, maps (S, S, C) or None, valid (S, S) float32 (1 = real pixel).
    """
    box = random_crop_box(image.shape[0], image.shape[1], crop_size, rng)

    def crop(x: np.ndarray) -> np.ndarray:
        out = np.zeros((crop_size, crop_size) + x.shape[2:], dtype=x.dtype)
        out[box.dst_y : box.dst_y + box.h, box.dst_x : box.dst_x + box.w] = x[
            box.src_y : box.src_y + box.h, box.src_x : box.src_x + box.w
        ]
        return out

    valid = np.zeros((crop_size, crop_size), dtype=np.float32)
    valid[box.dst_y : box.dst_y + box.h, box.dst_x : box.dst_x + box.w] = 1.0
    return crop(image), None if saliency is None else crop(saliency), None if maps is None else crop(maps), valid


# -------------------------------------------------------------------- segmentation training (stage 4)


def random_scale_pair(
    image: np.ndarray, label: np.ndarray, scales: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image and label by a factor drawn from ``scales`` (deeplab-pytorch: image bilinear, label nearest).

    Args:
        image: (H, W, 3) uint8. label: (H, W) uint8 class indices (255 = ignore).
    Returns:
        (int(H s), int(W s), 3) and (int(H s), int(W s)).
    """
    s = float(scales[int(rng.integers(len(scales)))])
    h, w = max(1, int(image.shape[0] * s)), max(1, int(image.shape[1] * s))
    return (
        cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR),
        cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST),
    )


def flip_pair(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip image and label horizontally together with probability ``FLIP_PROB``."""
    if rng.random() >= FLIP_PROB:
        return image, label
    return image[:, ::-1], label[:, ::-1]


def crop_pad_pair(
    image: np.ndarray, label: np.ndarray, crop_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``crop_size`` square crop; the padding of a smaller image is the mean colour (0 after normalisation) in
    the image and ``IGNORE_INDEX`` in the label (deeplab-pytorch).

    Args:
        image: (H, W, 3) float32 normalised. label: (H, W) uint8.
    Returns:
        (S, S, 3) float32, (S, S) uint8.
    """
    box = random_crop_box(image.shape[0], image.shape[1], crop_size, rng)
    out_image = np.zeros((crop_size, crop_size, 3), dtype=image.dtype)
    out_label = np.full((crop_size, crop_size), IGNORE_INDEX, dtype=label.dtype)
    src = (slice(box.src_y, box.src_y + box.h), slice(box.src_x, box.src_x + box.w))
    dst = (slice(box.dst_y, box.dst_y + box.h), slice(box.dst_x, box.dst_x + box.w))
    out_image[dst] = image[src]
    out_label[dst] = label[src]
    return out_image, out_label


# -------------------------------------------------------------------- inference


def padded_size(h: int, w: int, scale: float, cell_size: int = CELL_SIZE) -> tuple[tuple[int, int], tuple[int, int]]:
    """Target and padded sizes of a scale (docs/method.md §4 step 1).

    Returns:
        ``(round(H*s), round(W*s))`` (Python rounding, as the reference) and the same rounded up to multiples of
        ``cell_size``.
    """
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    return (th, tw), (math.ceil(th / cell_size) * cell_size, math.ceil(tw / cell_size) * cell_size)


def inference_inputs(
    image: torch.Tensor, scale: float, cell_size: int = CELL_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier and superpixel-FCN inputs of one scale (docs/method.md §4 step 1, docs/decisions.md D17).

    The classifier input is resized twice (to ``round(H0*s)``, then up to the multiple of ``cell_size``), the FCN input
    once, straight to the padded size; both bilinear with ``align_corners=False``.

    Args:
        image: (1, 3, H0, W0) normalised image (any batch size works).
    Returns:
        cls_input, fcn_input: (1, 3, H', W') each, H' and W' multiples of ``cell_size``.
    """
    if image.dim() != 4:
        raise ValueError(f"inference_inputs expects (B, 3, H, W), got {tuple(image.shape)}")
    h0, w0 = image.shape[-2:]
    target, padded = padded_size(h0, w0, scale, cell_size)
    cls_input = image if target == (h0, w0) else F.interpolate(image, size=target, mode="bilinear", align_corners=False)
    if padded != target:
        cls_input = F.interpolate(cls_input, size=padded, mode="bilinear", align_corners=False)
    fcn_input = image if padded == (h0, w0) else F.interpolate(image, size=padded, mode="bilinear", align_corners=False)
    return cls_input, fcn_input


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the last dimension (for flipped inference passes and un-flipping their outputs)."""
    return torch.flip(x, dims=[-1])
