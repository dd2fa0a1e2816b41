"""Building and loading the networks of a run: the one place stages and tools get them from.

A training stage builds its network here and writes its final weights in the layout read back here; inference stages
and tools load trained networks here and never import a training stage.

Final-weights files (``<stage>/model.pt``, ``torch.load(weights_only=True)``):

* classifiers (``cam``, ``spcam``): ``{"model_type", "model", "config", "num_classes", "class_names", "backbone",
  "metrics"}``;
* superpixel FCN (``fcn``): ``{"stage": "fcn", "model", "config", "metric", "mode", "num_classes", "cell_size"}``;
  published SpixelFCN / SP-CAM files (a bare state dict or ``{"state_dict": ...}``) load too;
* segmentation network (``seg``, ``seg_gt``): ``{"stage", "model", "config", "num_classes", "class_names",
  "backbone", "labels", "metrics"}``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from net.classifiers import CAMModel
from net.classifiers import build_classifier as _build_classifier
from net.deeplab import DeepLabV2, build_deeplab
from net.spixel_fcn import SpixelNet, build_spixel_fcn, load_spixel_weights
from sp_cam.config import ClassifierConfig, Config, ConfigError, FCNConfig, SegConfig, config_from_dict, config_to_dict
from sp_cam.io import describe_load_error, load_checkpoint
from sp_cam.paths import RunPaths
from sp_cam.runtime import place_model

log = logging.getLogger(__name__)

CLASSIFIER_TYPES = ("cam", "spcam")
CLASSIFIER_NAMES = {"cam": "CAM baseline", "spcam": "SP-CAM"}
GT_LABELS = "gt"  # seg.labels value: train stage 4 on the GT masks


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------------------------------
# Classifiers (stages A and 2)


def classifier_config(cfg: Config, model_type: str) -> ClassifierConfig:
    """The config section of ``model_type`` (``cfg.cam`` or ``cfg.spcam``)."""
    if model_type not in CLASSIFIER_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; expected one of {', '.join(CLASSIFIER_TYPES)}")
    return getattr(cfg, model_type)


def build_classifier(
    ccfg: ClassifierConfig, model_type: str, num_classes: int, pretrained: str | None = None
) -> CAMModel:
    """The classifier of ``model_type`` from its config section.

    Args:
        pretrained: overrides ``ccfg.pretrained``; ``""`` skips the backbone weights without the random-initialisation
            warning (the weights come from a checkpoint next).
    """

    def build(source: str) -> CAMModel:
        return _build_classifier(
            model_type,
            num_classes,
            ccfg.backbone,
            source,
            freeze_backbone=ccfg.freeze_backbone,
            encoder_widths=ccfg.drm_encoder_widths,
            head_widths=ccfg.drm_head_widths,
            drm_border=ccfg.drm_border,
        )

    if pretrained == "":
        with _quiet("net.backbones"):
            return build("")
    return build(ccfg.pretrained if pretrained is None else pretrained)


def classifier_payload(
    model_type: str, weights: dict[str, torch.Tensor], cfg: Config, class_names: tuple[str, ...], metrics: dict
) -> dict[str, Any]:
    """The final-weights file of a classifier stage (read back by :func:`load_classifier`)."""
    return {
        "model_type": model_type,
        "model": weights,
        "config": config_to_dict(cfg),
        "num_classes": len(class_names) - 1,
        "class_names": list(class_names),
        "backbone": classifier_config(cfg, model_type).backbone,
        "metrics": metrics,
    }


def load_classifier(path: str | Path, expected_type: str, device: torch.device | str = "cpu") -> CAMModel:
    """A trained classifier from its final weights (``model.pt``) or a training checkpoint (``last.pt``), in eval mode.

    Raises:
        ValueError: the file holds the other model type (naming both), or is not a classifier checkpoint.
    """
    if expected_type not in CLASSIFIER_TYPES:
        raise ValueError(f"unknown model type {expected_type!r}; expected one of {', '.join(CLASSIFIER_TYPES)}")
    path = Path(path)
    state = load_checkpoint(path)
    missing = [k for k in ("model_type", "model", "config", "num_classes") if k not in state]
    if missing:
        raise ValueError(f"{path}: not a classifier checkpoint of sp_cam.train_cls (missing {missing})")
    if state["model_type"] != expected_type:
        raise ValueError(
            f"{path}: holds a {state['model_type']!r} model, but a {expected_type!r} model was expected "
            f"({CLASSIFIER_NAMES[expected_type]} weights are in the {expected_type}/ stage folder)"
        )
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise ValueError(f"{path}: stored config does not fit this version ({e})") from None
    ccfg = classifier_config(cfg, expected_type)
    model = build_classifier(ccfg, expected_type, int(state["num_classes"]), pretrained="")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the {expected_type} model ({describe_load_error(e)})") from None
    return place_model(model, device).eval()


def check_num_classes(model: nn.Module, path: Path, num_classes: int) -> None:
    """A trained model must predict the dataset's classes."""
    k = getattr(model, "num_classes", num_classes)
    if k != num_classes:
        raise ValueError(f"{path}: a model of {k} classes cannot label a dataset of {num_classes} classes")


