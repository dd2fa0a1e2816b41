"""DeepLab hand-off: checks on good and bad folders, and a layout that loads the way deeplab-pytorch's VOCAug reads it."""

from __future__ import annotations

import os
import os.path as osp
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from data.classes import read_class_names
from sp_cam.io import write_label_png
from tools import deeplab_handoff, eval_miou

ROOT = Path(__file__).resolve().parents[1]
IDS = ["a_001", "b_002", "c_003"]
SIZES = {"a_001": (20, 30), "b_002": (21, 29), "c_003": (22, 28)}  # (h, w)

# the blocks of deeplab-pytorch's configs/voc12.yaml that main.py reads besides EXP and DATASET (values abridged)
DEEPLAB_VOC12 = """\
EXP:
    ID: voc12
    OUTPUT_DIR: data
DATASET:
    NAME: vocaug
    ROOT: /somewhere/VOCdevkit
    LABELS: ./data/datasets/voc12/labels.txt
    N_CLASSES: 21
    IGNORE_LABEL: 255
    SCALES: [0.5, 0.75, 1.0, 1.25, 1.5]
    SPLIT:
        TRAIN: train_aug
        VAL: val
        TEST: test
DATALOADER:
    NUM_WORKERS: 0
IMAGE:
    MEAN: {R: 122.675, G: 116.669, B: 104.008}
    SIZE: {BASE: , TRAIN: 321, TEST: 513}
MODEL:
    NAME: DeepLabV2_ResNet101_MSC
    INIT_MODEL: data/models/coco/deeplabv1_resnet101/caffemodel/deeplabv1_resnet101-coco.pth
SOLVER:
    ITER_MAX: 20000
"""


def make_folders(tmp_path: Path, n_classes: int = 6) -> tuple[Path, Path]:
    """A work dir ``tmp_path/work`` with ``pseudo_labels``, and ``tmp_path/data`` with images and labels.txt."""
    images, pseudo = tmp_path / "data" / "JPEGImages", tmp_path / "work" / "pseudo_labels"
    images.mkdir(parents=True)
    (tmp_path / "data" / "labels.txt").write_text("".join(f"c{i}\n" for i in range(n_classes)))
    rng = np.random.default_rng(0)
    for image_id in IDS:
        h, w = SIZES[image_id]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{image_id}.jpg")
        label = rng.integers(0, n_classes, (h, w)).astype(np.uint8)
        label[0, 0] = 255
        write_label_png(pseudo / f"{image_id}.png", label)
    return images, pseudo


