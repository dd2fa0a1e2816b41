"""Per-stage speed and memory of spcam, against the reference formulation and a pixel-level random walk (issue 6).

    python -m tools.benchmark [--device cpu|cuda] [--size H W] [--backbone NAME] [--json OUT] [--quick]

Sections (``--sections``, all by default):

``ops``     PSAM pooling, upsampling, ASAM and a 20-step walk at ``--size`` (512 x 512), 21 channels: the fast forms of
            :mod:`net.psam` against the reference's forms of :mod:`net.psam_reference` on the same inputs, with
            the largest absolute difference of their outputs.
``stage3``  one 375 x 500 image, 8 passes (scales 0.5, 1, 1.5, 2, each with its flip): the network forwards
            (SpixelNet; backbone + DRM at the paper's widths; the backbone alone) against the post-processing
            (everything after the forwards: ASAM, walk for every t of {0, 20, 30, 40}, PSAM upsampling, fusion,
            normalisation, the th sweep) as :func:`sp_cam.inference.infer_present` runs it, fed the forwards' outputs
            by replay modules. Also the post-processing of all K+1 channels and the reference's form (each pass alone,
            every t from scratch, reference operators), and the agreement of the reference's labels with the fast ones.
``walk``    the superpixel walk of that image (ASAM + 40 steps for the 8 passes, all K+1 channels) against an
            IRN/AffinityNet pixel-level walk on its 1/4-resolution grid (:mod:`sp_cam.pixel_walk`): published dense
            form (``T^(2^8)`` by 8 squarings of the N x N matrix) and the same walk as 256 sparse mat-vec steps.
``train``   one training step (forward, loss, backward, SGD step) of the CAM baseline and of SP-CAM (FCN under
            ``no_grad``, DRM at the paper's widths), batch 2 at 256 x 256 on CPU, batch 16 at 512 x 512 on CUDA, with
            the trainer's own loss code (:func:`sp_cam.train_cls.compute_loss`).
``loader``  one epoch of that CAM training step fed by a DataLoader with 2 worker processes (10 batches of in-memory
            items): a new loader every epoch, as a fresh ``iter`` forks new workers, against the
            engine's one loader whose workers live for the whole run. A fork makes the training process's next step
            copy its memory page by page (copy-on-write), once per epoch for the first.
``layout``  the networks' weight layout (:func:`sp_cam.runtime.weight_layout`): PyTorch's default against
            ``channels_last``, at the toy config's sizes (EfficientNet-Lite0, batch 16 at 160 x 160 for the classifiers,
            batch 8 for the superpixel FCN, one 160 x 160 image at scales 1, 1.5, 2 with flips for stage 3): one training
            step of the CAM baseline, of SP-CAM and of the FCN (its stage-1 loss without the affinity terms), and one
            image's stage-3 inference (SP-CAM with t in {0, 5, 10, 20} and the CAM baseline, as the toy run scores).
``pseudo``  images/s of the pseudo-label command (:func:`sp_cam.make_pseudo.main`) on a generated toy dataset, with
            randomly initialised models saved in the trainer's checkpoint format (includes model loading).
``large``   peak memory per megapixel of one image's inference, stage 3 (:func:`sp_cam.inference.infer_present`: the
            superpixel FCN and an SP-CAM classifier with the paper's DRM widths, 8 passes, t in {0, 20, 30, 40}, 2
            present classes) and stage 4 (:func:`sp_cam.seg_inference.seg_probs`: DeepLab-V2, scales 0.5, 0.75, 1 with
            flips): a ``--large-size`` image (768 x 1024) without ``max_side``, and a ``--large-image`` (3000 x 4000)
            under ``--max-side`` (1024, which runs it at 768 x 1024 and upsamples the outputs). Stage 3 uses the
            ``tiny`` backbone by default (``--large-backbone``): its peak is the FCN's forward of the 2x pass,
            which no classifier backbone exceeds; stage 4 uses ResNet-101 (``--seg-backbone``), whose forward is its
            peak. Each case runs once (in the memory child on CPU); the image tensor is part of the set-up.

Timing: warm-up runs, then repeats; the median, the inter-quartile range and min/max are reported;
``torch.cuda.synchronize()`` brackets every run on CUDA. The cases compared with each other (fast vs reference, CAM vs
SP-CAM, forwards vs post-processing) are timed interleaved, round by round, so that load drift hits them alike.
Peak memory: on CPU every case runs once more, one after the other, in a fresh child process whose allocations above
64 KiB are ``mmap``-ed (so freed memory leaves the process and each case starts from a clean RSS); the peak RSS above
the RSS after the case's set-up is read from ``/proc/self/status`` (``VmHWM``, reset through ``/proc/self/clear_refs``;
``ru_maxrss`` where that is unavailable); on CUDA
``torch.cuda.max_memory_allocated`` above the allocation after set-up. The dense pixel walk takes minutes on a CPU: it is
timed once, in that child.

``--quick`` (the test) shrinks everything (128 x 128 operators, a 64 x 96 image, the ``tiny`` backbone, 64 x 64 training
crops, one toy image, one thread, 1-2 repeats) so that it finishes in about 15-30 s on 2 cores; its ratios are not the
issue's figures. A full CPU run takes about 10 minutes, most of it the dense pixel walk (about 5 minutes, 1.6 GiB),
plus about 8 minutes and 3.1 GiB for ``large``.
``--json OUT`` writes every figure, the summary keys ``ops_speedup``, ``ops_max_abs_diff``, ``postprocess_fraction``,
``rw_speedup_vs_pixel``, ``spcam_step_ratio``, ``loader_kept_speedup``, ``layout_speedup``, ``device`` and the
targets of issue 6 with, for a missed one, the top operators of a ``torch.profiler`` run of the case that limits it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import sp_cam  # noqa: F401, I001  (first: sets OMP_WAIT_POLICY before torch loads, as every entry point does)
from net import psam as ops
from net import psam_reference as ref_ops
from sp_cam.config import ClassifierConfig, ConfigError
from sp_cam.io import atomic_write_json
from sp_cam.pixel_walk import PixelWalkConfig, pixel_random_walk
from sp_cam.runtime import place_model

log = logging.getLogger("spcam.benchmark")
REPO_ROOT = Path(__file__).resolve().parents[1]  # child processes run `python -m ...` from here

SECTIONS = ("ops", "stage3", "walk", "train", "loader", "layout", "pseudo", "large")
CELL_SIZE = 16  # ref: superpixel grid cell in pixels
NUM_CLASSES = 20  # VOC: K = 20 foreground classes, K + 1 = 21 channels
PRESENT_CLASSES = 2  # foreground classes tagged on the stage-3 image (VOC train_aug averages about 1.5)
OPS_SIZE = (512, 512)  # issue 3 / 6: operators at 512 x 512, 21 channels
IMAGE_SIZE = (375, 500)  # issue 6: a VOC-sized image for stage 3 and the walks
SCALES = (0.5, 1.0, 1.5, 2.0)  # ref: test scales, each with its flip = 8 passes
T_LIST = (0, 20, 30, 40)  # ref: walk steps swept at stage 3
TH_LIST = (0.2, 0.3, 0.4)  # ref: background thresholds swept at stage 3
WALK_STEPS = 20  # issue 6: the operators' walk
PIXEL_STRIDE = 4  # IRN / AffinityNet: the pixel walk runs on the 1/4-resolution grid
LARGE_IMAGE = (3000, 4000)  # issue: a 12-megapixel photo, as users' datasets have
MAX_SIDE = 1024  # issue: the default pseudo.max_side / export.max_side / seg.max_side
LARGE_SIZE = (768, 1024)  # LARGE_IMAGE at MAX_SIDE: the inference size, measured without max_side
SEG_SCALES = (0.5, 0.75, 1.0)  # seg.test_scales (deeplab-pytorch), each with its flip
TRAIN_CPU = (2, 256)  # issue 6: batch, crop size of the training step on CPU
TRAIN_CUDA = (16, 512)  # issue 6: ... on CUDA
LOADER_STEPS = 10  # batches of one loader epoch (the toy stages run 10 or 20)
LOADER_WORKERS = 2  # data.num_workers of the toy config
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
LAYOUT_BACKBONE = "efficientnet_lite0"  # the toy config's classifier backbone
LAYOUT_TRAIN = (16, 160)  # the toy config's classifier batch and crop
LAYOUT_FCN_BATCH = 8  # fcn.batch_size of the toy config
LAYOUT_SCALES = (1.0, 1.5, 2.0)  # pseudo.scales of the toy config
LAYOUT_T_LIST = (0, 5, 10, 20)  # pseudo.t_list of the toy config
LAYOUT_PARTS = ("cam", "spcam", "fcn", "stage3")
TRAIN_LR = 1e-5  # the benchmark's steps run on random data: a small lr keeps the numbers finite (timing unaffected)
PSAM_SHARPNESS = 2.0  # random PSAMs/scores: softmax of 2 * N(0, 1), roughly as peaked as a trained FCN's
CHILD_MMAP_THRESHOLD = 65536  # bytes: the memory child mmaps allocations above this, so frees return to the OS
CHILD_MARKER = "SPCAM_BENCHMARK_CHILD "
PROFILE_ROWS = 10
PROFILE_SHAPES_CHARS = 90

TARGETS = {  # issue 6, on CPU
    "ops_speedup": (">=", 3.0),
    "postprocess_fraction": ("<=", 0.10),
    "rw_speedup_vs_pixel": (">=", 50.0),
    "spcam_step_ratio": ("<=", 1.6),
}


# --------------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class BenchSettings:
    """Everything that sizes the benchmark (serialised to the memory child, recorded in the JSON)."""

    device: str = "cpu"
    ops_size: tuple[int, int] = OPS_SIZE
    channels: int = NUM_CLASSES + 1
    image: tuple[int, int] = IMAGE_SIZE
    backbone: str = "resnet50"
    num_classes: int = NUM_CLASSES
    present: int = PRESENT_CLASSES
    scales: tuple[float, ...] = SCALES
    t_list: tuple[int, ...] = T_LIST
    th_list: tuple[float, ...] = TH_LIST
    walk_steps: int = WALK_STEPS
    train_batch: int = TRAIN_CPU[0]
    train_size: int = TRAIN_CPU[1]
    loader_steps: int = LOADER_STEPS
    layout_backbone: str = LAYOUT_BACKBONE
    layout_batch: int = LAYOUT_TRAIN[0]
    layout_size: int = LAYOUT_TRAIN[1]
    layout_fcn_batch: int = LAYOUT_FCN_BATCH
    warmup: int = 2
    repeats: int = 7
    heavy_warmup: int = 1  # network forwards and post-processing of a whole image
    heavy_repeats: int = 3
    pseudo_images: int = 8
    pseudo_image_size: int = 160  # the toy dataset's default
    pseudo_backbone: str = "tiny"  # throughput of the command's machinery, not of a backbone (timed in stage3)
    large_size: tuple[int, int] = LARGE_SIZE
    large_image: tuple[int, int] = LARGE_IMAGE
    max_side: int = MAX_SIDE
    large_backbone: str = "tiny"  # stage 3's peak is the FCN's forward whatever the classifier (module docstring)
    seg_backbone: str = "resnet101"  # seg.backbone
    seg_scales: tuple[float, ...] = SEG_SCALES
    quick: bool = False
    memory: bool = True
    profile: bool = True
    seed: int = 0
    threads: int = 0
    sections: tuple[str, ...] = SECTIONS

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names})


QUICK = {  # --quick: a smoke run of every section (the test), well under a minute on 2 idle cores
    "ops_size": (128, 128),
    "image": (64, 96),
    "backbone": "tiny",
    "train_size": 64,
    "loader_steps": 2,
    "layout_backbone": "tiny",
    "layout_batch": 2,
    "layout_size": 64,
    "layout_fcn_batch": 2,
    "warmup": 1,
    "repeats": 2,
    "heavy_warmup": 0,
    "heavy_repeats": 1,
    "pseudo_images": 1,
    "pseudo_image_size": 64,
    "large_size": (48, 64),
    "large_image": (96, 128),
    "max_side": 64,
    "seg_backbone": "tiny",
    "profile": False,
    "threads": 1,  # one thread: two-thread OpenMP regions stall badly on a loaded 2-core machine
}


def torch_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        return torch.device("cuda")
    raise ValueError(f"--device must be cpu or cuda, got {name!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_psam(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.softmax(PSAM_SHARPNESS * torch.randn(*shape, generator=gen), dim=1).to(device)


def _padded(size: tuple[int, int], scale: float) -> tuple[int, int]:
    from data.transforms import padded_size

    return padded_size(size[0], size[1], scale, CELL_SIZE)[1]


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


# --------------------------------------------------------------------------------------------------------------------
# Cases: a builder does the set-up and returns the closure that is timed (and measured for memory)


@dataclass
class Case:
    name: str
    section: str
    build: Callable[[], Callable[[], Any]]
    heavy: bool = False  # a whole image or network forwards: heavy_warmup / heavy_repeats
    memory: bool = True
    once: bool = False  # too slow to repeat on CPU: timed once, in the memory child
    note: str = ""
    keep: bool = False  # keep the output of the last timed run for the checks
    group: str = ""  # cases of one group are timed interleaved, round by round (load drift hits them alike)


def _ops_inputs(s: BenchSettings, device: torch.device) -> dict[str, torch.Tensor]:
    H, W = s.ops_size
    gen = _generator(s.seed)
    q = _random_psam((1, 9, H, W), gen, device)
    f = torch.rand(1, s.channels, H, W, generator=gen).to(device)
    g = torch.rand(1, s.channels, H // CELL_SIZE, W // CELL_SIZE, generator=gen).to(device)
    with torch.no_grad():
        a = ops.asam(q, CELL_SIZE)  # both walks walk on the same ASAM
    return {"q": q, "f": f, "g": g, "a": a}


OPS = ("pool", "upsample", "asam", "walk")


def ops_closure(op: str, form: str, x: dict[str, torch.Tensor], steps: int) -> Callable[[], torch.Tensor]:
    """The closure of one operator in the ``fast`` or ``reference`` form on the inputs of :func:`_ops_inputs`."""
    fast = form == "fast"
    q, f, g, a = x["q"], x["f"], x["g"], x["a"]
    table: dict[str, Callable[[], torch.Tensor]] = {
        "pool": (lambda: ops.psam_pool(f, q, CELL_SIZE))
        if fast
        else (lambda: ref_ops.psam_pool_reference(f, q, CELL_SIZE)),
        "upsample": (lambda: ops.psam_upsample(g, q, CELL_SIZE))
        if fast
        else (lambda: ref_ops.psam_upsample_reference(g, q, CELL_SIZE)),
        "asam": (lambda: ops.asam(q, CELL_SIZE)) if fast else (lambda: ref_ops.asam_reference(q, CELL_SIZE)),
        "walk": (lambda: ops.random_walk(g, a, steps))
        if fast
        else (lambda: ref_ops.random_walk_reference(g, a, steps)),
    }
    return _no_grad(table[op])


@dataclass
class Stage3Inputs:
    """Synthetic outputs of the forwards of one image: per scale a flip pair of PSAMs and logits."""

    image: torch.Tensor  # (1, 3, H0, W0)
    labels: torch.Tensor  # (K,) multi-hot
    psams: dict[tuple[int, int], torch.Tensor]  # padded size -> (2, 9, H', W')
    logits: dict[tuple[int, int], torch.Tensor]  # padded size -> (2, K+1, h', w')


def stage3_inputs(s: BenchSettings, device: torch.device, all_present: bool = False) -> Stage3Inputs:
    gen = _generator(s.seed + 1)
    H0, W0 = s.image
    image = torch.randn(1, 3, H0, W0, generator=gen).to(device)
    labels = torch.zeros(s.num_classes)
    if all_present:
        labels[:] = 1
    else:
        labels[torch.randperm(s.num_classes, generator=gen)[: s.present]] = 1
    psams, logits = {}, {}
    for scale in s.scales:
        H, W = _padded(s.image, scale)
        psams[(H, W)] = _random_psam((2, 9, H, W), gen, device)
        logits[(H, W)] = (
            PSAM_SHARPNESS * torch.randn(2, s.num_classes + 1, H // CELL_SIZE, W // CELL_SIZE, generator=gen)
        ).to(device)
    return Stage3Inputs(image, labels, psams, logits)


class Replay(nn.Module):
    """Stands in for a network at stage 3: returns the stored output for the input's size (post-processing only)."""

    def __init__(self, outputs: dict[tuple[int, int], torch.Tensor], model_type: str, device: torch.device) -> None:
        super().__init__()
        self.outputs = outputs
        self.model_type = model_type
        self.anchor = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)  # sets the inference device

    def forward(self, x: torch.Tensor, psam: torch.Tensor | None = None) -> torch.Tensor:
        return self.outputs[(int(x.shape[-2]), int(x.shape[-1]))]


