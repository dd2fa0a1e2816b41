"""The training set of stage 4: images with a label map (pseudo labels, or GT masks for the supervised reference).

Augmentation as deeplab-pytorch's VOC training: a scale factor drawn from a list (image bilinear, label nearest),
horizontal flip, ImageNet normalisation, a random square crop with the mean colour / the ignore value as padding.
An item is a pure function of (seed, epoch, index), like :class:`data.datasets.TrainDataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from data.datasets import EpochDataset
from data.transforms import crop_pad_pair, flip_pair, normalize, random_scale_pair
from data.voc_layout import VOCLayout

LabelLoader = Callable[[str], np.ndarray]  # id -> (H, W) uint8 class indices, 255 = ignore


class SegTrainDataset(EpochDataset):
    """Augmented crops with their label map.

    Args:
        layout: the dataset folder (images).
        ids: the training ids.
        load_label: ``id -> (H, W) uint8`` label of the image (picklable, for DataLoader workers).
        crop_size: side S of the square crop.
        scales: scale factors drawn uniformly per item (deeplab-pytorch: 0.5, 0.75, 1.0, 1.25, 1.5).
        seed: base of the per-item generators.

    Item:
        ``id`` str; ``image`` (3, S, S) float32 normalised; ``label`` (S, S) int64, 255 = ignore (padding included).
    """

    def __init__(
        self,
        layout: VOCLayout,
        ids: Sequence[str],
        load_label: LabelLoader,
        crop_size: int,
        scales: Sequence[float],
        seed: int = 0,
    ) -> None:
        if crop_size < 1 or not scales or min(scales) <= 0:
            raise ValueError(f"crop_size must be >= 1 and scales positive, got {crop_size}, {list(scales)}")
        super().__init__(list(ids), seed)
        self.layout = layout
        self.load_label = load_label
        self.crop_size = crop_size
        self.scales = tuple(float(s) for s in scales)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        rng = self.rng(index)
        image = self.layout.load_image(image_id)
        label = self.load_label(image_id)
        if label.shape != image.shape[:2]:
            raise ValueError(f"label of {image_id!r}: size {label.shape} does not match its image {image.shape[:2]}")
        image, label = random_scale_pair(image, label, self.scales, rng)
        image, label = flip_pair(image, label, rng)
        image_f, label = crop_pad_pair(normalize(image), label, self.crop_size, rng)
        return {
            "id": image_id,
            "image": torch.from_numpy(np.ascontiguousarray(image_f.transpose(2, 0, 1))),
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
        }
