"""Stage 3 inference (docs/method.md §4): multi-scale + flip passes, random walk, PSAM upsampling, fusion, thresholds.

Per image (batch 1, original size H0 x W0, image-level tags):

1. For every scale s the classifier input is resized twice (to ``round(H0 s)``, then up to a multiple of 16) and the FCN
   input once (docs/decisions.md D17); the flipped copy of the same scale goes in the same batch, so one forward serves both passes.
2. ``psam = fcn(fcn_input)``, ``asam = ASAM(psam)`` once per pass; ``pi = softmax over K+1 of model(cls_input, psam)``.
3. For every t: ``A^t pi`` on that pass's grid (release order docs/decisions.md D7), PSAM upsampling, bilinear resize to the padded
   scale-1 size, un-flip, SUM over the passes. The "bilinear" mode of the ablation resizes the walked grid scores
   straight to the padded scale-1 size instead.
4. ``ReLU(F - 1e-5) / (max ReLU(F) + 1e-5)`` per channel (PuzzleCAM ``make_cam``), times the tags, bilinear to (H0, W0).
5. Labels: channel 0 := th, argmax over K+1.

Speed-up (docs/method.md §11, exact for the labels): only the image's present foreground classes are walked, upsampled and fused.
The walk, the fusion and the normalisation act on each channel separately, absent classes are zeroed by the tags anyway,
and the background channel is replaced by th, so the label maps are identical to walking all K+1 channels. The returned
score maps therefore hold 0 in channel 0 (the model's own background probability is never used).
Other savings (docs/method.md §8.2, §11): the ASAM is computed once per pass; the walks are incremental over ``t_list`` (20, +10,
+10) and run for all passes in one batch (grids zero-padded to the largest, which is exact); every t is upsampled in
one call; flipped passes are un-flipped once after the sum. Measured: 0.33 s of CPU time (1 thread) for the
post-processing of a 375x500 image with 2 present classes, 8 passes and t in {0, 20, 30, 40} (networks excluded).

Baseline CAM path (``fcn is None`` or a ``CAMModel``; docs/method.md §4 "step B variant"): no PSAM and no walk; the per-pass
softmax on the 1/16 grid is resized bilinearly straight to (H0, W0), then fused and normalised the same way (key t = 0).

Memory (``tools/benchmark.py --sections large``): the peak is the superpixel FCN's forward of the largest scale (the
flipped pair in one batch, about 3.8 GiB per megapixel of the image for its 2x pass); everything after the forwards
stays below it. ``max_side`` bounds it: an image whose longer side exceeds it is resized (bilinear, antialiased, aspect
kept) to that longer side, inference runs there, and the fused scores are resized back to (H0, W0) at the end, so only
the outputs are held at full size. Exact savings at any size: the forwards run largest scale first (nothing else is held
during the largest one; the walk and the fusion still take the passes in the order of ``scales``), each pass's PSAM is
released once the pass is fused, and the normalisation works in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data.transforms import inference_inputs, padded_size
from net.psam import CELL_SIZE, asam, hard_assignment, psam_upsample, random_walk_multi
from sp_cam.metrics import IoUResult, confusion_matrix, iou_from_confusion
from sp_cam.runtime import place_model

log = logging.getLogger(__name__)

NORM_EPS = 1e-5  # ref (PuzzleCAM make_cam): ReLU(F - 1e-5) / (max ReLU(F) + 1e-5)
UPSAMPLE_MODES = ("psam", "bilinear")


@dataclass
class FusedScores:
    """Fused, normalised scores of the present foreground classes of one image.

    Attributes:
        classes: (n,) int64, the present foreground classes (1..K), ascending.
        scores: {(upsample, t): (n, H0, W0) float32 in [0, 1]}; row i holds class ``classes[i]``.
        size: (H0, W0).
        psam: (1, 9, H1, W1) PSAM of the unflipped scale-1 pass (when that pass ran; superpixel maps), else None; that
            of the resized image when ``max_side`` resized it.
        gap: (K,) float32 global-average-pooled foreground logits of the unflipped scale-1 pass (classification
            scores), when that pass ran, else None.
    """

    classes: torch.Tensor
    scores: dict[tuple[str, int], torch.Tensor]
    size: tuple[int, int]
    psam: torch.Tensor | None = field(default=None)
    gap: torch.Tensor | None = field(default=None)


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameter-free module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def scaled_size(size: tuple[int, int], scale: float, cell_size: int = CELL_SIZE) -> tuple[int, int]:
    """docs/method.md §4 step 1: ``round(H0 * s)`` rounded up to a multiple of ``cell_size`` (same for W)."""
    return padded_size(int(size[0]), int(size[1]), scale, cell_size)[1]


def _is_cam_model(model: nn.Module, fcn: nn.Module | None) -> bool:
    kind = getattr(model, "model_type", None)
    if kind is None and hasattr(model, "module"):  # DistributedDataParallel / DataParallel wrapper
        kind = getattr(model.module, "model_type", None)
    if kind == "spcam" and fcn is None:
        raise ValueError("an SP-CAM model needs the superpixel FCN (fcn is None)")
    return fcn is None or kind == "cam"


def present_classes(labels: torch.Tensor) -> torch.Tensor:
    """(K,) multi-hot -> (n,) int64 foreground class indices 1..K, ascending."""
    return torch.nonzero(torch.as_tensor(labels).reshape(-1) > 0).reshape(-1).long() + 1


def max_side_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The inference size of an image under ``max_side``: (H, W) itself when ``max_side`` is 0 or the longer side is at
    most ``max_side``, else the size whose longer side is ``max_side`` and whose shorter side is rounded to keep the
    aspect (at least 1)."""
    H, W = int(size[0]), int(size[1])
    if max_side <= 0 or max(H, W) <= max_side:
        return H, W
    if H >= W:
        return max_side, max(1, round(W * max_side / H))
    return max(1, round(H * max_side / W)), max_side


