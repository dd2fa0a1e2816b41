"""Built-in toy dataset: a small, deterministic, VOC-layout miniature of real photos (the default when no data is set).

Scenes hold 1-3 objects of five foreground classes that differ by *shape*: star, cross, ring, crescent and arrow
(mostly non-convex, so object boundaries matter and a superpixel grid helps over bilinear CAM upsampling). Every
instance draws its own colour, size, rotation, aspect and texture (flat + noise, stripes, gradient, spots) with
shading, so neither colour nor texture identifies a class. Backgrounds are textured (gradients, low-frequency noise)
and cluttered with low-contrast blobs, lines and bars plus, often, a salient distractor (a disc or a box, not a
class). Objects may touch and overlap: later ones are drawn on top and the masks follow the occlusion. GT masks have
a thin 255 band at every object border (as VOC). Saliency maps imitate a real detector: blurred, with eroded or
dilated objects, partial misses, uneven confidence and false positives on distractors.

Every image is a pure function of ``(seed, split, index)``. The folder is written to a temporary sibling and renamed
into place, and ``toy_meta.json`` records the parameters so a complete folder is reused, never regenerated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from data.classes import IGNORE_INDEX, label_colormap
from data.voc_layout import CLS_LABELS_FILE, LABELS_FILE, LIST_DIR, SALIENCY_DIR

log = logging.getLogger(__name__)

TOY_CLASSES = ("background", "star", "cross", "ring", "crescent", "arrow")
META_FILE = "toy_meta.json"
GENERATOR_VERSION = 1  # bump when the drawing changes, so stale folders are detected
SPLIT_CODES = {"train": 0, "val": 1}
_SUBPIXEL_SHIFT = 4  # cv2 drawing with 1/16-pixel vertex precision


@dataclass(frozen=True)
class ToyStyle:
    """Drawing constants, in pixels at ``reference_size`` (scaled with the image size). Chosen by eye so that
    objects are 2-6 superpixel cells (16 px) wide and the task is solvable by shape but not by colour."""

    reference_size: int = 160
    radius: tuple[float, float] = (15.0, 45.0)  # object circumradius
    objects: tuple[int, int] = (1, 3)  # objects per image, inclusive
    min_visible_fraction: float = 0.45  # an occluded object keeps at least this share of its own pixels
    min_visible_pixels: int = 80  # a class counts as present from this many visible pixels
    placement_tries: int = 12
    edge_softness: float = 0.6  # Gaussian sigma of the anti-aliased object edge
    jpeg_quality: int = 90
    ignore_band_half_width: float = 1.0  # 255 band reaches this far on each side of a border (VOC: ~2-3 px at 500)
    blobs: tuple[int, int] = (3, 8)  # low-contrast background blobs
    lines: tuple[int, int] = (1, 5)  # background lines / bars
    salient_distractor_prob: float = 0.6  # a high-contrast non-class object (disc or box)
    # saliency detector imitation
    sal_blur: tuple[float, float] = (0.8, 2.5)  # Gaussian sigma of the saliency map
    sal_morph_prob: float = 0.5  # erode or dilate an object's saliency
    sal_morph_px: tuple[int, int] = (1, 4)
    sal_confidence: tuple[float, float] = (0.6, 1.0)  # per-object peak saliency
    sal_object_miss_prob: float = 0.08  # an object the detector (almost) misses ...
    sal_object_miss_gain: tuple[float, float] = (0.1, 0.4)  # ... with this peak saliency
    sal_partial_miss_prob: float = 0.35  # part of an object is missed ...
    sal_partial_miss_gain: tuple[float, float] = (0.05, 0.45)  # ... down to this share of its confidence
    sal_distractor_prob: float = 0.7  # the salient distractor shows up in the saliency
    sal_false_blob_prob: float = 0.4  # a spurious blob somewhere
    sal_false_gain: tuple[float, float] = (0.25, 0.8)
    sal_noise: float = 0.02


STYLE = ToyStyle()


@dataclass(frozen=True)
class ToySample:
    image: np.ndarray  # (S, S, 3) uint8 RGB
    mask: np.ndarray  # (S, S) uint8, 0..K, 255 at borders
    saliency: np.ndarray  # (S, S) uint8 0..255
    labels: list[int]  # present foreground classes, ascending


# -------------------------------------------------------------------- shapes


def _rotate(points: np.ndarray, angle: float, aspect: float) -> np.ndarray:
    """(N, 2) local (x, y) -> stretched by ``aspect`` along x, then rotated by ``angle``."""
    pts = points * np.array([aspect, 1.0])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _fill_poly(size: int, points: np.ndarray, center: tuple[float, float]) -> np.ndarray:
    canvas = np.zeros((size, size), dtype=np.uint8)
    pts = np.round((points + np.asarray(center)) * (1 << _SUBPIXEL_SHIFT)).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_SHIFT)
    return canvas


def _fill_ellipse(canvas: np.ndarray, center: tuple[float, float], axes: tuple[float, float], angle: float, v: int):
    f = 1 << _SUBPIXEL_SHIFT
    c = (int(round(center[0] * f)), int(round(center[1] * f)))
    a = (max(1, int(round(axes[0] * f))), max(1, int(round(axes[1] * f))))
    cv2.ellipse(canvas, c, a, math.degrees(angle), 0, 360, v, -1, cv2.LINE_8, _SUBPIXEL_SHIFT)


def _star(size, center, r, angle, aspect, rng) -> np.ndarray:
    n = int(rng.integers(5, 8))
    inner = rng.uniform(0.38, 0.55)
    t = np.arange(2 * n) * math.pi / n
    rad = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
    return _fill_poly(size, _rotate(np.stack([rad * np.cos(t), rad * np.sin(t)], 1), angle, aspect), center)


def _cross(size, center, r, angle, aspect, rng) -> np.ndarray:
    a = r * rng.uniform(0.22, 0.36)  # half arm width
    ly, lx = r, r * rng.uniform(0.7, 1.0)
    pts = np.array(
        [(-a, -ly), (a, -ly), (a, -a), (lx, -a), (lx, a), (a, a), (a, ly), (-a, ly), (-a, a), (-lx, a), (-lx, -a),
         (-a, -a)]
    )  # fmt: skip
    return _fill_poly(size, _rotate(pts, angle, aspect), center)


def _ring(size, center, r, angle, aspect, rng) -> np.ndarray:
    canvas = np.zeros((size, size), dtype=np.uint8)
    axes = (r * aspect, r)
    inner = rng.uniform(0.45, 0.65)
    _fill_ellipse(canvas, center, axes, angle, 1)
    _fill_ellipse(canvas, center, (axes[0] * inner, axes[1] * inner), angle, 0)
    return canvas


def _crescent(size, center, r, angle, aspect, rng) -> np.ndarray:
    canvas = np.zeros((size, size), dtype=np.uint8)
    _fill_ellipse(canvas, center, (r * aspect, r), angle, 1)
    off = r * rng.uniform(0.35, 0.6)
    cut = r * rng.uniform(0.75, 0.95)
    direction = rng.uniform(0, 2 * math.pi)
    c2 = (center[0] + off * math.cos(direction), center[1] + off * math.sin(direction))
    _fill_ellipse(canvas, c2, (cut * aspect, cut), angle, 0)
    return canvas


def _arrow(size, center, r, angle, aspect, rng) -> np.ndarray:
    w = r * rng.uniform(0.2, 0.3)  # half shaft width
    hw = r * rng.uniform(0.6, 0.85)  # half head width
    hl = r * rng.uniform(0.6, 0.85)  # head length
    pts = np.array([(-r, -w), (r - hl, -w), (r - hl, -hw), (r, 0.0), (r - hl, hw), (r - hl, w), (-r, w)])
    return _fill_poly(size, _rotate(pts, angle, 1.0 / aspect), center)


_SHAPES = {"star": _star, "cross": _cross, "ring": _ring, "crescent": _crescent, "arrow": _arrow}


# -------------------------------------------------------------------- appearance


def _random_colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random ``cells`` x ``cells`` grid, bicubically upsampled."""
    grid = rng.uniform(-1, 1, size=(cells, cells, channels)).astype(np.float32)
    up = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return up.reshape(size, size, channels)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _texture(rng, size, center, r, scale) -> np.ndarray:
    """(S, S, 3) float32 appearance of one object: colour pattern, shading and grain."""
    x, y = _coords(size)
    c1 = _random_colour(rng, (0.3, 1.0), (0.3, 1.0))
    c2 = _random_colour(rng, (0.2, 1.0), (0.2, 1.0))
    kind = int(rng.integers(0, 4))
    phi = rng.uniform(0, 2 * math.pi)
    proj = (x - center[0]) * math.cos(phi) + (y - center[1]) * math.sin(phi)
    if kind == 0:  # flat
        t = np.zeros_like(x)
    elif kind == 1:  # stripes
        period = rng.uniform(4, 11) * scale
        t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period)
        t = np.clip((t - 0.5) * rng.uniform(1, 4) + 0.5, 0, 1)
    elif kind == 2:  # gradient
        t = np.clip(proj / (2 * r) + 0.5, 0, 1)
    else:  # spots
        t = (_smooth_noise(rng, size, int(rng.integers(6, 14)), 1)[..., 0] > rng.uniform(-0.2, 0.3)).astype(np.float32)
    tex = c1 * (1 - t[..., None]) + c2 * t[..., None]
    # directional shading, as if lit from one side
    lx, ly = rng.uniform(-1, 1, size=2)
    shade = 1 + rng.uniform(0.1, 0.35) * np.clip(((x - center[0]) * lx + (y - center[1]) * ly) / (r + 1e-6), -1, 1)
    tex = tex * shade[..., None] + rng.uniform(0.01, 0.05) * rng.standard_normal(tex.shape, dtype=np.float32)
    return tex.astype(np.float32)


