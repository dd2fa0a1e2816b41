"""DeepLab hand-off: checks on good and bad pseudo-label folders, and the deeplab-pytorch layout it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sp_cam.io import write_label_png
from tools import deeplab_handoff

ROOT = Path(__file__).resolve().parents[1]
IDS = ["a_001", "b_002", "c_003"]


def make_folders(tmp_path: Path, n_classes: int = 6) -> tuple[Path, Path]:
    images, pseudo = tmp_path / "data" / "JPEGImages", tmp_path / "pseudo"
    images.mkdir(parents=True)
    (tmp_path / "data" / "labels.txt").write_text("".join(f"c{i}\n" for i in range(n_classes)))
    rng = np.random.default_rng(0)
    for k, image_id in enumerate(IDS):
        h, w = 20 + k, 30 - k
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{image_id}.jpg")
        label = rng.integers(0, n_classes, (h, w)).astype(np.uint8)
        label[0, 0] = 255
        write_label_png(pseudo / f"{image_id}.png", label)
    return images, pseudo


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/deeplab_handoff.py", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_good_folder_writes_deeplab_layout(tmp_path):
    images, pseudo = make_folders(tmp_path)
    gt = tmp_path / "gt"
    for image_id in IDS[:2]:
        write_label_png(gt / f"{image_id}.png", np.zeros((4, 4), np.uint8))
    val = tmp_path / "val.txt"
    val.write_text("a_001\nb_002\n")
    out = tmp_path / "out"
    res = run_cli("--pseudo", str(pseudo), "--images", str(images), "--out", str(out), "--gt", str(gt),
                  "--val-list", str(val))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "checked 3 pseudo labels (6 classes): OK" in res.stdout
    base = out / "VOC2012"
    lines = (base / "ImageSets/SegmentationAug/train_aug.txt").read_text().splitlines()
    assert lines[0] == "/JPEGImages/a_001.jpg /SegmentationClassPseudo/a_001.png"
    # deeplab-pytorch joins ROOT/VOC2012 with each path minus its leading "/": every file must resolve
    for line in lines:
        img, lab = line.split(" ")
        assert (base / img[1:]).is_file() and (base / lab[1:]).is_file()
    val_lines = (base / "ImageSets/SegmentationAug/val.txt").read_text().splitlines()
    assert val_lines == ["/JPEGImages/a_001.jpg /SegmentationClassGT/a_001.png",
                         "/JPEGImages/b_002.jpg /SegmentationClassGT/b_002.png"]  # fmt: skip
    assert (base / val_lines[1].split(" ")[1][1:]).is_file()
    cfg = yaml.safe_load((out / "deeplab_config.yaml").read_text())["DATASET"]
    assert cfg["NAME"] == "vocaug" and cfg["N_CLASSES"] == 6 and cfg["IGNORE_LABEL"] == 255
    assert cfg["SPLIT"]["TRAIN"] == "train_aug" and Path(cfg["ROOT"]) == out.resolve()
    assert (out / "labels.txt").read_text().splitlines()[1] == "1\tc1"
    # re-running over the same output is fine (links are updated, not duplicated)
    assert run_cli("--pseudo", str(pseudo), "--images", str(images), "--out", str(out)).returncode == 0


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
        ("rgb", "mode RGB"),
        ("missing", "pseudo label missing"),
        ("size", "differs from"),
        ("value", "value 9 outside 0..5"),
    ],
)
def test_bad_folders_give_one_line_errors(tmp_path, damage, message):
    images, pseudo = make_folders(tmp_path)
    target = pseudo / "b_002.png"
    if damage == "rgb":
        Image.new("RGB", (29, 21), (128, 0, 0)).save(target)
    elif damage == "missing":
        target.unlink()
    elif damage == "size":
        write_label_png(target, np.zeros((5, 5), np.uint8))
    else:
        write_label_png(target, np.full((21, 29), 9, np.uint8))
    lst = tmp_path / "ids.txt"
    lst.write_text("\n".join(IDS) + "\n")
    res = run_cli("--pseudo", str(pseudo), "--images", str(images), "--list", str(lst), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.startswith("error: ") and message in err and "b_002.png" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written when the check fails


def test_bad_arguments(tmp_path):
    images, pseudo = make_folders(tmp_path)
    res = run_cli("--pseudo", str(tmp_path / "nope"), "--images", str(images), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "pseudo-label folder not found" in res.stderr
    with pytest.raises(ValueError, match="vocaug accepts only"):
        deeplab_handoff.handoff(pseudo, images, tmp_path / "o", split="mysplit")
    with pytest.raises(ValueError, match="go together"):
        deeplab_handoff.handoff(pseudo, images, tmp_path / "o", gt=tmp_path)