def resize_to_max_side(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, h, w) at :func:`max_side_size` (bilinear, antialiased); ``x`` itself if it fits."""
    size = max_side_size(tuple(x.shape[-2:]), max_side)
    if size == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W) bilinear (``align_corners=False``) on the maps' device; the input if already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def infer_present(
    model: nn.Module,
    fcn: nn.Module | None,
    image: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    t_list: Sequence[int] = (0,),
    upsamples: Sequence[str] = ("psam",),
    renormalize_asam: bool = False,
    cell_size: int = CELL_SIZE,
    keep_psam: bool = False,
    *,
    max_side: int = 0,
) -> FusedScores:
    """Fused scores of the image's present classes for every (upsample mode, t); the networks run once per scale.

    Several upsampling modes share the forwards and the walks (the ablation's bilinear row costs only the resize).
    Models are used as given (call ``.eval()`` first). Runs on the device of ``model``.

    Args:
        model: CAMModel ``x -> (B, K+1, h, w)`` or SPCAMModel ``(x, psam) -> (B, K+1, h, w)`` logits.
        fcn: SpixelNet ``x -> (B, 9, H, W)`` PSAM, or None for the baseline CAM path.
        image: (1, 3, H0, W0) ImageNet-normalised image.
        labels: (K,) multi-hot image-level tags (foreground only).
        scales: test scales (ref: 0.5, 1, 1.5, 2).
        flip: add the horizontally flipped pass of every scale (batched with the unflipped one).
        t_list: random-walk step counts (ignored on the CAM path, whose only key is t = 0).
        upsamples: any of "psam", "bilinear" (grid -> padded scale-1 size directly); the CAM path is always bilinear.
        renormalize_asam: docs/decisions.md D6, renormalise ASAM rows to 1.
        keep_psam: keep the PSAM of the unflipped scale-1 pass in the result.
        max_side: 0 = off. An image whose longer side is above it runs at :func:`max_side_size` (resized by
            :func:`resize_to_max_side`) and every score map is resized back to (H0, W0) by :func:`upsample_maps` on the
            CPU: the result is exactly that of the resized image, upsampled (its PSAM is the resized image's). Logged.
    Returns:
        :class:`FusedScores` at (H0, W0); on the CAM path the keys are ("bilinear", 0).
    """
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"image must have shape (1, 3, H, W), got {tuple(image.shape)}")
    if not scales:
        raise ValueError("at least one test scale is needed")
    bad = [u for u in upsamples if u not in UPSAMPLE_MODES]
    if bad or not upsamples:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {list(upsamples)}")
    if max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0 = off), got {max_side}")
    args = (labels, scales, flip, t_list, upsamples, renormalize_asam, cell_size, keep_psam)
    size = (int(image.shape[2]), int(image.shape[3]))
    run_size = max_side_size(size, max_side)
    if run_size == size or present_classes(labels).numel() == 0:
        return _fused_scores(model, fcn, image, *args)
    log.info("image %dx%d is above max_side=%d: inference at %dx%d, scores resized back", *size, max_side, *run_size)
    small = resize_to_max_side(image.to(model_device(model), torch.float32), max_side)
    res = _fused_scores(model, fcn, small, *args)
    del small
    scores = {key: upsample_maps(maps, size) for key, maps in res.scores.items()}
    return FusedScores(res.classes, scores, size, res.psam, res.gap)


def _fused_scores(
    model: nn.Module,
    fcn: nn.Module | None,
    image: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    t_list: Sequence[int],
    upsamples: Sequence[str],
    renormalize_asam: bool,
    cell_size: int,
    keep_psam: bool,
) -> FusedScores:
    """:func:`infer_present` at the image's own size (arguments validated there)."""
    device = model_device(model)
    image = image.to(device, torch.float32)
    size = (int(image.shape[2]), int(image.shape[3]))
    labels = torch.as_tensor(labels).reshape(-1)
    classes = present_classes(labels).to(device)
    cam_path = _is_cam_model(model, fcn)
    keys = (
        [("bilinear", 0)] if cam_path else [(u, int(t)) for u in dict.fromkeys(upsamples) for t in sorted(set(t_list))]
    )
    n = int(classes.numel())
    if n == 0:  # no tags: every pixel is background whatever the networks say
        empty = image.new_zeros(0, *size)
        return FusedScores(classes.cpu(), {k: empty.cpu() for k in keys}, size)

    # Fusion size: (H0, W0) on the CAM path (step B variant), the padded scale-1 size otherwise.
    fuse_size = size if cam_path else scaled_size(size, 1.0, cell_size)
    ts = [0] if cam_path else sorted(set(int(t) for t in t_list))
    modes = ["bilinear"] if cam_path else list(dict.fromkeys(upsamples))
    psam_keep = gap = None
    # per scale, in the order of `scales`: (PSAM or None, probabilities (P, n, h, w), ASAM or None)
    passes: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None] = [None] * len(scales)
    # largest scale first: its forward, the peak of the call, then runs with no other pass held
    for i in sorted(range(len(scales)), key=lambda i: -float(scales[i])):
        cls_in, fcn_in = inference_inputs(image, float(scales[i]), cell_size)
        if flip:  # one forward for the pair of the same size
            fcn_in = torch.cat([fcn_in, fcn_in.flip(-1)])
        q = None if cam_path else fcn(fcn_in).float()
        del fcn_in
        if flip:
            cls_in = torch.cat([cls_in, cls_in.flip(-1)])
        logits = model(cls_in) if cam_path else model(cls_in, q)
        del cls_in
        if logits.shape[1] != labels.numel() + 1:
            raise ValueError(
                f"the model predicts {logits.shape[1]} channels but the dataset has {labels.numel()} classes + background"
            )
        if gap is None and float(scales[i]) == 1.0:
            gap = logits[:1].float().mean(dim=(2, 3))[0, 1:].cpu()
        prob = torch.softmax(logits.float(), dim=1).index_select(1, classes)  # (P, n, h, w)
        del logits
        if cam_path:
            passes[i] = (None, prob, None)
            continue
        if keep_psam and psam_keep is None and float(scales[i]) == 1.0:
            psam_keep = q[:1].to("cpu", copy=True)
        passes[i] = (q, prob, asam(q, cell_size=cell_size, renormalize=renormalize_asam))

    # One buffer per mode holding every t: (passes in a batch, T * n, H, W). The flipped passes are summed in their
    # own slot and un-flipped once at the end, instead of once per pass.
    acc: dict[str, torch.Tensor] = {}
    if cam_path:
        for _, prob, _ in passes:
            _add(acc, "bilinear", F.interpolate(prob, size=fuse_size, mode="bilinear", align_corners=False))
    else:
        walked = _walk_passes([p for _, p, _ in passes], [a for _, _, a in passes], ts)
        for j, ((q, _, _), g) in enumerate(zip(passes, walked, strict=True)):  # g: (P, T * n, h, w), every t at once
            passes[j] = walked[j] = None  # the pass's PSAM goes as soon as it is fused
            for mode in modes:
                if mode == "psam":
                    up = psam_upsample(g, q, cell_size=cell_size)
                    if tuple(up.shape[-2:]) != fuse_size:
                        up = F.interpolate(up, size=fuse_size, mode="bilinear", align_corners=False)
                else:
                    up = F.interpolate(g, size=fuse_size, mode="bilinear", align_corners=False)
                _add(acc, mode, up)
                del up
        del walked, q, g
    del passes

    scores = {}
    for mode in modes:
        buf = acc.pop(mode)
        fused = buf[0] + buf[1].flip(-1) if buf.shape[0] > 1 else buf[0]  # (T * n, H, W), summed over the passes
        del buf
        cam = upsample_maps(_normalise_(fused), size)  # absent classes are not in the buffer: the tag mask is implicit
        del fused
        cam = cam.cpu().view(len(ts), n, *size)
        for i, t in enumerate(ts):
            scores[(mode, t)] = cam[i]
    return FusedScores(classes.cpu(), scores, size, psam_keep, gap)


def _normalise_(fused: torch.Tensor) -> torch.Tensor:
    """PuzzleCAM ``make_cam`` per channel, in place: (..., n, H, W) -> ``fused``, max of each channel just below 1.

    ``ReLU(F - eps) / (max ReLU(F) + eps)``, the same operations on every element as the out-of-place form.
    """
    peak = fused.amax(dim=(-2, -1), keepdim=True).clamp_min_(0)  # = max ReLU(F): ReLU is monotonic
    return fused.sub_(NORM_EPS).relu_().div_(peak + NORM_EPS)


def _walk_passes(probs: list[torch.Tensor], asams: list[torch.Tensor], ts: list[int]) -> list[torch.Tensor]:
    """Random walks of all passes in one batch (the walk is latency-bound: 25 small ops per step).

    Every grid is zero-padded (bottom/right) to the largest one. This is exact: a padded cell has zero affinities, so
    it stays 0, which is the value the walk reads outside a grid anyway.

    Args:
        probs: per scale (P, n, h_s, w_s) grid scores; asams: per scale (P, 25, h_s, w_s).
    Returns:
        per scale (P, T * n, h_s, w_s): the walked scores for every t of ``ts``, t-major.
    """
    hm = max(p.shape[-2] for p in probs)
    wm = max(p.shape[-1] for p in probs)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, wm - x.shape[-1], 0, hm - x.shape[-2]))

    walked = random_walk_multi(torch.cat([pad(p) for p in probs]), torch.cat([pad(a) for a in asams]), ts)
    out, start = [], 0
    for p in probs:
        b, _, h, w = p.shape
        out.append(torch.cat([walked[t][start : start + b, :, :h, :w] for t in ts], dim=1))
        start += b
    return out


