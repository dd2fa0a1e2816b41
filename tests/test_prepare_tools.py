"""tools/make_cls_labels.py, prepare_voc12.py and prepare_coco14.py on tiny hand-made fixtures."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from data.label_png import read_label_png
from sp_cam.io import write_label_png
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

COCO_CATEGORIES = [{"id": cid, "name": name} for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:], strict=True)]


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with 0s), written out by hand."""
    flat = mask.T.reshape(-1).astype(int)
    counts, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(n)
            cur, n = v, 0
        n += 1
    counts.append(n)
    return counts


def compressed_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def write_instances(coco: Path, split: str, raw: dict) -> Path:
    path = coco / "annotations" / f"instances_{split}2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    return path


def make_coco(tmp_path: Path, categories: list[dict] | None = None) -> Path:
    coco = tmp_path / "coco"
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
             "segmentation": compressed_rle(crowd)},
        ],
        "categories": COCO_CATEGORIES if categories is None else categories,
    }  # fmt: skip
    write_instances(coco, "train", train)
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
    assert (m[9] == 80).all() and m[8, 10] == 80  # crowd toothbrush (uncompressed RLE), painted first
    m2 = read_label_png(coco / "SegmentationClass" / "COCO_train2014_000000000025.png")
    assert (m2[8:] == 3).all() and (m2[:8] == 0).all()  # compressed RLE string
    capsys.readouterr()


def test_non_coco_category_ids_are_mapped_by_name(tmp_path, capsys):
    # ids that are not COCO's: 18 is "person" here (COCO: dog), 1 is "bottle" (COCO: person), 90 is "dog"
    cats = [{"id": 18, "name": "person"}, {"id": 1, "name": "bottle"}, {"id": 90, "name": "dog"},
            {"id": 3, "name": "car"}]  # fmt: skip
    coco = make_coco(tmp_path, cats)
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "train"]) == 0
    person, bottle, dog = (COCO_CLASSES.index(n) for n in ("person", "bottle", "dog"))
    m = read_label_png(coco / "SegmentationClass" / "COCO_train2014_000000000009.png")
    assert m[3, 3] == person and m[1, 1] == bottle and m[9, 0] == dog
    labels = json.loads((coco / "cls_labels.json").read_text())
    assert labels["COCO_train2014_000000000009"] == sorted([person, bottle, dog])
    # the same file against a custom class list (deeplab-style "<index><TAB><name>" lines)
    (tmp_path / "labels.txt").write_text("0\tbackground\n1\tdog\n2\tbottle\n3\tperson\n4\tcar\n")
    coco2 = make_coco(tmp_path / "b", cats)
    assert (
        prepare_coco14.main(["--coco", str(coco2), "--splits", "train", "--labels", str(tmp_path / "labels.txt")]) == 0
    )
    m = read_label_png(coco2 / "SegmentationClass" / "COCO_train2014_000000000009.png")
    assert m[3, 3] == 3 and m[1, 1] == 2 and m[9, 0] == 1 and m.max() == 3
    assert (coco2 / "labels.txt").read_text().split() == ["background", "dog", "bottle", "person", "car"]
    capsys.readouterr()


@pytest.mark.parametrize(
    "categories, message",
    [
        ([{"id": 18, "name": "unicorn"}], "category 18 'unicorn' is not in the class list"),
        ([{"id": 18, "name": "dog"}, {"id": 18, "name": "cat"}], "duplicate category id 18"),
        ([{"id": 18, "name": "dog"}, {"id": 19, "name": "dog"}], "duplicate category name 'dog'"),
        ([{"id": 18, "name": "background"}], "the background class"),
        ([{"id": 18, "name": "dog"}], "category id 1 is not in 'categories'"),  # annotation 2 uses id 1
        ([{"id": 18}], "has no integer 'id' and 'name'"),
    ],
)
def test_bad_categories_are_refused(tmp_path, capsys, categories, message):
    coco = make_coco(tmp_path, categories)
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "instances_train2014.json" in err and message in err
    assert err.count("\n") == 1
    assert not (coco / "SegmentationClass").exists()


