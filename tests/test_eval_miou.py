"""tools/eval_miou.py: identity gives 100.00, a hand-computed perturbation, and clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from sp_cam.io import write_label_png
from tools.eval_miou import main


@pytest.fixture
def folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    rng = np.random.default_rng(0)
    for i in range(3):
        g = rng.integers(0, 3, size=(6, 8)).astype(np.uint8)
        g[0, :2] = 255
        write_label_png(gt / f"img{i}.png", g)
    return gt, pred


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gt_against_itself_is_100(folders, capsys, tmp_path):
    gt, _ = folders
    rc, out, _ = run(capsys, "--pred", gt, "--gt", gt, "--num-classes", 3, "--json", tmp_path / "r.json")
    assert rc == 0
    lines = dict(line.rsplit(None, 1) for line in out.splitlines() if not line.startswith("images"))
    assert lines["mIoU"] == "100.00" and lines["mIoU (fg only)"] == "100.00" and lines["1"] == "100.00"
    assert json.loads((tmp_path / "r.json").read_text())["miou"] == 100.0


def test_known_perturbation(tmp_path, capsys):
    gt = np.array([[0, 0, 1, 1], [0, 0, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 2]], np.uint8)
    write_label_png(tmp_path / "gt" / "a.png", gt)
    write_label_png(tmp_path / "pred" / "a.png", pred)
    (tmp_path / "names.txt").write_text("background\ncat\ndog\n")
    rc, out, _ = run(
        capsys,
        *("--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--class-names", tmp_path / "names.txt"),
        *("--json", tmp_path / "r.json"),
    )
    assert rc == 0
    # bg: TP 3, GT 4, pred 3 -> 0.75; cat: TP 2, GT 2, pred 3 -> 2/3; dog: 1/1 (the 255 pixel is ignored)
    lines = dict(line.rsplit(None, 1) for line in out.splitlines() if line.strip() and not line.startswith("images"))
    assert lines["background"] == "75.00" and lines["cat"] == "66.67" and lines["dog"] == "100.00"
    assert lines["mIoU"] == "80.56" and lines["mIoU (fg only)"] == "83.33"
    res = json.loads((tmp_path / "r.json").read_text())
    assert abs(res["miou"] - 100 * (0.75 + 2 / 3 + 1) / 3) < 1e-3


def test_list_and_default_voc_classes(folders, capsys, tmp_path):
    gt, pred = folders
    write_label_png(pred / "img1.png", np.zeros((6, 8), np.uint8))
    (tmp_path / "list.txt").write_text("img1\n")
    rc, out, _ = run(capsys, "--pred", pred, "--gt", gt, "--list", tmp_path / "list.txt")
    assert rc == 0 and "aeroplane" in out and "tvmonitor" in out and "images: 1" in out


def test_missing_predictions(folders, capsys):
    gt, pred = folders
    write_label_png(pred / "img0.png", np.zeros((6, 8), np.uint8))
    rc, _, err = run(capsys, "--pred", pred, "--gt", gt, "--num-classes", 3)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "2 of 3 predictions missing" in err and "img1, img2" in err


def test_size_mismatch_names_the_id(folders, capsys):
    gt, pred = folders
    for i in range(3):
        write_label_png(pred / f"img{i}.png", np.zeros((6, 8) if i != 1 else (5, 8), np.uint8))
    rc, _, err = run(capsys, "--pred", pred, "--gt", gt, "--num-classes", 3)
    assert rc == 2 and "img1.png" in err and "(5, 8)" in err and err.count("\n") == 1


def test_value_out_of_range(folders, capsys):
    gt, pred = folders
    for i in range(3):
        write_label_png(pred / f"img{i}.png", np.full((6, 8), 3 if i == 2 else 0, np.uint8))
    rc, _, err = run(capsys, "--pred", pred, "--gt", gt, "--num-classes", 3)
    assert rc == 2 and "img2.png" in err and "out of range" in err


def test_rgb_png_refused(folders, capsys):
    gt, pred = folders
    for i in range(3):
        write_label_png(pred / f"img{i}.png", np.zeros((6, 8), np.uint8))
    Image.new("RGB", (8, 6)).save(pred / "img0.png")
    rc, _, err = run(capsys, "--pred", pred, "--gt", gt, "--num-classes", 3)
    assert rc == 2 and "img0.png" in err and "RGB" in err


def test_predicted_ignore(folders, capsys):
    gt, pred = folders
    for i in range(3):
        write_label_png(pred / f"img{i}.png", np.full((6, 8), 255, np.uint8))
    rc, _, err = run(capsys, "--pred", pred, "--gt", gt, "--num-classes", 3)
    assert rc == 2 and "out of range" in err
    rc, out, _ = run(capsys, "--pred", pred, "--gt", gt, "--num-classes", 3, "--pred-ignore", "skip")
    assert rc == 0 and "0.00" in out


def test_bad_arguments(folders, capsys, tmp_path):
    gt, _ = folders
    rc, _, err = run(capsys, "--pred", tmp_path / "nope", "--gt", gt, "--num-classes", 3)
    assert rc == 2 and "nope" in err
    (tmp_path / "names.txt").write_text("background\ncat\n")
    rc, _, err = run(capsys, "--pred", gt, "--gt", gt, "--num-classes", 3, "--class-names", tmp_path / "names.txt")
    assert rc == 2 and "does not match" in err