def _add(acc: dict[str, torch.Tensor], mode: str, up: torch.Tensor) -> None:
    """Sum one batch of passes (P, C, H, W) into ``acc[mode]`` (the first batch becomes the buffer)."""
    if mode in acc:
        acc[mode] += up
    else:
        acc[mode] = up.clone()


def dense_scores(fused: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(n, H, W) present-class scores -> (K+1, H, W) with channel 0 and absent classes 0."""
    out = fused.new_zeros(num_classes + 1, *fused.shape[-2:])
    if classes.numel():
        out[classes.to(fused.device)] = fused
    return out


def infer_scores(
    model: nn.Module,
    fcn: nn.Module | None,
    image: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    t_list: Sequence[int] = (0,),
    upsample: str = "psam",
    renormalize_asam: bool = False,
    cell_size: int = CELL_SIZE,
) -> dict[int, torch.Tensor]:
    """Dense fused score maps of one image for every t (see :func:`infer_present` for the arguments).

    Returns:
        {t: (K+1, H0, W0) float32 in [0, 1]} on the CPU; channel 0 is 0 (replaced by th in :func:`labels_from_scores`),
        absent classes are 0. The CAM path (``fcn`` None or a CAMModel) returns the single key 0.
    """
    num_classes = int(torch.as_tensor(labels).numel())
    res = infer_present(model, fcn, image, labels, scales, flip, t_list, (upsample,), renormalize_asam, cell_size)
    return {t: dense_scores(s, res.classes, num_classes) for (_, t), s in res.scores.items()}


def labels_from_scores(scores: torch.Tensor, th: float) -> torch.Tensor:
    """Background threshold: channel 0 := th, argmax over the K+1 channels.

    Args:
        scores: (K+1, H, W) scores (channel 0 is ignored).
    Returns:
        (H, W) int64 class map; ties go to the lower index (background first), as argmax does.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape (K+1, H, W), got {tuple(scores.shape)}")
    s = scores.clone()
    s[0] = th
    return s.argmax(0)


def labels_from_present(fused: torch.Tensor, classes: torch.Tensor, th: float | Sequence[float]) -> torch.Tensor:
    """:func:`labels_from_scores` on compact present-class scores, for one th or several at once.

    Args:
        fused: (n, H, W) scores of ``classes``.
        classes: (n,) foreground class indices, ascending.
        th: a threshold, or a sequence of T thresholds.
    Returns:
        (H, W) int64, or (T, H, W) for a sequence.
    """
    ths = torch.as_tensor([th] if isinstance(th, (int, float)) else list(th), dtype=torch.float32)
    H, W = fused.shape[-2:]
    if fused.shape[0] == 0:
        out = torch.zeros(len(ths), H, W, dtype=torch.int64)
    else:
        peak, idx = fused.float().max(0)  # background wins ties (fg must be strictly above th), as the argmax above
        cls = classes.to(fused.device)[idx]
        ths = ths.to(fused.device).view(-1, 1, 1)
        out = torch.where(peak[None] > ths, cls[None], torch.zeros_like(cls)[None])
    return out[0] if isinstance(th, (int, float)) else out


def evaluate_split_confusion(
    model: nn.Module,
    fcn: nn.Module | None,
    dataset,
    t_list: Sequence[int],
    th_list: Sequence[float],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    max_images: int = 0,
    *,
    indices: Sequence[int] | None = None,
    upsample: str = "psam",
    renormalize_asam: bool = False,
    cell_size: int = CELL_SIZE,
    progress: bool = False,
    on_item: Callable[[int, dict[str, Any], FusedScores], None] | None = None,
) -> dict[tuple[int, float], np.ndarray]:
    """Confusion matrices ((K+1) x (K+1) int64) per (t, th) over a split, in one pass (sum them across ranks).

    Args:
        dataset: EvalDataset-like, items ``{"id", "image": (3, H, W), "label": (K,), "mask": (H, W)}`` (255 = ignore).
        indices: the dataset indices to run (a rank's shard); default ``range(len(dataset))``, cut to ``max_images``.
        on_item: called with (index, item, result) for every image (e.g. to collect the classification scores).
    """
    count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    idx = list(range(count)) if indices is None else list(indices)
    was_training = model.training, (fcn.training if fcn is not None else False)
    model.eval()
    if fcn is not None:
        fcn.eval()
    conf: dict[tuple[int, float], np.ndarray] = {}
    try:
        for i in tqdm(idx, desc="evaluate", unit="img", disable=not progress):
            item = dataset[i]
            label = torch.as_tensor(item["label"])
            num = int(label.numel()) + 1
            res = infer_present(
                model, fcn, item["image"][None], label, scales, flip, t_list, (upsample,), renormalize_asam, cell_size
            )
            if on_item is not None:
                on_item(i, item, res)
            mask = torch.as_tensor(item["mask"])
            for (_, t), fused in res.scores.items():
                preds = labels_from_present(fused, res.classes, list(th_list))
                for th, pred in zip(th_list, preds, strict=True):
                    key = (int(t), float(th))
                    c = confusion_matrix(pred, mask, num)
                    conf[key] = c if key not in conf else conf[key] + c
    finally:
        model.train(was_training[0])
        if fcn is not None:
            fcn.train(was_training[1])
    if not conf:  # empty split: define the keys anyway
        num = _num_classes_of(dataset) + 1
        keys = [0] if _is_cam_model(model, fcn) else sorted(set(int(t) for t in t_list))
        conf = {(t, float(th)): np.zeros((num, num), dtype=np.int64) for t in keys for th in th_list}
    return conf


def _num_classes_of(dataset) -> int:
    layout = getattr(dataset, "layout", None)
    k = getattr(layout, "num_classes", None) or getattr(dataset, "num_classes", None)
    if k is None:
        raise ValueError("cannot evaluate an empty split without knowing the number of classes")
    return int(k)


def evaluate_split(
    model: nn.Module,
    fcn: nn.Module | None,
    dataset,
    t_list: Sequence[int],
    th_list: Sequence[float],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str | None = None,
    max_images: int = 0,
    **kwargs,
) -> dict[tuple[int, float], IoUResult]:
    """mIoU of the labels for every (t, th) pair over a split, in one pass (docs/method.md §5.1), under ``torch.no_grad``.

    Args:
        model, fcn: as :func:`infer_present`; put in eval mode for the pass and restored afterwards.
        dataset: EvalDataset-like (see :func:`evaluate_split_confusion`).
        device: where the models are moved first (None: leave them where they are).
        max_images: evaluate only the first ``max_images`` images (0 = all).
        kwargs: ``indices``, ``upsample``, ``renormalize_asam``, ``cell_size``, ``progress`` of
            :func:`evaluate_split_confusion`.
    Returns:
        {(t, th): IoUResult}; the CAM path has t = 0 only.
    """
    if device is not None:
        place_model(model, device)
        if fcn is not None:
            place_model(fcn, device)
    conf = evaluate_split_confusion(model, fcn, dataset, t_list, th_list, scales, flip, max_images, **kwargs)
    return {key: iou_from_confusion(c) for key, c in conf.items()}


def best_pair(results: dict[tuple[int, float], IoUResult]) -> tuple[tuple[int, float], IoUResult]:
    """The (t, th) pair with the highest mIoU (ties: the first in sorted order)."""
    if not results:
        raise ValueError("no (t, th) results to choose from")
    key = max(sorted(results), key=lambda k: results[k].miou)
    return key, results[key]


def grid_ids(size: tuple[int, int], cell_size: int = CELL_SIZE) -> torch.Tensor:
    """Hard grid segments: (H, W) int64 index of each pixel's ``cell_size`` x ``cell_size`` cell."""
    H, W = size
    cols = -(-W // cell_size)
    ys = torch.arange(H) // cell_size
    xs = torch.arange(W) // cell_size
    return ys[:, None] * cols + xs[None, :]


def superpixel_ids(psam: torch.Tensor, size: tuple[int, int] | None = None, cell_size: int = CELL_SIZE) -> torch.Tensor:
    """Hard superpixels of a PSAM (:func:`net.psam.hard_assignment`), optionally resized to the image.

    Args:
        psam: (1, 9, H, W) or (9, H, W).
        size: (H0, W0) to resize the segment map to (nearest), e.g. the original image size.
    Returns:
        (H, W) or (H0, W0) int64 grid-cell ids.
    """
    q = psam.reshape(1, -1, *psam.shape[-2:])
    H, W = q.shape[-2:]
    ids = hard_assignment(q, cell_size)[0]
    if size is not None and tuple(size) != (H, W):
        ids = F.interpolate(ids[None, None].double(), size=tuple(size), mode="nearest")[0, 0].long()
    return ids.cpu()


def majority_labels(
    segments: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Label every segment with the majority GT class of its pixels (the superpixel upper bound).

    Args:
        segments: (H, W) integer segment ids.
        gt: (H, W) GT class indices 0..num_classes-1 or ``ignore_index`` (not counted).
    Returns:
        (H, W) int64; a segment without valid GT pixels gets 0 (its pixels are all ignored anyway).
    """
    seg = torch.as_tensor(segments).reshape(-1)
    lab = torch.as_tensor(gt).reshape(-1).long()
    uniq, inv = torch.unique(seg, return_inverse=True)
    valid = lab != ignore_index
    counts = torch.bincount(inv[valid] * num_classes + lab[valid], minlength=len(uniq) * num_classes)
    return counts.view(len(uniq), num_classes).argmax(1)[inv].view(torch.as_tensor(gt).shape)
