"""A VOC-layout dataset folder, usable for VOC12, COCO14 (after ``tools/prepare_coco14.py``), the toy set or any data.

Layout of ``ROOT``::

    JPEGImages/<id>.jpg                    images (COCO14: train2014/ or val2014/ are searched too)
    SegmentationClass/<id>.png             optional GT: palette or grey PNG of class indices, 255 = ignore
                                           (VOC12: SegmentationClassAug/ is preferred where it holds the id)
    saliency_map/<id>.png                  optional saliency, grey 0..255 (or another folder, see ``open_dataset``)
    ImageSets/Segmentation/<split>.txt     one id per line (checked as a file name: data/ids.py)
    labels.txt                             class names, background first (absent: the 21 VOC names)
    cls_labels.json                        image-level labels {id: [foreground class indices 1..K]}
                                           (absent: derived from the GT masks, where they exist)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.classes import IGNORE_INDEX, read_class_names
from data.ids import read_id_list
from data.label_png import IMAGE_ERRORS, first_line, read_label_png

log = logging.getLogger(__name__)

LIST_DIR = Path("ImageSets") / "Segmentation"
LABELS_FILE = "labels.txt"
CLS_LABELS_FILE = "cls_labels.json"
SALIENCY_DIR = "saliency_map"
IMAGE_EXT = ".jpg"
PNG_EXT = ".png"
# PIL modes of 8 (or fewer, losslessly widened) bits per channel; "I", "I;16*" and "F" are refused.
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_MODE_NAMES = {"I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit"}


def _open_image(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image, turning every failure into a one-line error naming ``path``."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IMAGE_ERRORS as e:
        raise ValueError(f"{path}: cannot read {what} ({first_line(e)})") from None
    return img


def _check_8bit(img: Image.Image, path: Path, what: str) -> None:
    """Refuse pixels of more than 8 bits: PIL's conversion to RGB or L clips them (a 16-bit PNG becomes all 255)."""
    if img.mode not in EIGHT_BIT_MODES:
        raise ValueError(
            f"{path}: {what} of mode {img.mode} ({_MODE_NAMES.get(img.mode, 'unsupported')}), "
            f"expected an 8-bit RGB or grey image"
        )


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except IMAGE_ERRORS as e:
        raise ValueError(f"{path}: cannot read image ({first_line(e)})") from None
    return h, w


