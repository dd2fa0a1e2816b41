"""TrainDataset / EvalDataset on hand-made VOC-layout fixtures and on a generated toy dataset."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.datasets import EvalDataset, TrainDataset
from data.toy import make_toy_dataset
from data.voc_layout import VOCLayout
from sp_cam.config import load_config
from sp_cam.open_data import open_dataset
from tests.test_voc_layout import fixture_masks, make_voc_fixture


@pytest.fixture
def voc(tmp_path):
    return make_voc_fixture(tmp_path / "voc")


def test_train_item_shapes_and_padding(voc):
    layout = VOCLayout(voc, saliency_dir=voc / "saliency_map")
    ds = TrainDataset(layout, "train", crop_size=48, resize_long=(30, 40), seed=3)
    assert len(ds) == 3
    for index in range(3):
        item = ds[index]
        assert isinstance(item["id"], str) and item["id"] == ds.ids[index]
        assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
        assert item["saliency"].shape == (1, 48, 48) and 0 <= item["saliency"].min() <= item["saliency"].max() <= 1
        assert item["label"].shape == (20,)
        valid = item["valid"]
        assert valid.shape == (1, 48, 48) and set(valid.unique().tolist()) == {0.0, 1.0}
        # the crop is larger than any resized image: every image pixel is kept, the rest is padding
        h, w = layout.image_size(item["id"])
        scale_sizes = {(round(h * L / max(h, w)), round(w * L / max(h, w))) for L in range(30, 41)}
        rows, cols = int(valid[0].any(1).sum()), int(valid[0].any(0).sum())
        assert (rows, cols) in scale_sizes and valid.sum() == rows * cols
        pad = valid[0] == 0
        assert torch.all(item["image"][:, pad] == 0) and torch.all(item["saliency"][0][pad] == 0)
        assert "cam" not in item


def test_train_is_deterministic_per_seed_epoch_index(voc):
    layout = VOCLayout(voc, saliency_dir=voc / "saliency_map")
    a = TrainDataset(layout, "train", crop_size=16, resize_long=(16, 40), seed=0)
    b = TrainDataset(layout, "train", crop_size=16, resize_long=(16, 40), seed=0)
    assert torch.equal(a[1]["image"], b[1]["image"])
    differs = []
    for epoch in range(1, 6):
        b.set_epoch(epoch)
        differs.append(not torch.equal(a[1]["image"], b[1]["image"]))
    assert any(differs)
    c = TrainDataset(layout, "train", crop_size=16, resize_long=(16, 40), seed=1)
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(3))


def test_joint_transform_keeps_image_saliency_and_cam_aligned(tmp_path):
    """Left half bright in the image, the saliency and the CAM: after any augmentation they still coincide."""
    root = make_voc_fixture(tmp_path / "voc")
    h, w = 24, 32
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = 255
    Image.fromarray(img).save(root / "JPEGImages" / "2007_000001.jpg", quality=100)
    sal = np.where(img[..., 0] > 0, 255, 0).astype(np.uint8)
    Image.fromarray(sal, mode="L").save(root / "saliency_map" / "2007_000001.png")
    (root / "ImageSets/Segmentation/one.txt").write_text("2007_000001\n")
    layout = VOCLayout(root, saliency_dir=root / "saliency_map")
    calls = []

    def cam_loader(image_id, size):
        calls.append((image_id, size))
        cam = np.zeros((20, *size), np.float32)
        cam[0] = (sal > 0).astype(np.float32)
        cam[5] = 1.0
        return cam

    ds = TrainDataset(layout, "one", crop_size=40, resize_long=(20, 48), cam_loader=cam_loader, seed=0)
    flips = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        bright = item["image"][0] > 0.5
        salient = item["saliency"][0] > 0.5
        cam = item["cam"]
        assert cam.shape == (20, 40, 40)
        valid = item["valid"][0] > 0
        # bilinear CAM of a constant 1 is 1 inside the image and 0 in the padding
        torch.testing.assert_close(cam[5], item["valid"][0])
        agree = (bright == salient)[valid].float().mean()
        assert agree > 0.9
        assert ((cam[0] > 0.5) == salient)[valid].float().mean() > 0.9
        cols = valid.any(0).nonzero()[:, 0]
        flips.add(bool(bright[:, cols[0]].any()))  # is the bright half on the left?
    assert flips == {True, False}  # both flipped and unflipped were drawn
    assert calls[0] == ("2007_000001", (24, 32))


def test_no_saliency_gives_zeros(voc):
    ds = TrainDataset(VOCLayout(voc), "train", crop_size=16, resize_long=(16, 20))
    assert torch.count_nonzero(ds[0]["saliency"]) == 0


def test_cam_loader_shape_is_checked(voc):
    ds = TrainDataset(
        VOCLayout(voc), "train", crop_size=16, resize_long=(16, 20), cam_loader=lambda i, s: np.zeros((3, *s))
    )
    with pytest.raises(ValueError, match="2007_000001"):
        ds[0]


def test_bad_arguments(voc):
    layout = VOCLayout(voc)
    with pytest.raises(ValueError):
        TrainDataset(layout, "train", crop_size=0)
    with pytest.raises(ValueError):
        TrainDataset(layout, "train", crop_size=16, resize_long=(20, 10))
    (voc / "cls_labels.json").write_text('{"2007_000001": [1]}')
    with pytest.raises(ValueError, match="cls_labels.json"):
        TrainDataset(VOCLayout(voc), "train", crop_size=16)


def test_eval_items(voc):
    ds = EvalDataset(VOCLayout(voc), "train")
    item = ds[0]
    assert item["id"] == "2007_000001" and item["image"].shape == (3, 24, 32)
    assert item["mask"].dtype == torch.int64
    np.testing.assert_array_equal(item["mask"].numpy(), fixture_masks()["2007_000001"])
    assert (item["mask"] == 255).sum() == 32
    no_gt = ds[2]
    assert no_gt["mask"].shape == (20, 20) and torch.all(no_gt["mask"] == 255)
    assert no_gt["label"].sum() == 2


def test_toy_dataset_through_loaders(tmp_path):
    root = make_toy_dataset(tmp_path / "toy", num_train=6, num_val=3, image_size=64, seed=0)
    layout = VOCLayout(root, saliency_dir=root / "saliency_map")
    assert layout.num_classes == 5
    train = TrainDataset(layout, "train", crop_size=48, resize_long=(40, 80))
    batch = next(iter(DataLoader(train, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 3, 48, 48) and list(batch["id"]) == ["train_00000", "train_00001", "train_00002"]
    assert batch["label"].shape == (3, 5) and torch.all(batch["label"].sum(1) >= 1)
    assert batch["saliency"].max() > 0.5
    val = EvalDataset(layout, "val")
    item = val[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].max() == 255
    present = set(item["mask"].unique().tolist()) - {0, 255}
    assert {c + 1 for c in item["label"].nonzero()[:, 0].tolist()} <= present


def test_open_dataset_generates_toy_once(tmp_path):
    cfg = load_config(
        overrides=[f"run.work_dir={tmp_path / 'run'}", "toy.num_train=4", "toy.num_val=2", "toy.image_size=48"]
    )
    layout = open_dataset(cfg)
    assert layout.root == tmp_path / "run" / "toy_data" and layout.has_saliency
    assert layout.ids("train") == [f"train_{i:05d}" for i in range(4)] and len(layout.ids("val")) == 2
    stamp = (layout.root / "toy_meta.json").stat().st_mtime_ns
    layout2 = open_dataset(cfg)  # reused, not regenerated
    assert (layout2.root / "toy_meta.json").stat().st_mtime_ns == stamp
    cfg.toy.num_train = 5
    with pytest.raises(ValueError, match="toy_data"):
        open_dataset(cfg)
