"""Where the datasets live: the one place that knows the VOC12 / COCO14 roots and their saliency maps.

Each root is a function (nothing is resolved at import) and can be overridden by an environment variable:

    SPCAM_VOC12_ROOT       VOC-layout VOC2012 folder (JPEGImages/, SegmentationClass[Aug]/, ImageSets/...)
    SPCAM_VOC12_SAL_ROOT   VOC12 saliency maps, grey PNG 0..255 (ref: PoolNet maps), default VOC12_ROOT/saliency_map
    SPCAM_COCO14_ROOT      COCO 2014 folder (train2014/, val2014/, annotations/, plus what tools/prepare_coco14.py writes)
    SPCAM_COCO14_SAL_ROOT  COCO14 saliency maps, default COCO14_ROOT/saliency_maps_poolnet

Relative defaults are taken from the repository root, relative environment values from the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent

VOC12_ROOT_VAR = "SPCAM_VOC12_ROOT"
VOC12_SAL_ROOT_VAR = "SPCAM_VOC12_SAL_ROOT"
COCO14_ROOT_VAR = "SPCAM_COCO14_ROOT"
COCO14_SAL_ROOT_VAR = "SPCAM_COCO14_SAL_ROOT"

VOC12_DEFAULT = REPO_ROOT / "datasets" / "VOC2012"  # ref: VOC2012/VOCdevkit/VOC2012/
COCO14_DEFAULT = REPO_ROOT / "datasets" / "COCO14"  # ref: COCO/
VOC12_SAL_SUBDIR = "saliency_map"  # ref: VOC2012/VOCdevkit/VOC2012/saliency_map/
COCO14_SAL_SUBDIR = "saliency_maps_poolnet"  # ref: COCO/saliency_maps_poolnet/


def is_overridden(var: str) -> bool:
    """True when the environment variable ``var`` is set to a non-empty value."""
    return bool(os.environ.get(var, "").strip())


def _resolve(var: str, default: Path, must_exist: bool) -> Path:
    value = os.environ.get(var, "").strip()
    path = Path(value).expanduser() if value else default
    if must_exist and not path.is_dir():
        how = f"set by {var}" if value else f"default; set {var} to point elsewhere"
        raise FileNotFoundError(f"dataset folder not found: {path} ({how})")
    return path


def voc12_root(must_exist: bool = True) -> Path:
    """The VOC2012 root (the folder that holds ``JPEGImages/``)."""
    return _resolve(VOC12_ROOT_VAR, VOC12_DEFAULT, must_exist)


def voc12_saliency_root(must_exist: bool = True) -> Path:
    """The VOC12 saliency-map folder (``<id>.png``)."""
    return _resolve(VOC12_SAL_ROOT_VAR, voc12_root(must_exist=False) / VOC12_SAL_SUBDIR, must_exist)


def coco14_root(must_exist: bool = True) -> Path:
    """The COCO 2014 root (the folder that holds ``train2014/`` and ``val2014/``)."""
    return _resolve(COCO14_ROOT_VAR, COCO14_DEFAULT, must_exist)


def coco14_saliency_root(must_exist: bool = True) -> Path:
    """The COCO14 saliency-map folder (``<id>.png``)."""
    return _resolve(COCO14_SAL_ROOT_VAR, coco14_root(must_exist=False) / COCO14_SAL_SUBDIR, must_exist)