def _existing_folder(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder ({what})")
    return path


class VOCLayout:
    """Description of a VOC-layout folder; reads images, masks, saliency maps and image-level labels by string id.

    Args:
        root: the dataset folder.
        saliency_dir: folder of ``<id>.png`` saliency maps, or None for none.
        image_dirs: folders under ``root`` searched in order for ``<id>.jpg``.
        mask_dirs: folders under ``root`` searched in order for ``<id>.png`` GT masks.
        class_names: background first; default ``root/labels.txt`` (or the 21 VOC names when it is absent).
    """

    def __init__(
        self,
        root: str | Path,
        saliency_dir: str | Path | None = None,
        image_dirs: Sequence[str] = ("JPEGImages",),
        mask_dirs: Sequence[str] = ("SegmentationClass",),
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = _existing_folder(Path(root), "dataset root")
        self.saliency_dir = (
            _existing_folder(Path(saliency_dir), "saliency folder") if saliency_dir is not None else None
        )
        self.image_dirs = tuple(self.root / d for d in image_dirs)
        self.mask_dirs = tuple(self.root / d for d in mask_dirs)
        self.class_names: tuple[str, ...] = (
            tuple(class_names) if class_names is not None else read_class_names(self.root / LABELS_FILE)
        )
        if len(self.class_names) < 2:
            raise ValueError(f"{self.root}: need background plus at least one class, got {self.class_names}")
        self._cls_labels: dict[str, list[int]] | None = None
        self._labels_from_json = False
        self._lists: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"VOCLayout(root={str(self.root)!r}, K={self.num_classes}, saliency={self.has_saliency})"

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes."""
        return len(self.class_names) - 1

    @property
    def has_saliency(self) -> bool:
        return self.saliency_dir is not None

    # ---------------------------------------------------------------- files

    def list_file(self, split: str) -> Path:
        return self.root / LIST_DIR / f"{split}.txt"

    def image_path(self, image_id: str) -> Path:
        """The first existing ``<dir>/<id>.jpg`` (the first candidate when none exists, for the error message)."""
        for d in self.image_dirs:
            p = d / f"{image_id}{IMAGE_EXT}"
            if p.is_file():
                return p
        return self.image_dirs[0] / f"{image_id}{IMAGE_EXT}"

    def mask_path(self, image_id: str) -> Path | None:
        for d in self.mask_dirs:
            p = d / f"{image_id}{PNG_EXT}"
            if p.is_file():
                return p
        return None

    def saliency_path(self, image_id: str) -> Path | None:
        return None if self.saliency_dir is None else self.saliency_dir / f"{image_id}{PNG_EXT}"

    def has_gt(self, image_id: str) -> bool:
        return self.mask_path(image_id) is not None

    def ids(self, split: str, check_images: bool = True) -> list[str]:
        """The ids of ``ImageSets/Segmentation/<split>.txt``, in file order.

        Every id is checked as a file name (:func:`data.ids.check_id`) before any path is made from it: an id that
        could name a file outside its folder (``../x``, ``/x``) stops every stage here, before it reads or writes.

        Raises:
            FileNotFoundError: the list file is missing, or (``check_images``) a listed id has no image.
            ValueError: an unsafe or duplicate id (naming the list file and line), or an empty list.
        """
        if split not in self._lists:
            path = self.list_file(split)
            if not path.is_file():
                raise FileNotFoundError(f"split list not found: {path}")
            ids = read_id_list(path)
            if not ids:
                raise ValueError(f"{path}: the split list is empty")
            if check_images:
                for image_id in ids:
                    p = self.image_path(image_id)
                    if not p.is_file():
                        raise FileNotFoundError(f"image not found: {p} (id {image_id!r} listed in {path})")
            self._lists[split] = ids
        return list(self._lists[split])

    # ---------------------------------------------------------------- pixels

    def load_image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB; an image of more than 8 bits per channel is refused (naming the file and its mode)."""
        path = self.image_path(image_id)
        img = _open_image(path, "image")
        _check_8bit(img, path, "image")
        return np.asarray(img.convert("RGB"))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) without decoding the pixels."""
        return _image_size(self.image_path(image_id))

    def load_mask(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """GT class indices, (H, W) uint8 with values 0..K or 255, or None when the id has no mask.

        Read by :func:`data.label_png.read_label_png`: an 8-bit palette or grey PNG; 16-bit, RGB and non-PNG files
        are refused, as for predictions.

        Args:
            size: (H, W) of the image if already known (saves reading the image header).
        """
        path = self.mask_path(image_id)
        if path is None:
            return None
        mask = read_label_png(path)
        size = size or self.image_size(image_id)
        if mask.shape != tuple(size):
            raise ValueError(f"{path}: mask size {mask.shape} does not match the image size {tuple(size)}")
        bad = (mask > self.num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"{path}: mask value {int(mask[bad].max())} out of range 0..{self.num_classes} (or {IGNORE_INDEX})"
            )
        return mask.astype(np.uint8)

    def load_saliency(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """Saliency, (H, W) uint8 0..255, or None when the layout has no saliency maps."""
        path = self.saliency_path(image_id)
        if path is None:
            return None
        img = _open_image(path, "saliency map")
        _check_8bit(img, path, "saliency map")
        sal = np.asarray(img.convert("L"))
        size = size or self.image_size(image_id)
        if sal.shape != tuple(size):
            raise ValueError(f"{path}: saliency size {sal.shape} does not match the image size {tuple(size)}")
        return sal

    # ---------------------------------------------------------------- labels

    def _load_cls_labels(self) -> dict[str, list[int]] | None:
        path = self.root / CLS_LABELS_FILE
        if not path.is_file():
            return None
        try:
            raw: Any = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected an object {{id: [class indices]}}, got {type(raw).__name__}")
        out: dict[str, list[int]] = {}
        for image_id, value in raw.items():
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{path}: id {image_id!r}: expected a list of class indices, got {value!r}")
            if any(v < 1 or v > self.num_classes for v in value):
                raise ValueError(f"{path}: id {image_id!r}: class index out of range 1..{self.num_classes}: {value}")
            out[image_id] = sorted(set(value))
        return out

    def labels(self, image_id: str) -> list[int]:
        """The foreground classes (1..K) present in the image, ascending."""
        if self._cls_labels is None:
            loaded = self._load_cls_labels()
            if loaded is None:
                log.warning("%s not found: image labels are taken from the GT masks", self.root / CLS_LABELS_FILE)
                loaded = {}
            self._cls_labels = loaded
            self._labels_from_json = (self.root / CLS_LABELS_FILE).is_file()
        if image_id in self._cls_labels:
            return list(self._cls_labels[image_id])
        if self._labels_from_json:
            raise ValueError(f"{self.root / CLS_LABELS_FILE}: no labels for id {image_id!r}")
        mask = self.load_mask(image_id)
        if mask is None:
            raise FileNotFoundError(f"no image labels for id {image_id!r}: {self.root / CLS_LABELS_FILE} is missing")
        present = np.unique(mask)
        self._cls_labels[image_id] = [int(c) for c in present if 0 < c <= self.num_classes]
        return list(self._cls_labels[image_id])

    def label_vector(self, image_id: str) -> np.ndarray:
        """(K,) float32 multi-hot over the foreground classes (index c-1 holds class c)."""
        vec = np.zeros(self.num_classes, dtype=np.float32)
        for c in self.labels(image_id):
            vec[c - 1] = 1.0
        return vec

    def check_labels(self, ids: Sequence[str]) -> None:
        """Fail early, naming the file, when some id has no image-level labels."""
        for image_id in ids:
            self.labels(image_id)