def postprocess_fast(
    s: BenchSettings, x: Stage3Inputs, device: torch.device
) -> Callable[[], dict[tuple[int, float], torch.Tensor]]:
    """Everything after the forwards, as the pipeline runs it: :func:`sp_cam.inference.infer_present` + the th sweep."""
    from sp_cam.inference import infer_present, labels_from_present

    model = Replay(x.logits, "spcam", device)
    fcn = Replay(x.psams, "fcn", device)

    def run() -> dict[tuple[int, float], torch.Tensor]:
        res = infer_present(model, fcn, x.image, x.labels, s.scales, True, list(s.t_list), ("psam",), False, CELL_SIZE)
        out = {}
        for (_, t), fused in res.scores.items():
            for th, lab in zip(s.th_list, labels_from_present(fused, res.classes, list(s.th_list)), strict=True):
                out[(t, float(th))] = lab
        return out

    return run


def postprocess_reference(s: BenchSettings, x: Stage3Inputs) -> Callable[[], dict[tuple[int, float], torch.Tensor]]:
    """The reference's stage 3 after the forwards (docs/method.md §4): each pass alone, all K+1 channels, every t from scratch,
    reference operators (nine shifted copies, 25-colour ASAM, 5x5-unfold walk), tag mask, threshold argmax."""
    H0, W0 = s.image
    fuse = _padded(s.image, 1.0)
    tags = torch.cat([torch.ones(1), x.labels]).to(x.image.device).view(-1, 1, 1)

    def run() -> dict[tuple[int, float], torch.Tensor]:
        with torch.no_grad():
            passes = []
            for size, q2 in x.psams.items():
                prob2 = torch.softmax(x.logits[size], dim=1)
                for b in range(q2.shape[0]):
                    q = q2[b : b + 1]
                    passes.append((q, prob2[b : b + 1], ref_ops.asam_reference(q, CELL_SIZE), b == 1))
            out = {}
            for t in s.t_list:
                fused = x.image.new_zeros(1, s.num_classes + 1, *fuse)
                for q, prob, a, flipped in passes:
                    up = ref_ops.psam_upsample_reference(ref_ops.random_walk_reference(prob, a, t), q, CELL_SIZE)
                    if tuple(up.shape[-2:]) != fuse:
                        up = F.interpolate(up, size=fuse, mode="bilinear", align_corners=False)
                    fused += up.flip(-1) if flipped else up
                peak = F.relu(fused).amax(dim=(-2, -1), keepdim=True)
                cam = F.relu(fused - 1e-5) / (peak + 1e-5)  # ref: PuzzleCAM make_cam
                cam = F.interpolate(cam * tags, size=(H0, W0), mode="bilinear", align_corners=False)[0]
                for th in s.th_list:
                    scores = cam.clone()
                    scores[0] = th
                    out[(t, float(th))] = scores.argmax(0).cpu()
            return out

    return run


