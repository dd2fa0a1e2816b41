"""VOCLayout and open_dataset on hand-made VOC-layout folders, including every bad-input case."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.classes import VOC_CLASSES, label_colormap
from data.voc_layout import VOCLayout
from sp_cam.config import load_config
from sp_cam.open_data import open_dataset

IDS = ("2007_000001", "2007_000002", "2008_000003")
SIZES = {"2007_000001": (24, 32), "2007_000002": (40, 30), "2008_000003": (20, 20)}


def write_palette_png(path: Path, label: np.ndarray) -> None:
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(label_colormap().reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def fixture_masks() -> dict[str, np.ndarray]:
    m1 = np.zeros(SIZES["2007_000001"], dtype=np.uint8)
    m1[4:16, 6:20] = 1
    m1[3, 5:21] = 255  # VOC-style border band
    m1[16, 5:21] = 255
    m2 = np.zeros(SIZES["2007_000002"], dtype=np.uint8)
    m2[10:30, 5:25] = 15
    m2[0:5, 0:5] = 7
    return {"2007_000001": m1, "2007_000002": m2}


def make_voc_fixture(root: Path, saliency: bool = True) -> Path:
    """Three images; a palette mask (with 255), a grey mask, an image without GT; saliency; train/val lists."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "saliency_map", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id in IDS:
        h, w = SIZES[image_id]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        if saliency:
            sal = np.zeros((h, w), dtype=np.uint8)
            sal[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 200
            Image.fromarray(sal, mode="L").save(root / "saliency_map" / f"{image_id}.png")
    masks = fixture_masks()
    write_palette_png(root / "SegmentationClass" / "2007_000001.png", masks["2007_000001"])
    Image.fromarray(masks["2007_000002"], mode="L").save(root / "SegmentationClass" / "2007_000002.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in IDS))
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n")
    labels = {"2007_000001": [1], "2007_000002": [7, 15], "2008_000003": [3, 12]}
    (root / "cls_labels.json").write_text(json.dumps(labels))
    return root


def one_line_error(excinfo, *needles: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.fixture
def voc(tmp_path):
    return make_voc_fixture(tmp_path / "voc")


def test_reads_images_masks_saliency_and_labels(voc):
    layout = VOCLayout(voc, saliency_dir=voc / "saliency_map")
    assert layout.class_names == VOC_CLASSES and layout.num_classes == 20 and layout.has_saliency
    assert layout.ids("train") == list(IDS)
    img = layout.load_image("2007_000001")
    assert img.shape == (24, 32, 3) and img.dtype == np.uint8
    masks = fixture_masks()
    m1 = layout.load_mask("2007_000001")  # palette PNG: indices, not colours
    np.testing.assert_array_equal(m1, masks["2007_000001"])
    assert (m1 == 255).sum() == 32
    np.testing.assert_array_equal(layout.load_mask("2007_000002"), masks["2007_000002"])  # grey PNG
    assert layout.load_mask("2008_000003") is None and not layout.has_gt("2008_000003")
    sal = layout.load_saliency("2007_000002")
    assert sal.shape == (40, 30) and sal.max() == 200
    assert layout.labels("2007_000002") == [7, 15]
    vec = layout.label_vector("2008_000003")
    assert vec.shape == (20,) and vec.dtype == np.float32 and vec.sum() == 2 and vec[2] == 1 and vec[11] == 1


def test_labels_from_masks_when_json_absent(voc):
    (voc / "cls_labels.json").unlink()
    layout = VOCLayout(voc)
    assert layout.labels("2007_000002") == [7, 15]
    assert layout.labels("2007_000001") == [1]
    with pytest.raises(FileNotFoundError) as e:
        layout.labels("2008_000003")
    one_line_error(e, "cls_labels.json")


def test_custom_labels_txt(voc):
    (voc / "labels.txt").write_text("background\ncat\ndog\n")
    (voc / "cls_labels.json").write_text(json.dumps({"2007_000001": [1, 2]}))
    layout = VOCLayout(voc)
    assert layout.class_names == ("background", "cat", "dog") and layout.num_classes == 2
    np.testing.assert_array_equal(layout.label_vector("2007_000001"), [1, 1])
    with pytest.raises(ValueError) as e:  # mask 2 holds 15 > K = 2
        layout.load_mask("2007_000002")
    one_line_error(e, "2007_000002.png", "out of range")


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        VOCLayout(tmp_path / "nowhere")
    one_line_error(e, str(tmp_path / "nowhere"))


def test_missing_split_list(voc):
    with pytest.raises(FileNotFoundError) as e:
        VOCLayout(voc).ids("train_aug")
    one_line_error(e, "train_aug.txt")


def test_listed_id_without_image(voc):
    (voc / "JPEGImages" / "2008_000003.jpg").unlink()
    with pytest.raises(FileNotFoundError) as e:
        VOCLayout(voc).ids("train")
    one_line_error(e, "2008_000003.jpg", "train.txt")


def test_corrupt_jpeg(voc):
    path = voc / "JPEGImages" / "2007_000001.jpg"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError) as e:
        VOCLayout(voc).load_image("2007_000001")
    one_line_error(e, str(path))
    path.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError) as e:
        VOCLayout(voc).load_image("2007_000001")
    one_line_error(e, str(path))


def test_mask_of_wrong_size(voc):
    write_palette_png(voc / "SegmentationClass" / "2007_000001.png", np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError) as e:
        VOCLayout(voc).load_mask("2007_000001")
    one_line_error(e, "2007_000001.png", "(10, 10)", "(24, 32)")


def test_saliency_of_wrong_size(voc):
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(voc / "saliency_map" / "2007_000001.png")
    with pytest.raises(ValueError) as e:
        VOCLayout(voc, saliency_dir=voc / "saliency_map").load_saliency("2007_000001")
    one_line_error(e, "saliency_map/2007_000001.png")


def test_rgb_mask_refused(voc):
    Image.new("RGB", (32, 24)).save(voc / "SegmentationClass" / "2007_000001.png")
    with pytest.raises(ValueError) as e:
        VOCLayout(voc).load_mask("2007_000001")
    one_line_error(e, "2007_000001.png", "RGB")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"2007_000001": 3}', "2007_000001"),
        ('{"2007_000001": ["cat"]}', "2007_000001"),
        ('{"2007_000001": [21]}', "out of range"),
        ('{"2007_000001": [0]}', "out of range"),
    ],
)
def test_malformed_cls_labels(voc, content, needle):
    (voc / "cls_labels.json").write_text(content)
    with pytest.raises(ValueError) as e:
        VOCLayout(voc).labels("2007_000001")
    one_line_error(e, "cls_labels.json", needle)


