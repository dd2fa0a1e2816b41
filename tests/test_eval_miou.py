"""tools/eval_miou.py: both conventions on subsets with absent classes, hand-computed scores, --pred-ignore, errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sp_cam.io import write_label_png
from tools.eval_miou import main

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<name>\S(?:.*?\S)?)\s{2,}(?P<value>-?\d+\.\d\d|-)(?:\s|$)")


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def values(out: str) -> dict[str, str]:
    """First value of each table row, by row name ("cat" -> "66.67", "mIoU (fg only)" -> "83.33")."""
    found = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            found[m.group("name")] = m.group("value")
    return found


@pytest.fixture
def voc_subset(tmp_path):
    """Three 21-class GT maps that hold only background, person (15) and dog (12): 18 classes absent."""
    gt = tmp_path / "gt"
    rng = np.random.default_rng(0)
    for i in range(3):
        g = np.zeros((12, 16), np.uint8)
        g[2:8, 3 + i : 10] = 15 if i != 1 else 12
        g[rng.random(g.shape) < 0.05] = 255
        write_label_png(gt / f"img{i}.png", g)
    return gt


def test_gt_against_itself_is_100_on_a_subset(voc_subset, capsys, tmp_path):
    rc, out, _ = run(capsys, "--pred", voc_subset, "--gt", voc_subset, "--json", tmp_path / "r.json")
    assert rc == 0
    v = values(out)
    assert v["mIoU"] == "100.00" and v["mIoU (fg only)"] == "100.00" and v["person"] == "100.00"
    assert "over the 3 classes present in GT or prediction" in out and v["aeroplane"] == "-"
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["miou"] == pytest.approx(100.0) and res["absent"] == "present" and res["num_scored"] == 3
    assert len(res["absent_classes"]) == 18 and len(res["confusion"]) == 21
    rc, out, _ = run(capsys, "--pred", voc_subset, "--gt", voc_subset, "--absent", "zero")
    v = values(out)
    assert rc == 0 and v["mIoU"] == f"{100 * 3 / 21:.2f}" and "over all 21 classes, absent ones counted as 0" in out


def write_pair(tmp_path, gt, pred, names=("background", "cat", "dog", "cow")):
    write_label_png(tmp_path / "gt" / "a.png", np.asarray(gt, np.uint8))
    write_label_png(tmp_path / "pred" / "a.png", np.asarray(pred, np.uint8))
    (tmp_path / "names.txt").write_text("".join(f"{n}\n" for n in names))
    return ["--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--class-names", tmp_path / "names.txt"]


def test_known_perturbation_both_conventions(tmp_path, capsys):
    args = write_pair(tmp_path, [[0, 0, 1, 1], [0, 0, 2, 255]], [[0, 1, 1, 1], [0, 0, 2, 2]])
    rc, out, _ = run(capsys, *args, "--json", tmp_path / "r.json")
    assert rc == 0
    # bg: TP 3, GT 4, pred 3 -> IoU 3/4, FP 0/4, FN 1/4; cat: TP 2, GT 2, pred 3 -> IoU 2/3, FP 1/3; dog: 1/1;
    # cow: absent (the GT-255 pixel, predicted dog, is not scored)
    v = values(out)
    assert v["background"] == "75.00" and v["cat"] == "66.67" and v["dog"] == "100.00" and v["cow"] == "-"
    assert v["mIoU"] == "80.56" and v["mIoU (fg only)"] == "83.33"  # IRN style: (3/4 + 2/3 + 1) / 3
    assert v["FP (fg mean)"] == "16.67" and v["FN (fg mean)"] == "0.00"
    assert v["pixel acc"] == "85.71" and v["mean acc"] == "91.67" and v["fwIoU"] == "76.19"
    cat = next(line for line in out.splitlines() if line.startswith("cat"))
    assert cat.split()[1:] == ["66.67", "33.33", "0.00", "66.67", "100.00", "2"]  # IoU FP FN prec recall GT
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["classes"][0]["fn"] == pytest.approx(25.0) and res["classes"][3]["absent"] is True
    assert res["pred_ignore"] == "error" and res["num_images"] == 1 and res["scored_pixels"] == 7
    rc, out, _ = run(capsys, *args, "--absent", "zero", "--json", tmp_path / "z.json")
    v = values(out)
    assert v["mIoU"] == "60.42" and v["mIoU (fg only)"] == "55.56"  # PuzzleCAM style: (3/4 + 2/3 + 1 + 0) / 4
    assert v["cow"] == "0.00" and "absent (counted as 0)" in out
    assert json.loads((tmp_path / "z.json").read_text())["absent"] == "zero"


def test_pred_ignore_modes(tmp_path, capsys):
    # (0, 2) is GT cat predicted 255; (1, 3) is predicted 255 where the GT is 255 too (never scored)
    args = write_pair(tmp_path, [[0, 0, 1, 1], [0, 0, 2, 255]], [[0, 1, 255, 1], [0, 0, 2, 255]])
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "a.png" in err and "predicted 255" in err and "--pred-ignore" in err
    assert err.count("\n") == 1
    rc, out, err = run(capsys, *args, "--pred-ignore", "background")
    # bg: TP 3, GT 4, pred 4 -> 3/5; cat: TP 1, GT 2, pred 2 -> 1/3; dog 1
    v = values(out)
    assert rc == 0 and not err and v["background"] == "60.00" and v["cat"] == "33.33" and v["mIoU"] == "64.44"
    rc, out, err = run(capsys, *args, "--pred-ignore", "skip", "--json", tmp_path / "s.json")
    # the pixel leaves the score: bg: TP 3, GT 4, pred 3 -> 3/4; cat: TP 1, GT 1, pred 2 -> 1/2; dog 1
    v = values(out)
    assert rc == 0 and v["background"] == "75.00" and v["cat"] == "50.00" and v["mIoU"] == "75.00"
    assert err.startswith("warning: ") and "1 of 7" in err and "14.29 %" in err
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["pred_ignore"] == "skip" and res["pred_ignore_pixels"] == 1 and res["scored_pixels"] == 6


@pytest.mark.parametrize("which", ["pred", "gt"])
def test_16_bit_png_refused(tmp_path, capsys, which):
    args = write_pair(tmp_path, [[0, 0, 1, 1]], [[0, 0, 1, 2]])
    Image.fromarray(np.array([[0, 0, 1, 258]], np.uint16)).save(tmp_path / which / "a.png")  # 258 would read as 2
    rc, out, err = run(capsys, *args)
    assert rc == 2 and not out and err.count("\n") == 1
    assert str(tmp_path / which / "a.png") in err and "16-bit" in err


def test_rgb_png_refused(tmp_path, capsys):
    args = write_pair(tmp_path, [[0, 0, 1, 1]], [[0, 0, 1, 2]])
    Image.new("RGB", (4, 1)).save(tmp_path / "pred" / "a.png")
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "a.png" in err and "RGB" in err and err.count("\n") == 1


def test_list_plain_and_handoff_format(voc_subset, capsys, tmp_path):
    pred = tmp_path / "pred"
    write_label_png(pred / "img1.png", np.zeros((12, 16), np.uint8))
    (tmp_path / "plain.txt").write_text("img1\n")
    rc, out, _ = run(capsys, "--pred", pred, "--gt", voc_subset, "--list", tmp_path / "plain.txt")
    assert rc == 0 and "aeroplane" in out and "tvmonitor" in out and "images: 1" in out
    (tmp_path / "aug.txt").write_text("/JPEGImages/img0.jpg /SegmentationClassPseudo/img0.png\n\n")
    rc, out, _ = run(capsys, "--pred", voc_subset, "--gt", voc_subset, "--list", tmp_path / "aug.txt")
    assert rc == 0 and "images: 1" in out and values(out)["mIoU"] == "100.00"


def test_missing_predictions(voc_subset, capsys, tmp_path):
    write_label_png(tmp_path / "pred" / "img0.png", np.zeros((12, 16), np.uint8))
    rc, _, err = run(capsys, "--pred", tmp_path / "pred", "--gt", voc_subset)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "2 of 3 predictions missing" in err and "img1, img2" in err


def test_size_mismatch_and_value_out_of_range(voc_subset, capsys, tmp_path):
    pred = tmp_path / "pred"
    for i in range(3):
        write_label_png(pred / f"img{i}.png", np.zeros((12, 16) if i != 1 else (5, 16), np.uint8))
    rc, _, err = run(capsys, "--pred", pred, "--gt", voc_subset)
    assert rc == 2 and "img1.png" in err and "(5, 16)" in err and err.count("\n") == 1
    write_label_png(pred / "img1.png", np.full((12, 16), 21, np.uint8))
    rc, _, err = run(capsys, "--pred", pred, "--gt", voc_subset)
    assert rc == 2 and "img1.png" in err and "out of range 0..20" in err


def test_bad_arguments(voc_subset, capsys, tmp_path):
    rc, _, err = run(capsys, "--pred", tmp_path / "nope", "--gt", voc_subset)
    assert rc == 2 and "nope" in err
    (tmp_path / "names.txt").write_text("background\ncat\n")
    rc, _, err = run(capsys, "--pred", voc_subset, "--gt", voc_subset, "--num-classes", 3,
                     "--class-names", tmp_path / "names.txt")  # fmt: skip
    assert rc == 2 and "does not match" in err


def test_module_cli_and_help():
    res = subprocess.run(
        [sys.executable, "-m", "tools.eval_miou", "--help"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for word in ("--absent", "present", "zero", "--pred-ignore", "background", "skip", "IRN", "inflates"):
        assert word in text