# --------------------------------------------------------------------------------------------------------------------
# Superpixel FCN (stage 1)


RANDOM_INIT = ("", "none")  # fcn.init / seg.init values that mean random initialisation
INIT_HINTS = {
    "fcn.init": "the published code fine-tunes the BSDS500 SpixelFCN checkpoint SpixelNet_bsd_ckpt.tar "
    "(fuy34/superpixel_fcn, pretrain_ckpt/): put it there, or set fcn.init=none to train stage 1 from scratch",
    "seg.init": "WSSS papers start DeepLab-V2 from the COCO-pretrained DeepLab-V1 deeplabv1_resnet101-coco.pth "
    "(kazuto1011/deeplab-pytorch: scripts/setup_caffemodels.sh, then convert.py --dataset coco): put it there, or set "
    "seg.init=named (ImageNet weights, downloaded) or seg.init=none",
}


def check_init_file(key: str, value: str) -> None:
    """A local initial-weights file named by ``key`` (``fcn.init``, ``seg.init``) must exist: one line saying where
    to get it otherwise."""
    if value in RANDOM_INIT or value in ("named", "lite0-pypi"):
        return
    if not Path(value).expanduser().is_file():
        raise FileNotFoundError(f"{key}={value}: file not found; {INIT_HINTS[key]}")


def build_fcn(fcfg: FCNConfig) -> SpixelNet:
    """The stage-1 network: random initialisation, or ``fcn.init`` (published SpixelFCN / SP-CAM weights)."""
    model = SpixelNet()
    if fcfg.init not in RANDOM_INIT:
        check_init_file("fcn.init", fcfg.init)
        load_spixel_weights(model, Path(fcfg.init).expanduser())
        log.info("stage 1: initialised from %s", fcfg.init)
    else:
        log.info("stage 1: random initialisation (set fcn.init to start from published SpixelFCN weights)")
    return model


def fcn_payload(weights: dict[str, torch.Tensor], cfg: Config, metric: dict, mode: str, num_classes: int) -> dict:
    """The final-weights file of stage 1."""
    return {
        "stage": "fcn",
        "model": weights,
        "config": config_to_dict(cfg),
        "metric": metric,
        "mode": mode,
        "num_classes": num_classes,
        "cell_size": cfg.fcn.cell_size,
    }


def fcn_weights_path(cfg: Config) -> Path:
    """``fcn.weights`` when given, else the stage-1 result of this run."""
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    path = Path(cfg.fcn.weights).expanduser() if cfg.fcn.weights else RunPaths.model(paths.fcn)
    if not path.is_file():
        hint = "fcn.weights" if cfg.fcn.weights else "stage 1 (python -m sp_cam.train_fcn) or set fcn.weights"
        raise FileNotFoundError(f"superpixel FCN weights not found: {path} (run {hint})")
    return path