def _background(rng, size, scale) -> tuple[np.ndarray, np.ndarray | None]:
    """(S, S, 3) float32 cluttered background and the mask of its salient distractor (or None)."""
    x, y = _coords(size)
    c1 = _random_colour(rng, (0.0, 0.6), (0.2, 0.9))
    c2 = _random_colour(rng, (0.0, 0.6), (0.2, 0.9))
    phi = rng.uniform(0, 2 * math.pi)
    t = np.clip(((x * math.cos(phi) + y * math.sin(phi)) / size) * 0.5 + 0.5, 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t
    img = img + rng.uniform(0.05, 0.18) * _smooth_noise(rng, size, int(rng.integers(3, 8)), 3)
    img = img + rng.uniform(0.0, 0.06) * _smooth_noise(rng, size, int(rng.integers(16, 40)), 3)
    for _ in range(int(rng.integers(STYLE.blobs[0], STYLE.blobs[1] + 1))):
        blob = np.zeros((size, size), dtype=np.uint8)
        cx, cy = rng.uniform(0, size, size=2)
        axes = tuple(rng.uniform(5, 30, size=2) * scale)
        _fill_ellipse(blob, (cx, cy), axes, rng.uniform(0, math.pi), 1)
        alpha = cv2.GaussianBlur(blob.astype(np.float32), (0, 0), rng.uniform(1, 4) * scale)[..., None]
        img = img + alpha * rng.uniform(-0.2, 0.2, size=3).astype(np.float32)
    for _ in range(int(rng.integers(STYLE.lines[0], STYLE.lines[1] + 1))):
        layer = np.zeros((size, size), dtype=np.uint8)
        p1 = tuple(int(v) for v in rng.uniform(-0.2, 1.2, size=2) * size)
        p2 = tuple(int(v) for v in rng.uniform(-0.2, 1.2, size=2) * size)
        cv2.line(layer, p1, p2, 1, max(1, int(rng.integers(1, 5) * scale)), cv2.LINE_AA)
        img = img + layer[..., None].astype(np.float32) * rng.uniform(-0.3, 0.3, size=3).astype(np.float32)
    distractor = None
    if rng.random() < STYLE.salient_distractor_prob:
        distractor = np.zeros((size, size), dtype=np.uint8)
        cx, cy = rng.uniform(0.1, 0.9, size=2) * size
        if rng.random() < 0.5:
            _fill_ellipse(distractor, (cx, cy), tuple(rng.uniform(8, 24, size=2) * scale), rng.uniform(0, math.pi), 1)
        else:
            half = rng.uniform(6, 20, size=2) * scale
            box = np.array([(-half[0], -half[1]), (half[0], -half[1]), (half[0], half[1]), (-half[0], half[1])])
            distractor = _fill_poly(size, _rotate(box, rng.uniform(0, math.pi), 1.0), (cx, cy))
        tex = _texture(rng, size, (cx, cy), 20 * scale, scale)
        alpha = cv2.GaussianBlur(distractor.astype(np.float32), (0, 0), STYLE.edge_softness)[..., None]
        img = img * (1 - alpha) + tex * alpha
    return img.astype(np.float32), distractor


# -------------------------------------------------------------------- one scene


def _ignore_band(label: np.ndarray, scale: float) -> np.ndarray:
    """Pixels next to a different label: a band of about 2 px at 160 px on every border, as VOC's 255 outlines."""
    k = 2 * max(1, int(round(STYLE.ignore_band_half_width * scale))) + 1
    kernel = np.ones((k, k), dtype=np.uint8)
    return cv2.dilate(label, kernel) != cv2.erode(label, kernel)


def _saliency(rng, visible: list[np.ndarray], distractor: np.ndarray | None, size: int, scale: float) -> np.ndarray:
    sal = np.zeros((size, size), dtype=np.float32)
    for vis in visible:
        m = vis.astype(np.uint8)
        if rng.random() < STYLE.sal_morph_prob:
            k = 2 * int(round(rng.integers(STYLE.sal_morph_px[0], STYLE.sal_morph_px[1] + 1) * scale)) + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            m = cv2.erode(m, kernel) if rng.random() < 0.5 else cv2.dilate(m, kernel)
        peak = rng.uniform(*STYLE.sal_confidence)
        if rng.random() < STYLE.sal_object_miss_prob:
            peak = rng.uniform(*STYLE.sal_object_miss_gain)
        gain = np.full((size, size), peak, dtype=np.float32)
        if rng.random() < STYLE.sal_partial_miss_prob and vis.any():
            ys, xs = np.nonzero(vis)
            x, y = _coords(size)
            phi = rng.uniform(0, 2 * math.pi)
            d = (x - xs.mean()) * math.cos(phi) + (y - ys.mean()) * math.sin(phi)
            gain = np.where(
                d > rng.uniform(-0.2, 0.5) * max(1.0, xs.std() + ys.std()),
                gain * rng.uniform(*STYLE.sal_partial_miss_gain),
                gain,
            )
        sal = np.maximum(sal, m * gain)
    if distractor is not None and rng.random() < STYLE.sal_distractor_prob:
        sal = np.maximum(sal, distractor * rng.uniform(*STYLE.sal_false_gain))
    if rng.random() < STYLE.sal_false_blob_prob:
        blob = np.zeros((size, size), dtype=np.uint8)
        _fill_ellipse(blob, tuple(rng.uniform(0, size, size=2)), tuple(rng.uniform(5, 20, size=2) * scale), 0.0, 1)
        sal = np.maximum(sal, blob * rng.uniform(*STYLE.sal_false_gain))
    sal = cv2.GaussianBlur(sal, (0, 0), rng.uniform(*STYLE.sal_blur) * scale)
    sal = sal + STYLE.sal_noise * rng.standard_normal(sal.shape, dtype=np.float32)
    return np.clip(np.rint(sal * 255), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: int) -> ToySample:
    """Draw one toy scene of ``size`` x ``size`` pixels with at least one visible object."""
    while True:
        sample = _render_once(rng, size)
        if sample.labels:
            return sample


def _render_once(rng: np.random.Generator, size: int) -> ToySample:
    scale = size / STYLE.reference_size
    img, distractor = _background(rng, size, scale)
    label = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int16)  # which object owns each pixel after occlusion
    areas: list[int] = []
    classes: list[int] = []
    names = TOY_CLASSES[1:]
    for _ in range(int(rng.integers(STYLE.objects[0], STYLE.objects[1] + 1))):
        cls = int(rng.integers(0, len(names)))
        for _try in range(STYLE.placement_tries):
            r = rng.uniform(*STYLE.radius) * scale
            center = (rng.uniform(0.6 * r, size - 0.6 * r), rng.uniform(0.6 * r, size - 0.6 * r))
            shape = _SHAPES[names[cls]](size, center, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.75, 1.25), rng)
            m = shape.astype(bool)
            if m.sum() < STYLE.min_visible_pixels * scale**2:
                continue
            new_owner = np.where(m, len(areas), owner)
            if all((new_owner == k).sum() >= STYLE.min_visible_fraction * a for k, a in enumerate(areas)):
                break
        else:
            continue
        tex = _texture(rng, size, center, r, scale)
        alpha = cv2.GaussianBlur(m.astype(np.float32), (0, 0), STYLE.edge_softness * max(scale, 0.5))[..., None]
        img = img * (1 - alpha) + tex * alpha
        owner = new_owner.astype(np.int16)
        label[m] = cls + 1
        areas.append(int(m.sum()))
        classes.append(cls + 1)
    img = img + rng.uniform(0.005, 0.025) * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise
    image = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    visible = [owner == k for k in range(len(areas))]
    present = sorted(
        {c for c, v in zip(classes, visible, strict=True) if v.sum() >= STYLE.min_visible_pixels * scale**2}
    )
    mask = label.copy()
    mask[_ignore_band(label, scale)] = IGNORE_INDEX
    return ToySample(image=image, mask=mask, saliency=_saliency(rng, visible, distractor, size, scale), labels=present)


