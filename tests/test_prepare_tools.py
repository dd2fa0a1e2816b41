"""tools/make_cls_labels.py, prepare_voc12.py and prepare_coco14.py on tiny hand-made fixtures."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sp_cam.io import read_label_png, write_label_png
from tools import make_cls_labels, prepare_coco14, prepare_voc12

XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
OBJ = "<object><name>{name}</name><difficult>{difficult}</difficult></object>"


def write_xml(path: Path, image_id: str, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    objects = "".join(OBJ.format(name=n, difficult=int(i == 0)) for i, n in enumerate(names))
    path.write_text(XML.format(id=image_id, objects=objects))


# -------------------------------------------------------------------- make_cls_labels


def test_cls_labels_from_xml_and_masks(tmp_path, capsys):
    root = tmp_path / "voc"
    write_xml(root / "Annotations" / "a.xml", "a", ["person", "dog", "person"])
    write_xml(root / "Annotations" / "b.xml", "b", ["tvmonitor"])
    assert make_cls_labels.main(["--root", str(root)]) == 0
    assert json.loads((root / "cls_labels.json").read_text()) == {"a": [12, 15], "b": [20]}
    m = np.zeros((4, 4), np.uint8)
    m[0, 0], m[1, 1], m[2, 2] = 3, 255, 20
    write_label_png(root / "SegmentationClass" / "a.png", m)
    (root / "list.txt").write_text("a\n")
    out = tmp_path / "from_masks.json"
    args = ["--root", str(root), "--source", "masks", "--list", str(root / "list.txt"), "--out", str(out)]
    assert make_cls_labels.main(args) == 0
    assert json.loads(out.read_text()) == {"a": [3, 20]}
    capsys.readouterr()


def test_unknown_class_name_names_the_xml(tmp_path, capsys):
    root = tmp_path / "voc"
    write_xml(root / "Annotations" / "a.xml", "a", ["person", "unicorn"])
    assert make_cls_labels.main(["--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a.xml" in err and "unicorn" in err and err.count("\n") == 1
    (root / "Annotations" / "a.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="a.xml"):
        make_cls_labels.labels_from_xml(root / "Annotations" / "a.xml", ("background", "person"))


def test_mask_value_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="m.png"):
        make_cls_labels.labels_from_mask(np.array([[0, 21]]), 20, "m.png")


# -------------------------------------------------------------------- prepare_voc12


def make_voc_and_sbd(tmp_path: Path) -> tuple[Path, Path]:
    voc, sbd = tmp_path / "VOC2012", tmp_path / "sbd"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("v1\nv2\n")
    (lists / "val.txt").write_text("v3\ns2\n")
    sbd.mkdir()
    (sbd / "train.txt").write_text("s1\ns2\n")  # s2 is in VOC val: excluded from train_aug
    (sbd / "val.txt").write_text("s3\nv1\n")
    names = {"v1": ["cat"], "v2": ["dog", "cat"], "v3": ["person"], "s1": ["car"], "s2": ["bus"], "s3": ["cow"]}
    (voc / "JPEGImages").mkdir()
    for image_id, objs in names.items():
        Image.new("RGB", (6, 4)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        write_xml(voc / "Annotations" / f"{image_id}.xml", image_id, objs)
    for image_id in ("v1", "v2", "v3"):
        m = np.zeros((4, 6), np.uint8)
        m[0] = 255
        write_label_png(voc / "SegmentationClass" / f"{image_id}.png", m)
    return voc, sbd


def test_prepare_voc12_lists_and_labels(tmp_path, capsys):
    voc, sbd = make_voc_and_sbd(tmp_path)
    assert prepare_voc12.main(["--voc", str(voc), "--sbd", str(sbd)]) == 0
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split() == ["s1", "s3", "v1", "v2"]
    labels = json.loads((voc / "cls_labels.json").read_text())
    assert labels == {"s1": [7], "s3": [10], "v1": [8], "v2": [8, 12], "v3": [15], "s2": [6]}
    assert (voc / "labels.txt").read_text().split()[0] == "background"
    capsys.readouterr()


def test_prepare_voc12_aug_masks_from_sbd_mat(tmp_path, capsys):
    scipy_io = pytest.importorskip("scipy.io")
    voc, sbd = make_voc_and_sbd(tmp_path)
    (sbd / "cls").mkdir()
    for k, image_id in enumerate(("s1", "s2", "s3")):
        seg = np.full((4, 6), k + 1, np.uint8)
        scipy_io.savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": k + 1}})
    assert prepare_voc12.main(["--voc", str(voc), "--sbd", str(sbd), "--aug-masks", "write"]) == 0
    aug = voc / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.glob("*.png")) == ["s1", "s2", "s3", "v1", "v2", "v3"]  # train_aug + val
    np.testing.assert_array_equal(read_label_png(aug / "s3.png"), np.full((4, 6), 3))
    assert (read_label_png(aug / "v1.png")[0] == 255).all()  # the VOC PNG (with its border) wins
    capsys.readouterr()


def test_prepare_voc12_errors(tmp_path, capsys):
    voc, sbd = make_voc_and_sbd(tmp_path)
    (voc / "JPEGImages" / "s3.jpg").unlink()
    assert prepare_voc12.main(["--voc", str(voc), "--sbd", str(sbd)]) == 2
    assert "s3.jpg" in capsys.readouterr().err
    assert prepare_voc12.main(["--voc", str(voc), "--sbd", str(tmp_path / "nosbd")]) == 2
    assert "nosbd" in capsys.readouterr().err


# -------------------------------------------------------------------- prepare_coco14


def rle_encode_string(counts: list[int]) -> str:
    """COCO's compressed RLE string (maskApi.c rleToString), to test the decoder."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(int)
    counts, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(n)
            cur, n = v, 0
        n += 1
    counts.append(n)
    return counts


