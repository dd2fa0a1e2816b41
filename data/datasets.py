"""Torch datasets over a :class:`data.voc_layout.VOCLayout`. Every item carries its string id.

Randomness: a training item is augmented with its own generator, ``numpy.random.default_rng((seed, epoch, index))``,
so an item is the same whatever the number of DataLoader workers or their order; call :meth:`TrainDataset.set_epoch`
at the start of every epoch to draw new augmentations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data.classes import IGNORE_INDEX
from data.transforms import normalize, random_crop_pad, random_flip, random_resize_long, to_tensor_image
from data.voc_layout import VOCLayout

CamLoader = Callable[[str, tuple[int, int]], np.ndarray]  # (id, (H, W)) -> (K, H, W) float32


class EpochDataset(Dataset):
    """Items of a list of ids that are a pure function of (seed, epoch, index): :meth:`set_epoch` selects the epoch
    whose augmentations :meth:`rng` draws, whatever the number of DataLoader workers or their order."""

    def __init__(self, ids: list[str], seed: int) -> None:
        self.ids = list(ids)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng((self.seed, self.epoch, index))


class TrainDataset(EpochDataset):
    """Augmented training crops (docs/method.md §1.3).

    Args:
        layout: the dataset folder.
        split: list name under ``ImageSets/Segmentation``.
        crop_size: side S of the square crop.
        resize_long: (min, max) of the random long side, inclusive.
        cam_loader: optional ``(id, (H, W)) -> (K, H, W) float32`` of per-pixel maps (the step-B CAMs), transformed
            jointly with the image (bilinear resize, zero padding).
        seed: base of the per-item generators.
        cams_from_epoch: the first 0-based epoch whose items read ``cam_loader`` (earlier ones carry no ``cam``).

    Item:
        ``id`` str; ``image`` (3, S, S) float32 normalised; ``saliency`` (1, S, S) float32 in [0, 1] (zeros when the
        layout has none); ``label`` (K,) float32 multi-hot; ``valid`` (1, S, S) float32, 1 on real pixels and 0 in the
        padding; ``cam`` (K, S, S) float32, only with ``cam_loader`` and from epoch ``cams_from_epoch`` on.
    """

    def __init__(
        self,
        layout: VOCLayout,
        split: str,
        crop_size: int,
        resize_long: tuple[int, int] = (320, 640),
        cam_loader: CamLoader | None = None,
        seed: int = 0,
        cams_from_epoch: int = 0,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        lo, hi = resize_long
        if lo < 1 or hi < lo:
            raise ValueError(f"resize_long must satisfy 1 <= min <= max, got {tuple(resize_long)}")
        super().__init__(layout.ids(split), seed)
        self.layout = layout
        self.split = split
        layout.check_labels(self.ids)
        self.crop_size = crop_size
        self.resize_long = (int(lo), int(hi))
        self.cam_loader = cam_loader
        self.cams_from_epoch = cams_from_epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        rng = self.rng(index)
        image = self.layout.load_image(image_id)
        size = image.shape[:2]
        saliency = self.layout.load_saliency(image_id, size)
        maps = None
        if self.cam_loader is not None and self.epoch >= self.cams_from_epoch:
            cams = np.asarray(self.cam_loader(image_id, size), dtype=np.float32)
            if cams.shape != (self.layout.num_classes, *size):
                raise ValueError(
                    f"CAM of {image_id!r}: expected shape {(self.layout.num_classes, *size)}, got {cams.shape}"
                )
            maps = np.ascontiguousarray(cams.transpose(1, 2, 0))

        image, saliency, maps = random_resize_long(image, saliency, maps, self.resize_long, rng)
        image, saliency, maps = random_flip(image, saliency, maps, rng)
        image_f, saliency, maps, valid = random_crop_pad(normalize(image), saliency, maps, self.crop_size, rng)

        s = self.crop_size
        item: dict[str, Any] = {
            "id": image_id,
            "image": torch.from_numpy(np.ascontiguousarray(image_f.transpose(2, 0, 1))),
            "saliency": (
                torch.from_numpy(saliency.astype(np.float32) / 255.0)[None]
                if saliency is not None
                else torch.zeros(1, s, s)
            ),
            "label": torch.from_numpy(self.layout.label_vector(image_id)),
            "valid": torch.from_numpy(valid)[None],
        }
        if maps is not None:
            item["cam"] = torch.from_numpy(np.ascontiguousarray(maps.transpose(2, 0, 1)))
        return item


class EvalDataset(Dataset):
    """Full-size images with their GT, for evaluation and inference (batch size 1: sizes differ).

    Item:
        ``id`` str; ``image`` (3, H, W) float32 normalised; ``label`` (K,) float32 multi-hot;
        ``mask`` (H, W) int64 class indices, 255 = ignore (all 255 when the id has no GT mask).
    """

    def __init__(self, layout: VOCLayout, split: str) -> None:
        self.layout = layout
        self.split = split
        self.ids = layout.ids(split)
        layout.check_labels(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = self.layout.load_image(image_id)
        size = image.shape[:2]
        mask = self.layout.load_mask(image_id, size)
        if mask is None:
            mask_t = torch.full(size, IGNORE_INDEX, dtype=torch.int64)
        else:
            mask_t = torch.from_numpy(mask.astype(np.int64))
        return {
            "id": image_id,
            "image": to_tensor_image(image),
            "label": torch.from_numpy(self.layout.label_vector(image_id)),
            "mask": mask_t,
        }