def sample_id(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def render_sample(split: str, index: int, image_size: int, seed: int) -> ToySample:
    """The sample ``index`` of ``split``, independent of how many others are drawn."""
    rng = np.random.default_rng((seed, SPLIT_CODES[split], index))
    return render_scene(rng, image_size)


# -------------------------------------------------------------------- the folder


def _meta(num_train: int, num_val: int, image_size: int, seed: int) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "style": asdict(STYLE),
    }


def _read_meta(root: Path) -> dict[str, Any] | None:
    path = root / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_complete(root: str | Path, num_train: int, num_val: int, image_size: int, seed: int) -> bool:
    """True when ``root`` holds the toy set of exactly these parameters (``toy_meta.json`` is written last)."""
    meta = _read_meta(Path(root))
    want = json.loads(json.dumps(_meta(num_train, num_val, image_size, seed)))
    return meta == want


def _write_folder(out: Path, num_train: int, num_val: int, image_size: int, seed: int) -> None:
    for sub in ("JPEGImages", "SegmentationClass", SALIENCY_DIR, str(LIST_DIR)):
        (out / sub).mkdir(parents=True, exist_ok=True)
    palette = label_colormap().reshape(-1).tolist()
    cls_labels: dict[str, list[int]] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        ids = []
        for i in range(count):
            image_id = sample_id(split, i)
            s = render_sample(split, i, image_size, seed)
            Image.fromarray(s.image).save(out / "JPEGImages" / f"{image_id}.jpg", quality=STYLE.jpeg_quality)
            mask = Image.fromarray(s.mask, mode="P")
            mask.putpalette(palette)
            mask.save(out / "SegmentationClass" / f"{image_id}.png")
            Image.fromarray(s.saliency, mode="L").save(out / SALIENCY_DIR / f"{image_id}.png")
            cls_labels[image_id] = s.labels
            ids.append(image_id)
        (out / LIST_DIR / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / LABELS_FILE).write_text("".join(f"{n}\n" for n in TOY_CLASSES))
    (out / CLS_LABELS_FILE).write_text(json.dumps(cls_labels, indent=0) + "\n")
    (out / META_FILE).write_text(json.dumps(_meta(num_train, num_val, image_size, seed), indent=2) + "\n")