def test_rle_decoders():
    rng = np.random.default_rng(0)
    mask = rng.random((7, 9)) > 0.6
    counts = rle_counts(mask)
    np.testing.assert_array_equal(prepare_coco14.rle_decode(counts, 7, 9), mask)
    assert prepare_coco14.rle_string_to_counts(rle_encode_string(counts)) == counts
    big = [3000, 1, 70000, 2]
    assert prepare_coco14.rle_string_to_counts(rle_encode_string(big)) == big


def make_coco(tmp_path: Path) -> Path:
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    crowd = np.zeros((10, 12), bool)
    crowd[8:, :] = True
    train = {
        "images": [
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 10, "width": 12},
            {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "height": 10, "width": 12},
            {"id": 30, "file_name": "COCO_train2014_000000000030.jpg", "height": 10, "width": 12},  # no annotation
        ],
        "annotations": [
            # a large person (cat 1 -> class 1) under a small dog (cat 18 -> class 17), listed small first
            {"id": 1, "image_id": 9, "category_id": 18, "iscrowd": 0, "area": 9.0,
             "segmentation": [[2, 2, 5, 2, 5, 5, 2, 5]]},
            {"id": 2, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 64.0,
             "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]]},
            {"id": 3, "image_id": 9, "category_id": 90, "iscrowd": 1, "area": 24.0,
             "segmentation": {"counts": rle_counts(crowd), "size": [10, 12]}},
            {"id": 4, "image_id": 25, "category_id": 3, "iscrowd": 0, "area": 4.0,
             "segmentation": {"counts": rle_encode_string(rle_counts(crowd)), "size": [10, 12]}},
        ],
    }  # fmt: skip
    (coco / "annotations" / "instances_train2014.json").write_text(json.dumps(train))
    return coco


def test_prepare_coco14(tmp_path, capsys):
    coco = make_coco(tmp_path)
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "train"]) == 0
    lines = (coco / "ImageSets/Segmentation/train.txt").read_text().split()
    assert lines == ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    labels = json.loads((coco / "cls_labels.json").read_text())
    assert labels == {"COCO_train2014_000000000009": [1, 17, 80], "COCO_train2014_000000000025": [3]}
    names = (coco / "labels.txt").read_text().splitlines()
    assert len(names) == 81 and names[1] == "person" and names[80] == "toothbrush"
    m = read_label_png(coco / "SegmentationClass" / "COCO_train2014_000000000009.png")
    assert m.shape == (10, 12)
    assert m[3, 3] == 17  # the small dog stays on top of the larger person
    assert m[1, 1] == 1 and m[0, 10] == 0
    assert (m[9] == 80).all() and m[8, 10] == 80  # crowd toothbrush (RLE)
    m2 = read_label_png(coco / "SegmentationClass" / "COCO_train2014_000000000025.png")
    assert (m2[8:] == 3).all() and (m2[:8] == 0).all()  # compressed RLE string
    capsys.readouterr()


def test_prepare_coco14_errors(tmp_path, capsys):
    coco = make_coco(tmp_path)
    raw = json.loads((coco / "annotations" / "instances_train2014.json").read_text())
    raw["annotations"][0]["category_id"] = 12  # not a COCO-80 id
    (coco / "annotations" / "instances_train2014.json").write_text(json.dumps(raw))
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "train"]) == 2
    err = capsys.readouterr().err
    assert "instances_train2014.json" in err and "category id 12" in err
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "val"]) == 2
    assert "instances_val2014.json" in capsys.readouterr().err