def test_id_missing_from_cls_labels(voc):
    (voc / "cls_labels.json").write_text('{"2007_000001": [1]}')
    with pytest.raises(ValueError) as e:
        VOCLayout(voc).check_labels(IDS)
    one_line_error(e, "cls_labels.json", "2007_000002")


# -------------------------------------------------------------------- open_dataset


def test_open_dataset_folder(voc):
    cfg = load_config(overrides=["data.dataset=folder", f"data.root={voc}"])
    layout = open_dataset(cfg)
    assert layout.root == voc and layout.has_saliency and layout.saliency_dir == voc / "saliency_map"
    cfg = load_config(overrides=["data.dataset=folder", f"data.root={voc}", "data.saliency_dir=none"])
    assert not open_dataset(cfg).has_saliency


def test_open_dataset_errors(voc, tmp_path):
    with pytest.raises(ValueError) as e:
        open_dataset(load_config(overrides=["data.dataset=folder"]))
    one_line_error(e, "data.root")
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(load_config(overrides=["data.dataset=folder", f"data.root={tmp_path / 'nope'}"]))
    one_line_error(e, "nope")
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(load_config(overrides=["data.dataset=folder", f"data.root={voc}", "data.saliency_dir=/no/sal"]))
    one_line_error(e, "/no/sal")
    with pytest.raises(ValueError) as e:
        open_dataset(load_config(overrides=["data.dataset=imagenet"]))
    one_line_error(e, "imagenet")


def test_open_dataset_voc12_from_env(voc, tmp_path, monkeypatch):
    monkeypatch.setenv("SPCAM_VOC12_ROOT", str(voc))
    monkeypatch.delenv("SPCAM_VOC12_SAL_ROOT", raising=False)
    aug = np.full(SIZES["2007_000001"], 4, dtype=np.uint8)
    write_palette_png(voc / "SegmentationClassAug" / "2007_000001.png", aug)
    layout = open_dataset(load_config(overrides=["data.dataset=voc12"]))
    np.testing.assert_array_equal(layout.load_mask("2007_000001"), aug)  # SegmentationClassAug preferred
    np.testing.assert_array_equal(layout.load_mask("2007_000002"), fixture_masks()["2007_000002"])  # fallback
    assert layout.saliency_dir == voc / "saliency_map"
    monkeypatch.setenv("SPCAM_VOC12_SAL_ROOT", str(tmp_path / "missing_sal"))
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(load_config(overrides=["data.dataset=voc12"]))
    one_line_error(e, "missing_sal")
    monkeypatch.setenv("SPCAM_VOC12_ROOT", str(tmp_path / "no_voc"))
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(load_config(overrides=["data.dataset=voc12"]))
    one_line_error(e, "SPCAM_VOC12_ROOT", "no_voc")


def test_open_dataset_coco14_images_in_split_folders(voc, tmp_path, monkeypatch):
    coco = tmp_path / "coco"
    (coco / "train2014").mkdir(parents=True)
    (coco / "ImageSets/Segmentation").mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(coco / "train2014" / "COCO_train2014_000000000009.jpg")
    (coco / "ImageSets/Segmentation/train.txt").write_text("COCO_train2014_000000000009\n")
    monkeypatch.setenv("SPCAM_COCO14_ROOT", str(coco))
    monkeypatch.delenv("SPCAM_COCO14_SAL_ROOT", raising=False)
    layout = open_dataset(load_config(overrides=["data.dataset=coco14"]))
    assert not layout.has_saliency
    assert layout.ids("train") == ["COCO_train2014_000000000009"]
    assert layout.load_image("COCO_train2014_000000000009").shape == (6, 8, 3)