def make_toy_dataset(out: str | Path, num_train: int, num_val: int, image_size: int = 160, seed: int = 0) -> Path:
    """Write the toy dataset to ``out`` (skipped when ``out`` already holds exactly this set).

    The folder is built under a temporary sibling and renamed into place, so ``out`` is either absent or complete.

    Raises:
        ValueError: bad parameters, or ``out`` exists and holds something else (it is never overwritten).
    """
    out = Path(out)
    if num_train < 1 or num_val < 1:
        raise ValueError(f"toy dataset needs num_train >= 1 and num_val >= 1, got {num_train}, {num_val}")
    if image_size < 32:
        raise ValueError(f"toy image_size must be at least 32, got {image_size}")
    if is_complete(out, num_train, num_val, image_size, seed):
        log.info("toy dataset already complete: %s", out)
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        meta = _read_meta(out)
        found = (
            {k: meta.get(k) for k in ("generator_version", "num_train", "num_val", "image_size", "seed")}
            if meta
            else "no toy_meta.json"
        )
        raise ValueError(
            f"{out}: exists but is not the toy set asked for (num_train={num_train}, num_val={num_val}, "
            f"image_size={image_size}, seed={seed}; found {found}); delete it or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    log.info("generating the toy dataset (%d train + %d val, %d px) in %s", num_train, num_val, image_size, out)
    try:
        _write_folder(tmp, num_train, num_val, image_size, seed)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_complete(out, num_train, num_val, image_size, seed):  # another process finished first
            return out
        raise
    return out