def load_frozen_fcn(path: Path, device: torch.device | str) -> SpixelNet:
    """The superpixel FCN, frozen (docs/decisions.md D4): eval mode, no gradients; run it under ``torch.no_grad``.

    Accepts the stage-1 result (``{'model': state_dict, ...}``) and published SpixelFCN / Q files alike.
    """
    fcn = build_spixel_fcn(path)  # tolerant loader: unwraps 'model' / 'state_dict', strips 'module.'
    place_model(fcn, device).eval().requires_grad_(False)
    return fcn


# --------------------------------------------------------------------------------------------------------------------
# Stage 3


@dataclass
class Stage3Models:
    """The networks of stage 3, in eval mode on one device."""

    spcam: nn.Module
    fcn: nn.Module
    cam: nn.Module | None = None


def load_stage3_models(cfg: Config, device: torch.device, num_classes: int, need_cam: bool = False) -> Stage3Models:
    """SP-CAM classifier, frozen superpixel FCN and (``need_cam``, if trained) the baseline CAM model."""
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    spcam_path = RunPaths.model(paths.spcam)
    if not spcam_path.is_file():
        raise FileNotFoundError(f"SP-CAM weights not found: {spcam_path} (train stage 2 first: sp_cam.train_cls spcam)")
    spcam = load_classifier(spcam_path, "spcam", device)
    check_num_classes(spcam, spcam_path, num_classes)
    fcn = load_frozen_fcn(fcn_weights_path(cfg), device)
    cam = None
    cam_path = RunPaths.model(paths.cam)
    if need_cam and cam_path.is_file():
        cam = load_classifier(cam_path, "cam", device)
        check_num_classes(cam, cam_path, num_classes)
    elif need_cam:
        log.info("no baseline CAM model at %s: the ablation's CAM row will be empty", cam_path)
    return Stage3Models(spcam, fcn, cam)


# --------------------------------------------------------------------------------------------------------------------
# Segmentation network (stage 4)


def seg_stage_name(cfg: Config) -> str:
    """The stage-4 folder of ``seg.labels``: ``seg_gt`` for the GT masks (the supervised reference), else ``seg``."""
    return "seg_gt" if cfg.seg.labels == GT_LABELS else "seg"


def build_segmenter(gcfg: SegConfig, num_classes: int, init: str | None = None) -> DeepLabV2:
    """DeepLab-V2 of ``seg.backbone``; ``init`` overrides ``seg.init`` (``""`` quietly, before loading weights)."""
    if init == "":
        with _quiet("net.deeplab"), _quiet("net.backbones"):
            return build_deeplab(gcfg.backbone, num_classes, "")
    source = gcfg.init if init is None else init
    check_init_file("seg.init", source)
    return build_deeplab(gcfg.backbone, num_classes, "" if source in RANDOM_INIT else source)


def seg_payload(
    stage: str, weights: dict[str, torch.Tensor], cfg: Config, class_names: tuple[str, ...], labels: str, metrics: dict
) -> dict[str, Any]:
    """The final-weights file of stage 4 (read back by :func:`load_segmenter`)."""
    return {
        "stage": stage,
        "model": weights,
        "config": config_to_dict(cfg),
        "num_classes": len(class_names) - 1,
        "class_names": list(class_names),
        "backbone": cfg.seg.backbone,
        "labels": labels,
        "metrics": metrics,
    }


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> DeepLabV2:
    """A trained segmentation network from its final weights (``model.pt``), in eval mode.

    Raises:
        ValueError: not a stage-4 file, or weights that do not fit the network its config describes.
    """
    path = Path(path)
    state = load_checkpoint(path)
    if state.get("stage") not in ("seg", "seg_gt") or "model" not in state or "config" not in state:
        raise ValueError(
            f"{path}: not the final weights of stage 4 (sp_cam.train_seg); found stage {state.get('stage')!r}"
        )
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise ValueError(f"{path}: stored config does not fit this version ({e})") from None
    model = build_segmenter(cfg.seg, int(state["num_classes"]), init="")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(
            f"{path}: weights do not fit the {cfg.seg.backbone} DeepLab-V2 ({describe_load_error(e)})"
        ) from None
    return place_model(model, device).eval()
