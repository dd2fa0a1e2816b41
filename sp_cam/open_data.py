"""The dataset a config names: VOC12, COCO14, any VOC-layout folder, or the toy set (generated on first use).

``data/`` reads folders given as explicit paths; choosing the folder from ``data.dataset``, ``data.root``,
``data.saliency_dir`` and ``dataset_root.py`` (and placing the toy set in the work directory) happens here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import dataset_root
from data.datasets import TrainDataset
from data.toy import make_toy_dataset
from data.voc_layout import SALIENCY_DIR, VOCLayout
from sp_cam.config import Config
from sp_cam.paths import RunPaths

log = logging.getLogger(__name__)


def _saliency_from_config(setting: str, default: Path | None, explicit_default: bool) -> Path | None:
    """Resolve ``data.saliency_dir``: "none" disables, "" takes ``default`` when it exists, else a path."""
    if setting.strip().lower() == "none":
        return None
    if setting.strip():
        return _folder(Path(setting).expanduser(), "saliency folder", "data.saliency_dir")
    if default is None:
        return None
    if default.is_dir():
        return default
    if explicit_default:
        raise FileNotFoundError(f"saliency folder not found: {default}")
    log.warning("no saliency maps at %s: running without saliency (labels-only mode)", default)
    return None


def _folder(path: Path, what: str, key: str) -> Path:
    """``path``, which must be an existing folder (one line naming it and ``key`` otherwise)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is not a folder ({key})")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} ({key})")
    return path


def _existing_root(root_setting: str, default: Callable[[], Path]) -> Path:
    """``data.root`` when set, else ``default()`` (the dataset_root.py location); it must be a folder."""
    return _folder(Path(root_setting).expanduser() if root_setting else default(), "dataset root", "data.root")


def _folder_needs_root() -> Path:
    raise ValueError("data.dataset=folder needs data.root=<a VOC-layout folder>")


def open_dataset(cfg: Config) -> VOCLayout:
    """Open the dataset of ``cfg.data`` (``cfg.toy`` and ``cfg.run.work_dir`` for the toy set).

    ``data.dataset``: ``toy`` (generated on first use into ``WORK_DIR/toy_data``, or into ``data.root`` if set),
    ``voc12`` / ``coco14`` (roots from ``dataset_root.py`` unless ``data.root`` is set) or ``folder`` (``data.root``).
    ``data.saliency_dir``: "" = ``ROOT/saliency_map`` (VOC12 / COCO14: ``dataset_root.py``) if present, "none" = no
    saliency, anything else = that folder.
    """
    name = cfg.data.dataset
    root_setting = cfg.data.root.strip()
    if name == "toy":
        root = Path(root_setting).expanduser() if root_setting else RunPaths.from_work_dir(cfg.run.work_dir).toy_data
        if root.exists() and not root.is_dir():  # generated on first use: only a file in the way is an error
            raise ValueError(
                f"{root} is not a folder ({'data.root' if root_setting else 'the toy set of run.work_dir'})"
            )
        t = cfg.toy
        make_toy_dataset(root, num_train=t.num_train, num_val=t.num_val, image_size=t.image_size, seed=t.seed)
        sal = _saliency_from_config(cfg.data.saliency_dir, root / SALIENCY_DIR, explicit_default=False)
        return VOCLayout(root, saliency_dir=sal)
    if name == "voc12":
        root = _existing_root(root_setting, dataset_root.voc12_root)
        if root_setting:
            default_sal, explicit = root / SALIENCY_DIR, False
        else:
            default_sal = dataset_root.voc12_saliency_root(must_exist=False)
            explicit = dataset_root.is_overridden(dataset_root.VOC12_SAL_ROOT_VAR)
        sal = _saliency_from_config(cfg.data.saliency_dir, default_sal, explicit)
        return VOCLayout(root, saliency_dir=sal, mask_dirs=("SegmentationClassAug", "SegmentationClass"))
    if name == "coco14":
        root = _existing_root(root_setting, dataset_root.coco14_root)
        if root_setting:
            default_sal, explicit = root / dataset_root.COCO14_SAL_SUBDIR, False
        else:
            default_sal = dataset_root.coco14_saliency_root(must_exist=False)
            explicit = dataset_root.is_overridden(dataset_root.COCO14_SAL_ROOT_VAR)
        sal = _saliency_from_config(cfg.data.saliency_dir, default_sal, explicit)
        return VOCLayout(root, saliency_dir=sal, image_dirs=("JPEGImages", "train2014", "val2014"))
    if name == "folder":
        root = _existing_root(root_setting, _folder_needs_root)
        sal = _saliency_from_config(cfg.data.saliency_dir, root / SALIENCY_DIR, explicit_default=False)
        return VOCLayout(root, saliency_dir=sal)
    raise ValueError(f"data.dataset: unknown dataset {name!r}; expected one of toy, voc12, coco14, folder")


def train_dataset(cfg: Config, layout: VOCLayout) -> TrainDataset:
    """The augmented training crops of ``data.train_split`` (stages A, 1 and 2), as ``cfg.data`` describes them."""
    d = cfg.data
    return TrainDataset(
        layout,
        d.train_split,
        crop_size=d.crop_size,
        resize_long=(d.resize_long_min, d.resize_long_max),
        seed=cfg.run.seed,
    )