def make_gt(tmp_path: Path, ids=("a_001", "b_002")) -> tuple[Path, Path]:
    gt = tmp_path / "gt"
    for image_id in ids:
        write_label_png(gt / f"{image_id}.png", np.ones(SIZES[image_id], np.uint8))
    val = tmp_path / "val.txt"
    val.write_text("".join(f"{i}\n" for i in ids))
    return gt, val


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.deeplab_handoff", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def load_like_vocaug(root: str, split: str, year: int = 2012) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Read a split the way deeplab-pytorch's libs/datasets/voc.py VOCAug does: list lines split on a space, paths
    joined to ROOT/VOC<year> without their leading '/', the image through cv2, the label through PIL."""
    base = osp.join(root, f"VOC{year}")
    with open(osp.join(base, "ImageSets/SegmentationAug", split + ".txt")) as f:
        pairs = [line.rstrip().split(" ") for line in f]
    files, labels = zip(*pairs, strict=True)
    out = []
    for image_rel, label_rel in zip(files, labels, strict=True):
        image_id = image_rel.split("/")[-1].split(".")[0]
        image = cv2.imread(osp.join(base, image_rel[1:]), cv2.IMREAD_COLOR)
        assert image is not None, image_rel
        label = np.asarray(Image.open(osp.join(base, label_rel[1:])), dtype=np.int32)
        assert image.shape[:2] == label.shape
        out.append((image_id, image.astype(np.float32), label))
    return out


def test_good_folder_loads_like_deeplab_pytorch(tmp_path):
    images, pseudo = make_folders(tmp_path)
    gt, val = make_gt(tmp_path)
    out = tmp_path / "out"
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", out, "--gt", gt, "--val-list", val)
    assert res.returncode == 0, res.stderr
    assert "checked 3 pseudo labels and 2 GT masks (6 classes): OK" in res.stdout
    text = (out / "deeplab_config.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["EXP"] == {"ID": "spcam_work"}  # the work dir holding pseudo_labels
    ds = cfg["DATASET"]
    assert ds["NAME"] == "vocaug" and ds["N_CLASSES"] == 6 and ds["IGNORE_LABEL"] == 255
    assert ds["SPLIT"] == {"TRAIN": "train_aug", "VAL": "val"} and Path(ds["ROOT"]) == out.resolve()
    train = load_like_vocaug(ds["ROOT"], ds["SPLIT"]["TRAIN"])
    assert [t[0] for t in train] == IDS
    np.testing.assert_array_equal(train[1][2], np.asarray(Image.open(pseudo / "b_002.png")))
    val_items = load_like_vocaug(ds["ROOT"], ds["SPLIT"]["VAL"])
    assert [t[0] for t in val_items] == ["a_001", "b_002"] and (val_items[0][2] == 1).all()
    assert read_class_names(ds["LABELS"]) == tuple(f"c{i}" for i in range(6))  # "<index>\t<name>" round trip
    assert (out / "labels.txt").read_text().splitlines()[1] == "1\tc1"
    # the printed next step names the keys to replace and the commands, with the EXP.ID folder for the checkpoint
    assert "replace its whole DATASET block" in res.stdout and "set EXP.ID to spcam_work" in res.stdout
    assert "python main.py train --config-path configs/spcam_work.yaml" in res.stdout
    assert "data/models/spcam_work/deeplabv2_resnet101_msc/train_aug/checkpoint_final.pth" in res.stdout
    # eval_miou accepts the hand-off list as it is
    lst = out / "VOC2012/ImageSets/SegmentationAug/train_aug.txt"
    assert eval_miou.main(["--pred", str(pseudo), "--gt", str(pseudo), "--list", str(lst), "--num-classes", "6"]) == 0
    # re-running over the same output is fine (links are kept, not duplicated); without --val-list, no VAL split
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", out, "--exp-id", "mine")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load((out / "deeplab_config.yaml").read_text())
    assert cfg["EXP"]["ID"] == "mine" and cfg["DATASET"]["SPLIT"] == {"TRAIN": "train_aug"}
    assert "no --val-list" in res.stdout and "--model-path" not in res.stdout


def test_yaml_survives_awkward_paths(tmp_path):
    base = tmp_path / "runs: v1 #2"
    images, pseudo = make_folders(base)
    out = base / "out #1: pseudo"
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", out)
    assert res.returncode == 0, res.stderr
    ds = yaml.safe_load((out / "deeplab_config.yaml").read_text())["DATASET"]
    assert ds["ROOT"] == str(out.resolve()) and ds["LABELS"] == str(out.resolve() / "labels.txt")
    assert len(load_like_vocaug(ds["ROOT"], "train_aug")) == 3


def test_relative_layout_moves_with_its_inputs(tmp_path):
    images, pseudo = make_folders(tmp_path / "site")
    out = tmp_path / "site" / "out"
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", out, "--relative")
    assert res.returncode == 0, res.stderr
    assert not os.path.isabs(os.readlink(out / "VOC2012" / "JPEGImages"))
    ds = yaml.safe_load((out / "deeplab_config.yaml").read_text())["DATASET"]
    assert ds["ROOT"] == "." and ds["LABELS"] == "labels.txt" and "relative to --out" in res.stdout
    shutil.move(tmp_path / "site", tmp_path / "moved")  # e.g. mounted elsewhere in a container
    moved = tmp_path / "moved" / "out"
    assert len(load_like_vocaug(str(moved / ds["ROOT"]), "train_aug")) == 3
    assert read_class_names(moved / ds["LABELS"])[0] == "c0"


def test_merged_config_is_ready_to_train(tmp_path):
    images, pseudo = make_folders(tmp_path)
    deeplab = tmp_path / "deeplab-pytorch" / "configs" / "voc12.yaml"
    deeplab.parent.mkdir(parents=True)
    deeplab.write_text(DEEPLAB_VOC12)
    out = tmp_path / "out"
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", out, "--deeplab-config", deeplab)
    assert res.returncode == 0, res.stderr
    full_path = out / "deeplab_spcam_work.yaml"
    full = yaml.safe_load(full_path.read_text())
    stock = yaml.safe_load(DEEPLAB_VOC12)
    assert full["EXP"] == {"ID": "spcam_work", "OUTPUT_DIR": "data"}
    assert full["DATASET"]["ROOT"] == str(out.resolve()) and "VAL" not in full["DATASET"]["SPLIT"]
    for block in ("DATALOADER", "IMAGE", "MODEL", "SOLVER"):
        assert full[block] == stock[block]
    assert f"cd {deeplab.parent.parent}" in res.stdout
    assert f"python main.py train --config-path {full_path.resolve()}" in res.stdout
    deeplab.write_text("just: text\n")
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", tmp_path / "o2", "--deeplab-config", deeplab)
    assert res.returncode == 2 and "not a deeplab-pytorch config" in res.stderr


def test_list_restricts_ids(tmp_path):
    images, pseudo = make_folders(tmp_path)
    lst = tmp_path / "train.txt"
    lst.write_text("/JPEGImages/b_002.jpg /SegmentationClassAug/b_002.png\n")  # SegmentationAug-style list
    written = deeplab_handoff.handoff(pseudo, images, tmp_path / "out", lst, split="trainval_aug")
    assert written["num_images"] == 1
    assert Path(written["train_list"]).name == "trainval_aug.txt"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("rgb", "RGB colour PNG"),
        ("16bit", "16-bit grey PNG"),
        ("missing", "pseudo label missing"),
        ("size", "differs from"),
        ("value", "value 9 outside 0..5"),
    ],
)
def test_bad_pseudo_labels_give_one_line_errors(tmp_path, damage, message):
    images, pseudo = make_folders(tmp_path)
    target = pseudo / "b_002.png"
    if damage == "rgb":
        Image.new("RGB", (29, 21), (128, 0, 0)).save(target)
    elif damage == "16bit":
        Image.fromarray(np.full((21, 29), 258, np.uint16)).save(target)
    elif damage == "missing":
        target.unlink()
    elif damage == "size":
        write_label_png(target, np.zeros((5, 5), np.uint8))
    else:
        write_label_png(target, np.full((21, 29), 9, np.uint8))
    lst = tmp_path / "ids.txt"
    lst.write_text("\n".join(IDS) + "\n")
    res = run_cli("--pseudo", pseudo, "--images", images, "--list", lst, "--out", tmp_path / "o")
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.startswith("error: ") and message in err and "b_002.png" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written when the check fails


@pytest.mark.parametrize("damage, message", [("size", "differs from"), ("value", "value 7 outside"),
                                             ("missing", "GT mask missing"), ("rgb", "RGB")])  # fmt: skip
def test_bad_gt_masks_are_refused(tmp_path, damage, message):
    images, pseudo = make_folders(tmp_path)
    gt, val = make_gt(tmp_path)
    target = gt / "b_002.png"
    if damage == "size":
        write_label_png(target, np.zeros((4, 4), np.uint8))
    elif damage == "value":
        write_label_png(target, np.full(SIZES["b_002"], 7, np.uint8))
    elif damage == "missing":
        target.unlink()
    else:
        Image.new("RGB", (29, 21)).save(target)
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", tmp_path / "o", "--gt", gt, "--val-list", val)
    err = res.stderr.strip()
    assert res.returncode == 2 and message in err and str(target) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ("../b_002", "contains a path separator"),
        ("..", "contains '..'"),
        ("/etc/passwd", "is an absolute path"),
        ("a\\\\b", "contains a path separator"),
        ("C:evil", "is an absolute path"),
        ("a\x00b", "contains a NUL character"),
        ("a_001 b_002", "expected an id or"),
        ("/JPEGImages/...jpg /SegmentationClassAug/...png", "contains '..'"),
    ],
)
def test_ids_that_escape_are_refused(tmp_path, line, message):
    images, pseudo = make_folders(tmp_path)
    lst = tmp_path / "ids.txt"
    lst.write_text(f"a_001\n\n{line}\n")
    with pytest.raises(ValueError, match="ids.txt:3: ") as info:
        deeplab_handoff.handoff(pseudo, images, tmp_path / "o", lst)
    assert message in str(info.value)
    assert not (tmp_path / "o").exists()


def test_check_id():
    assert deeplab_handoff.check_id("2007_000032", "list.txt", 1) == "2007_000032"
    with pytest.raises(ValueError, match=r"^list.txt:4: id 'a b' contains white space"):
        deeplab_handoff.check_id("a b", "list.txt", 4)
    with pytest.raises(ValueError, match=r"^pseudo: id '' is empty"):
        deeplab_handoff.check_id("", "pseudo")


def test_bad_arguments(tmp_path):
    images, pseudo = make_folders(tmp_path)
    res = run_cli("--pseudo", tmp_path / "nope", "--images", images, "--out", tmp_path / "o")
    assert res.returncode == 2 and "pseudo-label folder not found" in res.stderr
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", tmp_path / "o", "--classes", tmp_path / "no.txt")
    assert res.returncode == 2 and "class list not found" in res.stderr
    res = run_cli("--pseudo", pseudo, "--images", images, "--out", tmp_path / "o", "--exp-id", "a/b")
    assert res.returncode == 2 and "--exp-id" in res.stderr
    with pytest.raises(ValueError, match="vocaug accepts only"):
        deeplab_handoff.handoff(pseudo, images, tmp_path / "o", split="mysplit")
    with pytest.raises(ValueError, match="go together"):
        deeplab_handoff.handoff(pseudo, images, tmp_path / "o", gt=tmp_path)
