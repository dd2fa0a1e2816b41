"""The built-in toy dataset: deterministic, VOC layout, shape-defined classes, realistic imperfections."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from data.toy import TOY_CLASSES, make_toy_dataset, render_sample
from data.voc_layout import VOCLayout
from tools.make_toy_dataset import main as make_toy_main

NUM_TRAIN, NUM_VAL, SIZE = 40, 8, 160


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", NUM_TRAIN, NUM_VAL, SIZE, seed=0)
    layout = VOCLayout(root, saliency_dir=root / "saliency_map")
    samples = []
    for split in ("train", "val"):
        for image_id in layout.ids(split):
            samples.append(
                (
                    image_id,
                    layout.load_image(image_id),
                    layout.load_mask(image_id),
                    layout.load_saliency(image_id),
                    layout.labels(image_id),
                )
            )
    return root, layout, samples


def test_layout_files(toy):
    root, layout, samples = toy
    assert (root / "labels.txt").read_text().split() == list(TOY_CLASSES)
    assert layout.class_names == TOY_CLASSES
    assert len(layout.ids("train")) == NUM_TRAIN and len(layout.ids("val")) == NUM_VAL
    assert set(json.loads((root / "cls_labels.json").read_text())) == {s[0] for s in samples}
    mask_png = Image.open(root / "SegmentationClass" / "train_00000.png")
    assert mask_png.mode == "P"
    assert Image.open(root / "saliency_map" / "train_00000.png").mode == "L"
    assert not list(root.parent.glob(".toy.tmp-*"))  # no temporary folder left behind


def test_deterministic_and_seeded(tmp_path):
    a = make_toy_dataset(tmp_path / "a", 3, 2, 64, seed=5)
    b = make_toy_dataset(tmp_path / "b", 3, 2, 64, seed=5)
    c = make_toy_dataset(tmp_path / "c", 3, 2, 64, seed=6)
    for name in ("cls_labels.json", "ImageSets/Segmentation/train.txt", "SegmentationClass/train_00001.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "JPEGImages/val_00001.jpg").read_bytes() == (b / "JPEGImages/val_00001.jpg").read_bytes()
    assert (a / "JPEGImages/val_00001.jpg").read_bytes() != (c / "JPEGImages/val_00001.jpg").read_bytes()
    # a sample does not depend on how many others are drawn
    s_small = render_sample("train", 2, 64, 5)
    np.testing.assert_array_equal(s_small.mask, np.asarray(Image.open(a / "SegmentationClass/train_00002.png")))


def test_labels_match_masks_and_objects_are_large(toy):
    _, _, samples = toy
    counts = np.zeros(len(TOY_CLASSES), int)
    num_objects = []
    for image_id, image, mask, _, labels in samples:
        assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
        assert 1 <= len(labels) <= 3, image_id
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert set(labels) <= present, image_id
        for c in present - set(labels):  # a class left out of the labels is nearly invisible
            assert (mask == c).sum() < 80, image_id
        for c in labels:
            counts[c] += 1
            assert (mask == c).sum() >= 60, image_id
        num_objects.append(len(labels))
    assert np.all(counts[1:] >= 3), counts  # every class occurs
    assert len(set(num_objects)) >= 2  # 1-object and multi-object scenes
    fg = np.mean([(s[2] > 0).mean() for s in samples])
    assert 0.08 < fg < 0.6, fg


def test_ignore_band_at_borders(toy):
    _, _, samples = toy
    for image_id, _, mask, _, _ in samples[:10]:
        band = mask == 255
        assert 0 < band.mean() < 0.15, image_id
        # a 255 pixel has two different (non-255) labels within 4 px: it sits on a border (thin tips and
        # slivers of occluded objects can be all band, hence not every pixel)
        kernel = np.ones((9, 9), np.uint8)
        hi = cv2.dilate(np.where(band, 0, mask).astype(np.uint8), kernel)
        lo = cv2.erode(np.where(band, 255, mask).astype(np.uint8), kernel)
        assert (hi[band] != lo[band]).mean() > 0.95, image_id


def test_classes_are_shapes_not_colours(toy):
    """Within a class the object colour varies as much as across classes; most shapes are non-convex."""
    _, _, samples = toy
    colours = {c: [] for c in range(1, len(TOY_CLASSES))}
    solidity = {c: [] for c in range(1, len(TOY_CLASSES))}
    for _, image, mask, _, labels in samples:
        for c in labels:
            m = mask == c
            colours[c].append(image[m].mean(0) / 255)
            comps, lab = cv2.connectedComponents(m.astype(np.uint8))
            for k in range(1, comps):
                region = (lab == k).astype(np.uint8)
                if region.sum() < 300:
                    continue
                contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                hull = cv2.convexHull(np.concatenate(contours))
                solidity[c].append(region.sum() / max(cv2.contourArea(hull), 1))
    for c in colours:
        spread = np.asarray(colours[c]).std(0).mean()
        assert spread > 0.08, (TOY_CLASSES[c], spread)
    means = {TOY_CLASSES[c]: float(np.mean(v)) for c, v in solidity.items() if v}
    assert sum(m < 0.8 for m in means.values()) >= 3, means


def test_saliency_is_informative_but_imperfect(toy):
    _, _, samples = toy
    fg_vals, bg_vals, errors = [], [], []
    for _, _, mask, sal, _ in samples:
        fg, bg = (mask > 0) & (mask < 255), mask == 0
        fg_vals.append(sal[fg].mean())
        bg_vals.append(sal[bg].mean())
        errors.append(((sal > 127) != fg)[fg | bg].mean())
    assert np.mean(fg_vals) > np.mean(bg_vals) + 100
    assert 0.01 < np.mean(errors) < 0.25, np.mean(errors)  # neither perfect nor useless
    assert max(errors) > 0.05


def test_existing_folder_is_reused_or_refused(tmp_path):
    out = make_toy_dataset(tmp_path / "t", 2, 1, 48, seed=0)
    stamp = (out / "toy_meta.json").stat().st_mtime_ns
    assert make_toy_dataset(out, 2, 1, 48, seed=0) == out
    assert (out / "toy_meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="seed=1"):
        make_toy_dataset(out, 2, 1, 48, seed=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="no toy_meta.json"):
        make_toy_dataset(other, 2, 1, 48)
    assert (other / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError):
        make_toy_dataset(tmp_path / "bad", 0, 1, 48)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert make_toy_main(["--out", str(out), "--num-train", "2", "--num-val", "1", "--size", "48", "--seed", "3"]) == 0
    assert (out / "ImageSets/Segmentation/val.txt").read_text() == "val_00000\n"
    assert make_toy_main(["--out", str(out), "--num-train", "3", "--num-val", "1", "--size", "48"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