_MODELS: dict[tuple[str, str], tuple[nn.Module, nn.Module]] = {}  # stage-3 models shared by the forward cases


def _stage3_models(s: BenchSettings, device: torch.device) -> tuple[nn.Module, nn.Module]:
    from net.spixel_fcn import build_spixel_fcn
    from sp_cam.models import build_classifier

    key = (s.backbone, str(device))
    if key not in _MODELS:
        torch.manual_seed(s.seed)
        fcn = place_model(build_spixel_fcn(""), device).eval()
        model = build_classifier(ClassifierConfig(backbone=s.backbone), "spcam", s.num_classes, pretrained="")
        _MODELS[key] = (fcn, place_model(model, device).eval())
    return _MODELS[key]


def _forward_inputs(s: BenchSettings, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per scale: (classifier input, FCN input, a PSAM of that size), flip pairs batched as the pipeline does."""
    from data.transforms import inference_inputs

    x = stage3_inputs(s, device)
    out = []
    for scale in s.scales:
        cls_in, fcn_in = inference_inputs(x.image, float(scale), CELL_SIZE)
        cls_in, fcn_in = torch.cat([cls_in, cls_in.flip(-1)]), torch.cat([fcn_in, fcn_in.flip(-1)])
        out.append((cls_in, fcn_in, x.psams[tuple(cls_in.shape[-2:])]))
    return out


def forward_closure(s: BenchSettings, device: torch.device, part: str) -> Callable[[], Any]:
    """The 8 network passes of one image: ``fcn`` (SpixelNet), ``classifier`` (backbone + classifier + DRM, given the
    PSAM) or ``backbone`` (the backbone alone)."""
    fcn, model = _stage3_models(s, device)
    inputs = _forward_inputs(s, device)

    def run() -> None:
        for cls_in, fcn_in, q in inputs:
            if part == "fcn":
                fcn(fcn_in)
            elif part == "classifier":
                model(cls_in, q)
            else:
                model.backbone(cls_in)

    return _no_grad(run)


def superpixel_walk(s: BenchSettings, device: torch.device) -> Callable[[], Any]:
    """ASAM and the incremental walk to every t for the 8 passes of the image, all K+1 channels (no upsampling)."""
    x = stage3_inputs(s, device)
    pairs = [(q, torch.softmax(x.logits[size], dim=1)) for size, q in x.psams.items()]

    def run() -> list[dict[int, torch.Tensor]]:
        return [ops.random_walk_multi(prob, ops.asam(q, CELL_SIZE), list(s.t_list)) for q, prob in pairs]

    return _no_grad(run)


def pixel_inputs(
    size: tuple[int, int], channels: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, h, w) scores and a smooth (h, w) boundary map in [0, 1] on the 1/4-resolution grid of an image."""
    h, w = math.ceil(size[0] / PIXEL_STRIDE), math.ceil(size[1] / PIXEL_STRIDE)
    gen = _generator(seed + 2)
    cam = torch.rand(channels, h, w, generator=gen)
    edge = F.avg_pool2d(torch.rand(1, 1, h, w, generator=gen), 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    edge = (edge - edge.min()) / (edge.max() - edge.min() + 1e-6)
    return cam.to(device), edge.to(device)


def pixel_walk(s: BenchSettings, device: torch.device, method: str) -> Callable[[], torch.Tensor]:
    cam, edge = pixel_inputs(s.image, s.channels, s.seed, device)
    cfg = PixelWalkConfig()
    return _no_grad(lambda: pixel_random_walk(cam, edge, cfg, method))


def large_closure(s: BenchSettings, device: torch.device, stage: str, bounded: bool) -> Callable[[], Any]:
    """One image's inference at stage 3 or 4: the ``large_image`` under ``max_side`` (``bounded``), else the
    ``large_size`` image without it."""
    from sp_cam.config import SegConfig
    from sp_cam.models import build_classifier, build_segmenter

    size = s.large_image if bounded else s.large_size
    max_side = s.max_side if bounded else 0
    image = torch.randn(1, 3, *size, generator=_generator(s.seed + 5)).to(device)
    torch.manual_seed(s.seed)
    if stage == "stage3":
        from net.spixel_fcn import build_spixel_fcn
        from sp_cam.inference import infer_present

        fcn = place_model(build_spixel_fcn(""), device).eval()
        ccfg = ClassifierConfig(backbone=s.large_backbone)  # the paper's DRM widths
        model = place_model(build_classifier(ccfg, "spcam", s.num_classes, pretrained=""), device).eval()
        labels = torch.zeros(s.num_classes)
        labels[torch.randperm(s.num_classes, generator=_generator(s.seed))[: s.present]] = 1
        ts = list(s.t_list)
        return lambda: infer_present(model, fcn, image, labels, s.scales, True, ts, ("psam",), max_side=max_side)
    from sp_cam.seg_inference import seg_probs

    model = place_model(build_segmenter(SegConfig(backbone=s.seg_backbone), s.num_classes, init=""), device).eval()
    return lambda: seg_probs(model, image, s.seg_scales, True, max_side=max_side)


def train_step(
    s: BenchSettings, device: torch.device, kind: str, layout: torch.memory_format | None = None
) -> Callable[[], float]:
    """One optimizer step of the trainers' loss (the frozen FCN's PSAM, the forward, :func:`net.cls_losses.classifier_loss`)
    on a random batch; the networks in ``layout`` (default: the device's :func:`sp_cam.runtime.weight_layout`)."""
    from net.cls_losses import classifier_loss
    from net.spixel_fcn import build_spixel_fcn
    from sp_cam.models import build_classifier
    from sp_cam.optim import build_optimizer

    torch.manual_seed(s.seed)
    ccfg = ClassifierConfig(backbone=s.backbone, lr=TRAIN_LR, batch_size=s.train_batch)
    model = place_model(build_classifier(ccfg, kind, s.num_classes, pretrained=""), device, layout).train()
    fcn = None
    if kind == "spcam":
        fcn = place_model(build_spixel_fcn(""), device, layout).eval().requires_grad_(False)
    optimizer, scheduler = build_optimizer(model, ccfg, total_steps=10_000)
    gen = _generator(s.seed + 3)
    B, S = s.train_batch, s.train_size
    labels = (torch.rand(B, s.num_classes, generator=gen) < 0.15).float()
    labels[torch.arange(B), torch.randint(s.num_classes, (B,), generator=gen)] = 1  # every image has a class
    batch = {
        "id": [f"bench_{i}" for i in range(B)],
        "image": torch.randn(B, 3, S, S, generator=gen).to(device),
        "label": labels.to(device),
        "saliency": torch.rand(B, 1, S, S, generator=gen).to(device),
    }

    def run() -> float:
        psam = None
        if fcn is not None:
            with torch.no_grad():
                psam = fcn(batch["image"]).float()
        logits = model(batch["image"]) if psam is None else model(batch["image"], psam)
        loss, _, _ = classifier_loss(logits.float(), batch["label"], batch["saliency"], psam, ccfg.alpha, ccfg.tau)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return float(loss.detach())

    return run


def _layout_settings(s: BenchSettings) -> BenchSettings:
    return dataclasses.replace(s, backbone=s.layout_backbone, train_batch=s.layout_batch, train_size=s.layout_size)


def fcn_train_step(s: BenchSettings, device: torch.device, layout: torch.memory_format) -> Callable[[], float]:
    """One Adam step of the superpixel FCN on the stage-1 loss (saliency mode, no affinity terms), random batch."""
    from net.fcn_loss import FCNLoss
    from net.spixel_fcn import build_spixel_fcn

    torch.manual_seed(s.seed)
    fcn = place_model(build_spixel_fcn(""), device, layout).train()
    optimizer = torch.optim.Adam(fcn.parameters(), lr=TRAIN_LR)
    loss_fn = FCNLoss(s.num_classes)
    gen = _generator(s.seed + 6)
    B, S = s.layout_fcn_batch, s.layout_size
    image = torch.randn(B, 3, S, S, generator=gen).to(device)
    saliency = torch.rand(B, 1, S, S, generator=gen).to(device)

    def run() -> float:
        loss = loss_fn(fcn(image), image, saliency)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def layout_inference(s: BenchSettings, device: torch.device, layout: torch.memory_format) -> Callable[[], Any]:
    """One toy image's stage-3 inference: SP-CAM (PSAM upsampling and bilinear, every t) and the CAM baseline."""
    from net.spixel_fcn import build_spixel_fcn
    from sp_cam.inference import infer_present
    from sp_cam.models import build_classifier

    torch.manual_seed(s.seed)
    ccfg = ClassifierConfig(backbone=s.layout_backbone)
    fcn = place_model(build_spixel_fcn(""), device, layout).eval()
    spcam = place_model(build_classifier(ccfg, "spcam", s.num_classes, pretrained=""), device, layout).eval()
    cam = place_model(build_classifier(ccfg, "cam", s.num_classes, pretrained=""), device, layout).eval()
    gen = _generator(s.seed + 7)
    image = torch.randn(1, 3, s.layout_size, s.layout_size, generator=gen).to(device)
    labels = torch.zeros(s.num_classes)
    labels[torch.randperm(s.num_classes, generator=gen)[: s.present]] = 1
    ts = list(LAYOUT_T_LIST)

    @torch.no_grad()
    def run() -> Any:
        infer_present(spcam, fcn, image, labels, LAYOUT_SCALES, True, ts, ("psam", "bilinear"))
        return infer_present(cam, None, image, labels, LAYOUT_SCALES, True, [0], ("bilinear",))

    return run


class _Items(torch.utils.data.Dataset):
    """``n`` in-memory (3, size, size) items: what the workers deliver does not matter, that they are forked does."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.zeros(3, self.size, self.size)


def loader_epoch(s: BenchSettings, device: torch.device, kept: bool) -> Callable[[], float]:
    """One epoch of :func:`train_step` (CAM) steps, one per batch of a 2-worker DataLoader: a loader whose workers are
    kept from epoch to epoch (``kept``, as :mod:`sp_cam.engine`) or a new one every epoch."""
    step = train_step(s, device, "cam")
    items = _Items(s.loader_steps * s.train_batch, s.train_size)

    def make() -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            items, batch_size=s.train_batch, num_workers=LOADER_WORKERS, persistent_workers=kept
        )

    kept_loader = make() if kept else None

    def run() -> float:
        loss = 0.0
        for _ in kept_loader if kept_loader is not None else make():
            loss = step()
        return loss

    return run


def train_breakdown(s: BenchSettings, device: torch.device) -> dict[str, float]:
    """Median seconds of the parts that SP-CAM adds to a CAM training step, each timed alone on the step's shapes:
    the frozen FCN's forward, the PSAM encoder E forward+backward, the kernel head T forward+backward (and its first
    conv alone), and the redistribution + PSAM pooling of the saliency forward+backward."""
    from net.spixel_fcn import build_spixel_fcn
    from sp_cam.models import build_classifier

    torch.manual_seed(s.seed)
    model = build_classifier(ClassifierConfig(backbone=s.backbone), "spcam", s.num_classes, pretrained="")
    model = place_model(model, device).train()
    if not (hasattr(model, "get_qfeats") and hasattr(model, "get_tran_conv")):
        return {}
    fcn = place_model(build_spixel_fcn(""), device).eval().requires_grad_(False)
    B, S = s.train_batch, s.train_size
    h = S // CELL_SIZE
    gen = _generator(s.seed + 4)
    image = torch.randn(B, 3, S, S, generator=gen).to(device)
    x5 = torch.randn(B, model.backbone.out_channels, h, h, generator=gen).to(device)
    z = torch.randn(B, s.num_classes + 1, h, h, generator=gen).to(device).requires_grad_(True)
    sal = torch.rand(B, 1, S, S, generator=gen).to(device)
    with torch.no_grad():
        q = fcn(image).float()
    qf = model.get_qfeats(q).detach().requires_grad_(True)
    first = model.get_tran_conv[0]
    head_in = torch.cat([x5, qf.detach()], dim=1).requires_grad_(True)

    def backward(out: torch.Tensor) -> None:
        out.float().square().mean().backward()

    def redistribute() -> None:
        w = torch.softmax(torch.randn(B, 9, h, h, generator=gen).to(device), dim=1)
        out = ops.drm_redistribute(z, w)
        backward(out + ops.psam_pool(sal, q, CELL_SIZE).mean())

    parts: dict[str, Callable[[], Any]] = {
        "fcn_forward_no_grad": _no_grad(lambda: fcn(image)),
        "drm_encoder_fwd_bwd": lambda: backward(model.get_qfeats(q)),
        "drm_head_fwd_bwd": lambda: backward(model.get_tran_conv(torch.cat([x5, qf], dim=1))),
        "drm_head_first_conv_fwd_bwd": lambda: backward(first(head_in)),
        "redistribution_and_pooling_fwd_bwd": redistribute,
    }
    times, _ = time_closures(parts, s.warmup, s.repeats, device)
    model.zero_grad(set_to_none=True)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build_cases(s: BenchSettings, device: torch.device) -> list[Case]:
    """Every timed case of the selected sections, in run order."""
    cases: list[Case] = []
    if "ops" in s.sections:
        holder: dict[str, dict[str, torch.Tensor]] = {}

        def inputs() -> dict[str, torch.Tensor]:
            if "x" not in holder:
                holder["x"] = _ops_inputs(s, device)
            return holder["x"]

        for op in OPS:
            for form in ("fast", "reference"):
                cases.append(
                    Case(
                        f"ops/{op}/{form}",
                        "ops",
                        lambda op=op, form=form: ops_closure(op, form, inputs(), s.walk_steps),
                        keep=True,
                        group=f"ops/{op}",
                    )
                )
    if "stage3" in s.sections:
        note = f"{len(s.scales) * 2} passes, {s.backbone}"
        for part in ("fcn", "classifier", "backbone"):
            cases.append(
                Case(
                    f"stage3/forward_{part}",
                    "stage3",
                    lambda part=part: forward_closure(s, device, part),
                    True,
                    False,
                    note=note,
                    group="stage3",
                )
            )
        cases += [
            Case(
                "stage3/postprocess",
                "stage3",
                lambda: postprocess_fast(s, stage3_inputs(s, device), device),
                True,
                note=f"present classes only ({s.present}), t in {list(s.t_list)}",
                keep=True,
                group="stage3",
            ),
            Case(
                "stage3/postprocess_all_channels",
                "stage3",
                lambda: postprocess_fast(s, stage3_inputs(s, device, all_present=True), device),
                True,
                note=f"all {s.num_classes} classes tagged",
                group="stage3",
            ),
            Case(
                "stage3/postprocess_reference",
                "stage3",
                lambda: postprocess_reference(s, stage3_inputs(s, device)),
                True,
                note="reference form: per pass, K+1 channels, each t from scratch",
                keep=True,
                group="stage3",
            ),
        ]
    if "walk" in s.sections:
        h, w = math.ceil(s.image[0] / PIXEL_STRIDE), math.ceil(s.image[1] / PIXEL_STRIDE)
        cases += [
            Case(
                "walk/superpixel",
                "walk",
                lambda: superpixel_walk(s, device),
                note=f"ASAM + {max(s.t_list)} steps, {2 * len(s.scales)} passes",
                group="walk",
            ),
            Case(
                "walk/pixel_dense",
                "walk",
                lambda: pixel_walk(s, device, "dense"),
                True,
                once=device.type == "cpu",
                note=f"{h}x{w} = {h * w} nodes, 8 squarings",
            ),
            Case(
                "walk/pixel_sparse",
                "walk",
                lambda: pixel_walk(s, device, "sparse"),
                note="256 stencil mat-vec steps",
                group="walk",
            ),
        ]
    if "large" in s.sections:
        nets = {"stage3": s.large_backbone, "stage4": f"DeepLab-V2 {s.seg_backbone}"}
        passes = {"stage3": 2 * len(s.scales), "stage4": 2 * len(s.seg_scales)}
        for stage in ("stage3", "stage4"):
            for bounded in (False, True):
                size = s.large_image if bounded else s.large_size
                limit = f", max_side {s.max_side}" if bounded else ", max_side off"
                cases.append(
                    Case(
                        f"large/{stage}{'_max_side' if bounded else ''}",
                        "large",
                        lambda stage=stage, bounded=bounded: large_closure(s, device, stage, bounded),
                        True,
                        once=device.type == "cpu",
                        note=f"{size[0]}x{size[1]}{limit}, {passes[stage]} passes, {nets[stage]}",
                    )
                )
    if "train" in s.sections:
        note = f"batch {s.train_batch} at {s.train_size}x{s.train_size}, {s.backbone}"
        for kind in ("cam", "spcam"):
            cases.append(
                Case(f"train/{kind}", "train", lambda kind=kind: train_step(s, device, kind), note=note, group="train")
            )
    if "loader" in s.sections:
        note = f"{s.loader_steps} CAM steps, batch {s.train_batch} at {s.train_size}x{s.train_size}, {LOADER_WORKERS} workers"
        for name, kept in (("new_per_epoch", False), ("kept", True)):
            cases.append(
                Case(
                    f"loader/{name}",
                    "loader",
                    lambda kept=kept: loader_epoch(s, device, kept),
                    heavy=True,
                    memory=False,
                    note=note,
                    group="loader",
                )
            )
    if "layout" in s.sections:
        ls = _layout_settings(s)
        train_note = f"batch {ls.train_batch} at {ls.train_size}x{ls.train_size}, {ls.backbone}"
        fcn_note = f"batch {s.layout_fcn_batch} at {ls.train_size}x{ls.train_size}"
        infer_note = f"{ls.train_size}x{ls.train_size}, scales {list(LAYOUT_SCALES)} + flips, {ls.backbone}"
        for name, layout in LAYOUTS.items():
            parts = {
                "cam": (train_note, lambda layout=layout: train_step(ls, device, "cam", layout)),
                "spcam": (train_note, lambda layout=layout: train_step(ls, device, "spcam", layout)),
                "fcn": (fcn_note, lambda layout=layout: fcn_train_step(s, device, layout)),
                "stage3": (infer_note, lambda layout=layout: layout_inference(s, device, layout)),
            }
            for part in LAYOUT_PARTS:
                note, make = parts[part]
                cases.append(Case(f"layout/{part}_{name}", "layout", make, memory=False, note=note, group="layout"))
    return cases


# --------------------------------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    peak_mib: float | None = None

    def stats(self) -> dict[str, Any]:
        xs = sorted(self.seconds)
        out: dict[str, Any] = {"repeats": len(xs), "peak_mib": self.peak_mib, "times_s": xs}
        if xs:
            q1, q3 = (statistics.quantiles(xs, n=4, method="inclusive")[::2]) if len(xs) > 1 else (xs[0], xs[0])
            out.update(median_s=statistics.median(xs), q1_s=q1, q3_s=q3, min_s=xs[0], max_s=xs[-1])
        return out


def time_closures(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Warm up every closure, then time them interleaved for ``repeats`` rounds (one run of each per round).

    Returns:
        ({name: seconds of each timed run}, {name: output of its last run}).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            last[name] = None  # free the previous output before the next run
            _sync(device)
            start = time.perf_counter()
            last[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times, last


def _status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        return False
    return True


def measure_memory_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """(peak RSS above the current RSS in MiB, seconds) of one run of ``fn`` (call in a fresh process)."""
    gc.collect()
    exact = _reset_peak_rss()
    rss0 = _status_kib("VmRSS")
    before = rss0 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, (peak or 0) - (before or 0)) / 1024.0, seconds


def measure_memory_cuda(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    gc.collect()
    torch.cuda.empty_cache()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - start
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20, seconds


def run_memory_child(s: BenchSettings, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Run ``names`` once each in a fresh process and return {name: {"peak_mib", "seconds"}} (CPU)."""
    if not names:
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(CHILD_MMAP_THRESHOLD))
    cmd = [
        sys.executable,
        "-m",
        "tools.benchmark",
        "--memory-child",
        json.dumps(dataclasses.asdict(s)),
        ",".join(names),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"memory child failed (exit {proc.returncode}): {' | '.join(tail)}")