def test_masks_equal_pycocotools(tmp_path, capsys):
    from pycocotools.coco import COCO

    rng = np.random.default_rng(0)
    h, w = 23, 31
    blob = np.zeros((h, w), bool)
    blob[5:17, 9:27] = True
    blob[rng.random((h, w)) < 0.15] ^= True
    anns = [
        {"id": 1, "category_id": 1, "iscrowd": 0, "area": 120.5,  # two-part polygon, sub-pixel vertices
         "segmentation": [[1.3, 2.7, 14.2, 1.1, 12.9, 13.6, 3.4, 11.8], [20.5, 15.5, 29.9, 16.2, 25.1, 22.4]]},
        {"id": 2, "category_id": 18, "iscrowd": 0, "area": 40.0,  # on the border of the image
         "segmentation": [[0, 0, 30.99, 0, 30.99, 4.2, 0, 6.5]]},
        {"id": 3, "category_id": 62, "iscrowd": 1, "area": float(blob.sum()),  # crowd, uncompressed RLE
         "segmentation": {"counts": rle_counts(blob), "size": [h, w]}},
        {"id": 4, "category_id": 44, "iscrowd": 0, "area": 25.0,  # compressed RLE string
         "segmentation": compressed_rle(np.roll(blob, 7, axis=1) & ~blob)},
        {"id": 5, "category_id": 3, "iscrowd": 0, "area": 30.0,  # polygon with a degenerate two-vertex part
         "segmentation": [[16.0, 3.0, 22.0, 3.0, 19.0, 9.5], [2.0, 2.0, 9.0, 9.0]]},
    ]  # fmt: skip
    for ann in anns:
        ann["image_id"] = 7
    raw = {
        "images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": h, "width": w}],
        "annotations": anns,
        "categories": COCO_CATEGORIES,
    }
    coco = tmp_path / "coco"
    path = write_instances(coco, "val", raw)
    api = COCO(str(path))
    for ann in anns:
        ref = api.annToMask(ann).astype(bool)
        assert ref.any()
        np.testing.assert_array_equal(prepare_coco14.annotation_mask(ann["segmentation"], h, w), ref)
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "val"]) == 0
    # the documented order: crowd first, then by decreasing area, each painting over what lies below
    cls = dict(zip(COCO_CATEGORY_IDS, range(1, 81), strict=True))
    expected = np.zeros((h, w), np.uint8)
    for ann in sorted(anns, key=lambda a: (not a["iscrowd"], -a["area"])):
        expected[api.annToMask(ann).astype(bool)] = cls[ann["category_id"]]
    got = read_label_png(coco / "SegmentationClass" / "COCO_val2014_000000000007.png")
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) == 6  # background and all five annotations are visible
    capsys.readouterr()


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ({"counts": [120], "size": [10, 13]}, "RLE size [10, 13] differs from the image size [10, 12]"),
        ({"counts": [100], "size": [10, 12]}, "RLE counts sum to 100, expected 120"),
        ([[1, 1, 5, 1, 5]], "odd number of coordinates"),
        ("polygon", "unsupported segmentation of type str"),
    ],
)
def test_bad_segmentations(tmp_path, capsys, segmentation, message):
    coco = make_coco(tmp_path)
    raw = json.loads((coco / "annotations" / "instances_train2014.json").read_text())
    raw["annotations"][1]["segmentation"] = segmentation
    write_instances(coco, "train", raw)
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "train"]) == 2
    err = capsys.readouterr().err
    assert "instances_train2014.json: annotation 2: " in err and message in err and err.count("\n") == 1


def test_prepare_coco14_errors(tmp_path, capsys):
    coco = make_coco(tmp_path)
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "val"]) == 2
    assert "instances_val2014.json" in capsys.readouterr().err
    assert prepare_coco14.main(["--coco", str(coco), "--labels", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err
    raw = json.loads((coco / "annotations" / "instances_train2014.json").read_text())
    del raw["categories"]
    write_instances(coco, "train", raw)
    assert prepare_coco14.main(["--coco", str(coco), "--splits", "train"]) == 2
    assert "missing 'categories'" in capsys.readouterr().err
