"""Superpixel metrics on hand-made maps, the PSAM hard assignment, and the report tool on a tiny toy set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from net.psam import hard_assignment
from sp_cam import superpixel_metrics as M
from tools import superpixel_quality


def test_perfect_segmentation():
    gt = np.zeros((20, 20), dtype=np.uint8)
    gt[5:15, 5:15] = 3
    gt[0, 0] = 255
    sp = np.where(gt == 3, 7, 1)
    assert M.achievable_segmentation_accuracy(sp, gt) == 1.0
    assert M.undersegmentation_error(sp, gt) == 0.0
    assert M.boundary_recall(sp, gt) == 1.0
    assert M.number_of_superpixels(sp) == 2


def test_known_values():
    gt = np.zeros((4, 8), dtype=np.uint8)
    gt[:, 4:] = 1
    sp = np.zeros((4, 8), dtype=np.int64)
    sp[:, 3:] = 1  # superpixel 1 has 4 pixels of class 0 and 16 of class 1
    assert M.achievable_segmentation_accuracy(sp, gt) == pytest.approx(28 / 32)
    # pairs: (sp0, g0) 12 in / 0 out; (sp1, g0) 4 in / 16 out -> 4; (sp1, g1) 16 in / 4 out -> 4
    assert M.undersegmentation_error(sp, gt) == pytest.approx(8 / 32)
    # GT boundary pixels: columns 3 and 4; superpixel boundary: columns 2 and 3, within 2 px of both
    assert M.boundary_recall(sp, gt, radius=2) == 1.0
    assert M.boundary_recall(sp, gt, radius=0) == pytest.approx(0.5)
    single = np.zeros_like(sp)
    assert M.boundary_recall(single, gt) == 0.0
    assert M.achievable_segmentation_accuracy(single, gt) == pytest.approx(0.5)


def test_void_band_becomes_one_boundary():
    gt = np.zeros((6, 9), dtype=np.uint8)
    gt[:, 5:] = 1
    gt[:, 3:6] = 255  # void band over columns 3..5
    filled = M.fill_ignore(gt)
    assert (filled != 255).all() and (filled[:, :4] == 0).all() and (filled[:, 5:] == 1).all()


def test_hard_assignment():
    cell, h, w = 4, 2, 3
    q = torch.zeros(1, 9, h * cell, w * cell)
    q[:, 4] = 1
    labels = hard_assignment(q, cell)[0]
    expect = torch.arange(h * w).view(h, w).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    assert torch.equal(labels, expect)
    q2 = torch.zeros_like(q)
    q2[:, 5] = 0.6  # right neighbour wins where it exists ...
    q2[:, 4] = 0.4
    labels = hard_assignment(q2, cell)[0]
    assert int(labels[0, 0]) == 1 and int(labels[0, -1]) == w - 1  # ... and never points off the grid


def test_tool_on_toy_set(tmp_path):
    from data.toy import make_toy_dataset

    root = make_toy_dataset(tmp_path / "toy", num_train=1, num_val=2, image_size=48)
    out = tmp_path / "q.json"
    assert (
        superpixel_quality.main(
            ["--data-root", str(root), "--split", "val", "--json", str(out), "--device", "cpu", "--threads", "1"]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert set(result) == {"fcn", "slic"}
    for name in ("fcn", "slic"):
        assert set(result[name]) == {"asa", "br", "ue", "n_superpixels", "ms_per_image"}
        assert 0 < result[name]["asa"] <= 100 and 0 <= result[name]["ue"] <= 100 and 0 <= result[name]["br"] <= 100
        assert result[name]["n_superpixels"] >= 1 and result[name]["ms_per_image"] > 0
    assert result["fcn"]["n_superpixels"] <= 9  # a 48 px image has a 3 x 3 grid


def test_tool_errors(tmp_path, capsys):
    assert superpixel_quality.main(["--data-root", str(tmp_path / "missing"), "--split", "val"]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