def memory_child(settings_json: str, names: str) -> int:
    s = BenchSettings.from_dict(json.loads(settings_json))
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch_device(s.device)
    wanted = set(names.split(","))
    out = {}
    for case in build_cases(s, device):
        if case.name in wanted:
            fn = case.build()
            peak, seconds = measure_memory_cpu(fn)
            out[case.name] = {"peak_mib": peak, "seconds": seconds}
            del fn
            gc.collect()
    print(CHILD_MARKER + json.dumps(out), flush=True)
    return 0


def profile_closure(fn: Callable[[], Any], device: torch.device, rows: int = PROFILE_ROWS) -> list[dict[str, Any]]:
    """Top operators by self time of one run of ``fn`` (after one warm-up run) under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        _sync(device)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if "#" not in e.key]  # drop user ranges
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)[:rows]
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:PROFILE_SHAPES_CHARS],
            "self_ms": getattr(e, attr, 0) / 1000.0,
            "share": getattr(e, attr, 0) / total,
            "calls": e.count,
        }
        for e in top
    ]


# --------------------------------------------------------------------------------------------------------------------
# Checks (not timed)


def check_ops(outputs: dict[str, Any]) -> dict[str, float]:
    """Max |fast - reference| per operator, from the outputs of the timed runs (same inputs)."""
    return {
        op: float((outputs[f"ops/{op}/fast"] - outputs[f"ops/{op}/reference"]).abs().max())
        for op in OPS
        if f"ops/{op}/fast" in outputs and f"ops/{op}/reference" in outputs
    }


def check_stage3(fast: dict[tuple[int, float], torch.Tensor], slow: dict[tuple[int, float], torch.Tensor]) -> float:
    """Smallest fraction of pixels where the fast and the reference labels agree, over every (t, th)."""
    return min(float((fast[k].cpu() == slow[k].cpu()).float().mean()) for k in slow)


def check_pixel_walk(seed: int) -> float:
    """Max |dense - sparse| of the pixel walk on a small grid (the dense squaring against 256 mat-vec steps)."""
    cam, edge = pixel_inputs((96, 128), 4, seed, torch.device("cpu"))
    cfg = PixelWalkConfig()
    dense = pixel_random_walk(cam.double(), edge.double(), cfg, "dense")
    sparse = pixel_random_walk(cam.double(), edge.double(), cfg, "sparse")
    return float((dense - sparse).abs().max())


# --------------------------------------------------------------------------------------------------------------------
# Pseudo-label throughput


def pseudo_throughput(s: BenchSettings) -> dict[str, Any]:
    """Images/s of the command ``python -m sp_cam.make_pseudo`` (a child process, start-up included) on a generated toy
    split with random-init models in the trainers' format."""
    try:
        from net.spixel_fcn import build_spixel_fcn
        from sp_cam.config import Config, save_config
        from sp_cam.io import save_checkpoint
        from sp_cam.models import build_classifier, classifier_payload
        from sp_cam.open_data import open_dataset
        from sp_cam.paths import RunPaths
    except ImportError as e:
        return {"skipped": f"pseudo-label command not available ({e})"}
    with tempfile.TemporaryDirectory(prefix="spcam_bench_") as tmp:
        cfg = Config()
        cfg.run.work_dir = str(Path(tmp) / "run")
        cfg.run.device = s.device
        cfg.run.log_level = "WARNING"
        cfg.run.num_threads = s.threads
        cfg.data.dataset = "toy"
        cfg.data.pseudo_split = "train"
        cfg.toy.num_train = s.pseudo_images
        cfg.toy.num_val = 1
        cfg.toy.image_size = s.pseudo_image_size
        cfg.toy.seed = s.seed
        cfg.spcam.backbone = s.pseudo_backbone
        cfg.cam.backbone = s.pseudo_backbone
        cfg.pseudo.scales = list(s.scales)
        cfg.pseudo.t_list = list(s.t_list)
        cfg.pseudo.th_list = list(s.th_list)
        layout = open_dataset(cfg)  # generate the toy set outside the timed run
        paths = RunPaths.from_work_dir(cfg.run.work_dir)
        torch.manual_seed(s.seed)
        model = build_classifier(cfg.spcam, "spcam", layout.num_classes, pretrained="")
        payload = classifier_payload("spcam", model.state_dict(), cfg, layout.class_names, {})
        save_checkpoint(RunPaths.model(paths.spcam), payload)
        save_checkpoint(RunPaths.model(paths.fcn), {"model": build_spixel_fcn("").state_dict()})
        config_path = Path(tmp) / "bench.yaml"
        save_config(cfg, config_path)
        n = len(layout.ids(cfg.data.pseudo_split))
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "sp_cam.make_pseudo", "-c", str(config_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [""]
            return {"skipped": f"sp_cam.make_pseudo exited with {proc.returncode}: {tail[0]}"}
        done = len(list(paths.pseudo_labels.glob("*.png")))
    return {
        "images": n,
        "labels_written": done,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "image_size": s.pseudo_image_size,
        "backbone": s.pseudo_backbone,
        "note": "whole command in a child process: start-up, model loading, scores, sweep, PNGs",
    }


# --------------------------------------------------------------------------------------------------------------------
# Report


def _median(results: dict[str, dict[str, Any]], name: str) -> float | None:
    r = results.get(name)
    return None if r is None or "median_s" not in r else float(r["median_s"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def summarise(s: BenchSettings, results: dict[str, dict[str, Any]], checks: dict[str, Any]) -> dict[str, Any]:
    med = lambda name: _median(results, name)  # noqa: E731
    summary: dict[str, Any] = {}
    fast = [med(f"ops/{op}/fast") for op in OPS]
    slow = [med(f"ops/{op}/reference") for op in OPS]
    if all(v is not None for v in fast + slow):
        summary["ops_speedup"] = sum(slow) / sum(fast)  # type: ignore[arg-type]
        summary["ops_speedup_per_op"] = {op: _ratio(b, a) for op, a, b in zip(OPS, fast, slow, strict=True)}
    if "ops_max_abs_diff" in checks:
        summary["ops_max_abs_diff"] = max(checks["ops_max_abs_diff"].values())
    forwards = [med("stage3/forward_fcn"), med("stage3/forward_classifier")]
    if all(v is not None for v in forwards):
        total = sum(forwards)  # type: ignore[arg-type]
        summary["forward_s"] = total
        summary["postprocess_fraction"] = _ratio(med("stage3/postprocess"), total)
        summary["postprocess_all_channels_fraction"] = _ratio(med("stage3/postprocess_all_channels"), total)
        summary["postprocess_reference_fraction"] = _ratio(med("stage3/postprocess_reference"), total)
        summary["drm_forward_s"] = (
            None if med("stage3/forward_backbone") is None else forwards[1] - med("stage3/forward_backbone")  # type: ignore[operator]
        )
    summary["postprocess_speedup_vs_reference"] = _ratio(med("stage3/postprocess_reference"), med("stage3/postprocess"))
    summary["rw_speedup_vs_pixel"] = _ratio(med("walk/pixel_dense"), med("walk/superpixel"))
    summary["rw_speedup_vs_pixel_sparse"] = _ratio(med("walk/pixel_sparse"), med("walk/superpixel"))
    summary["spcam_step_ratio"] = _ratio(med("train/spcam"), med("train/cam"))
    summary["loader_kept_speedup"] = _ratio(med("loader/new_per_epoch"), med("loader/kept"))
    layout = {p: _ratio(med(f"layout/{p}_contiguous"), med(f"layout/{p}_channels_last")) for p in LAYOUT_PARTS}
    if any(v is not None for v in layout.values()):
        summary["layout_speedup"] = layout
    large = {}
    for stage in ("stage3", "stage4"):
        for bounded, size in ((False, s.large_size), (True, s.large_image)):
            name = f"{stage}_max_side" if bounded else stage
            peak = results.get(f"large/{name}", {}).get("peak_mib")
            if peak is not None:
                large[name] = peak / (size[0] * size[1] / 1e6)
    if large:
        summary["large_peak_mib_per_mp"] = large
    ops_mem = {
        op: (results.get(f"ops/{op}/fast", {}).get("peak_mib"), results.get(f"ops/{op}/reference", {}).get("peak_mib"))
        for op in OPS
    }
    if all(a is not None and b is not None for a, b in ops_mem.values()):
        summary["ops_peak_mib"] = {op: {"fast": a, "reference": b} for op, (a, b) in ops_mem.items()}
    return {k: v for k, v in summary.items() if v is not None}


def evaluate_targets(s: BenchSettings, summary: dict[str, Any]) -> list[dict[str, Any]]:
    at_spec = not s.quick and s.device == "cpu"
    out = []
    for key, (op, goal) in TARGETS.items():
        value = summary.get(key)
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        entry = {"key": key, "value": value, "target": f"{op} {goal:g}", "met": met, "at_issue_sizes": at_spec}
        if met is False:
            entry["by"] = f"{goal / value:.2f}x short" if op == ">=" else f"{value / goal:.2f}x over"
        out.append(entry)
    mem = summary.get("ops_peak_mib")
    if mem:
        worse = [op for op, m in mem.items() if m["fast"] >= m["reference"]]
        out.append(
            {
                "key": "ops_lower_peak_memory",
                "value": {op: round(m["fast"] / max(m["reference"], 1e-9), 3) for op, m in mem.items()},
                "target": "fast peak < reference peak for every operator",
                "met": not worse,
                "at_issue_sizes": at_spec,
                **({"by": f"not lower for {', '.join(worse)}"} if worse else {}),
            }
        )
    return out


PROFILE_CASES = {  # target -> the cases whose profile says what limits it
    "ops_speedup": ["ops/pool/fast", "ops/upsample/fast", "ops/asam/fast", "ops/walk/fast"],
    "postprocess_fraction": ["stage3/postprocess"],
    "rw_speedup_vs_pixel": ["walk/superpixel"],
    "spcam_step_ratio": ["train/spcam", "train/cam"],
}


def _fmt_time(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1000:.3g} ms" if x * 1000 < 100 else f"{x * 1000:.0f} ms"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in x.items())
    return str(x)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"## spcam benchmark: {report['device_name']} ({report['device']}, threads: {report['threads']}, torch "
        f"{report['torch']}){'; QUICK sizes, not the issue-6 figures' if s['quick'] else ''}",
        "",
        f"Command: `{report.get('command', 'python -m tools.benchmark')}`",
        "",
        "| case | median | IQR | min - max | repeats | peak mem (MiB) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["cases"].items():
        iqr = f"{_fmt_time(r.get('q1_s'))} - {_fmt_time(r.get('q3_s'))}" if r.get("repeats", 0) > 1 else "-"
        span = f"{_fmt_time(r.get('min_s'))} - {_fmt_time(r.get('max_s'))}" if r.get("repeats", 0) > 1 else "-"
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
        lines.append(
            f"| {name} | {_fmt_time(r.get('median_s'))} | {iqr} | {span} | {r.get('repeats', 0)} | {peak} | {r.get('note', '')} |"
        )
    pseudo = report.get("pseudo", {})
    if pseudo:
        text = pseudo.get("skipped") or (
            f"{pseudo['images_per_s']:.2f} images/s ({pseudo['images']} toy images of {pseudo['image_size']} px, "
            f"{pseudo['backbone']} backbone, {pseudo['seconds']:.1f} s, {pseudo['note']})"
        )
        lines += ["", f"Pseudo-label command: {text}"]
    lines += ["", "| summary | value |", "|---|---|"]
    for key in (
        "ops_speedup",
        "ops_speedup_per_op",
        "ops_max_abs_diff",
        "postprocess_fraction",
        "postprocess_all_channels_fraction",
        "postprocess_reference_fraction",
        "postprocess_speedup_vs_reference",
        "rw_speedup_vs_pixel",
        "rw_speedup_vs_pixel_sparse",
        "spcam_step_ratio",
        "loader_kept_speedup",
        "layout_speedup",
        "pseudo_images_per_s",
        "stage3_label_agreement",
        "pixel_walk_dense_vs_sparse_max_abs_diff",
        "large_peak_mib_per_mp",
    ):
        if key in report:
            lines.append(f"| {key} | {_fmt(report[key])} |")
    lines += ["", "| target (issue 6) | value | goal | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: f"NO ({t.get('by', '')})", None: "not measured"}[t["met"]]
        if not t["at_issue_sizes"]:
            met += " (not at the issue's sizes/device)"
        lines.append(f"| {t['key']} | {_fmt(t['value'])} | {t['target']} | {met} |")
    for t in report["targets"]:
        if t.get("breakdown_s"):
            lines += ["", f"Parts of the steps behind {t['key']} (median, each timed alone):", ""]
            lines += [f"    {_fmt_time(v):>10}  {k}" for k, v in t["breakdown_s"].items() if v is not None]
        for case, rows in t.get("profile", {}).items():
            lines += ["", f"Profile of {case} (limits {t['key']}; top ops by self time):", ""]
            lines += [
                f"    {r['self_ms']:9.2f} ms {100 * r['share']:5.1f}%  x{r['calls']:<4d} {r['op']} {r.get('shapes', '')}"
                for r in rows
            ]
    for note in report.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return platform.processor() or "cpu"


def run_benchmark(s: BenchSettings) -> dict[str, Any]:
    """Run the selected sections and return the report (every figure, the summary keys, the targets, notes)."""
    threads = torch.get_num_threads()
    try:
        if s.threads:
            torch.set_num_threads(s.threads)
        return _run_benchmark(s)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(s: BenchSettings) -> dict[str, Any]:
    device = torch_device(s.device)
    if any(v % CELL_SIZE for v in s.ops_size):
        raise ValueError(f"--size {s.ops_size[0]} {s.ops_size[1]}: both must be multiples of the cell size {CELL_SIZE}")
    bad = [x for x in s.sections if x not in SECTIONS]
    if bad:
        raise ValueError(f"--sections: unknown {bad}; expected any of {', '.join(SECTIONS)}")
    cases = build_cases(s, device)
    by_name = {c.name: c for c in cases}
    notes: list[str] = []
    child: dict[str, dict[str, float]] = {}
    if s.memory and device.type == "cpu":
        log.info("memory: %d cases in a child process", sum(c.memory or c.once for c in cases))
        child = run_memory_child(s, [c.name for c in cases if c.memory or c.once])
    elif not s.memory:
        notes.append("peak memory not measured (--no-memory)")

    timings = {c.name: Timing() for c in cases}
    outputs: dict[str, Any] = {}
    groups: dict[str, list[Case]] = {}
    for case in cases:
        if case.once and case.name in child:
            timings[case.name].seconds = [child[case.name]["seconds"]]
        else:
            groups.setdefault(case.group or case.name, []).append(case)
    for _group, members in groups.items():
        log.info("timing %s", ", ".join(c.name for c in members))
        fns = {c.name: c.build() for c in members}
        heavy, once = any(c.heavy for c in members), any(c.once for c in members)
        warmup, repeats = (0, 1) if once else (s.heavy_warmup, s.heavy_repeats) if heavy else (s.warmup, s.repeats)
        times, last = time_closures(fns, warmup, repeats, device)
        for c in members:
            timings[c.name].seconds = times[c.name]
            if c.keep:
                outputs[c.name] = last[c.name]
            if c.memory and device.type == "cuda":
                timings[c.name].peak_mib = measure_memory_cuda(fns[c.name], device)[0]
        del fns, last
        gc.collect()
    _MODELS.clear()
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        if case.name in child and case.memory:
            timings[case.name].peak_mib = child[case.name]["peak_mib"]
        results[case.name] = {**timings[case.name].stats(), "section": case.section, "note": case.note}

    checks: dict[str, Any] = {}
    if "ops" in s.sections:
        checks["ops_max_abs_diff"] = check_ops(outputs)
    report: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": dataclasses.asdict(s),
        "cases": results,
        "checks": checks,
    }
    if "stage3/postprocess" in outputs and "stage3/postprocess_reference" in outputs:
        report["stage3_label_agreement"] = check_stage3(
            outputs["stage3/postprocess"], outputs["stage3/postprocess_reference"]
        )
    outputs.clear()
    if "walk" in s.sections:
        report["pixel_walk_dense_vs_sparse_max_abs_diff"] = check_pixel_walk(s.seed)
    if "pseudo" in s.sections:
        log.info("timing the pseudo-label command")
        report["pseudo"] = pseudo_throughput(s)
        if "images_per_s" in report["pseudo"]:
            report["pseudo_images_per_s"] = report["pseudo"]["images_per_s"]
    summary = summarise(s, results, checks)
    report.update(summary)
    targets = evaluate_targets(s, summary)
    if s.profile:
        for t in targets:
            if t["met"] is False and t["key"] in PROFILE_CASES:
                t["profile"] = {}
                for name in PROFILE_CASES[t["key"]]:
                    if name in by_name:
                        log.info("profiling %s", name)
                        t["profile"][name] = profile_closure(by_name[name].build(), device)
                if t["key"] == "spcam_step_ratio":
                    log.info("timing the parts of the SP-CAM step")
                    t["breakdown_s"] = {
                        "cam_step": _median(results, "train/cam"),
                        "spcam_step": _median(results, "train/spcam"),
                        **train_breakdown(s, device),
                    }
    report["targets"] = targets
    if s.quick:
        notes.append(
            f"quick mode: operators at {s.ops_size[0]}x{s.ops_size[1]}, a {s.image[0]}x{s.image[1]} image (not 375x500; "
            f"the dense pixel walk is cubic in the node count), the {s.backbone} backbone, training at "
            f"{s.train_size}x{s.train_size}; ratios are not comparable with the issue's targets"
        )
    if "walk" in s.sections:
        notes.append(
            f"walk: both walks carry all K+1 = {s.channels} channels; the pixel walk excludes its affinity network, "
            "the superpixel walk its FCN"
        )
    report["notes"] = notes
    return report


# --------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=str, default="cpu", choices=("cpu", "cuda"), help="where to run")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="operator size (512 512)")
    p.add_argument("--image", type=int, nargs=2, default=None, metavar=("H", "W"), help="stage-3 image (375 500)")
    p.add_argument("--backbone", type=str, default=None, help="classifier backbone (resnet50; quick: tiny)")
    p.add_argument("--large-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="large: without max_side")
    p.add_argument("--large-image", type=int, nargs=2, default=None, metavar=("H", "W"), help="large: under max_side")
    p.add_argument("--max-side", type=int, default=None, help=f"large: max_side of the bounded cases ({MAX_SIDE})")
    p.add_argument("--large-backbone", type=str, default=None, help="large: stage-3 classifier backbone (tiny)")
    p.add_argument("--seg-backbone", type=str, default=None, help="large: stage-4 DeepLab backbone (resnet101)")
    p.add_argument("--json", type=str, default="", help="write every figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="small sizes, 1-3 repeats (< 60 s on 2 cores)")
    p.add_argument("--sections", type=str, default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per case (0: 7, heavy cases 3; quick 3/2)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-profile", action="store_true", help="do not profile the cases behind missed targets")
    p.add_argument("--profile", action="store_true", help="profile missed targets even with --quick")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and models")
    p.add_argument("--memory-child", type=str, nargs=2, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    s = BenchSettings(device=args.device, seed=args.seed, threads=args.threads)
    if args.device == "cuda":
        s.train_batch, s.train_size = TRAIN_CUDA
    if args.quick:
        s = dataclasses.replace(s, quick=True, **QUICK)
        if args.device == "cuda":
            s.train_batch = TRAIN_CUDA[0] // 4
    if args.threads:
        s.threads = args.threads
    if args.size:
        s.ops_size = tuple(args.size)
    if args.image:
        s.image = tuple(args.image)
    if args.backbone:
        s.backbone = args.backbone
    for name in ("large_size", "large_image"):
        if getattr(args, name):
            setattr(s, name, tuple(getattr(args, name)))
    if args.max_side is not None:
        if args.max_side < 1:
            raise ValueError(f"--max-side must be >= 1, got {args.max_side}")
        s.max_side = args.max_side
    if args.large_backbone:
        s.large_backbone = args.large_backbone
    if args.seg_backbone:
        s.seg_backbone = args.seg_backbone
    if args.repeats:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        s.repeats = s.heavy_repeats = args.repeats
    s.sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    s.memory = not args.no_memory
    s.profile = (s.profile and not args.no_profile) or args.profile
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(*args.memory_child)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        s = settings_from_args(args)
        report = run_benchmark(s)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["command"] = " ".join(["python -m tools.benchmark", *(sys.argv[1:] if argv is None else argv)])
    print(markdown(report))
    if args.json:
        atomic_write_json(Path(args.json), report)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
