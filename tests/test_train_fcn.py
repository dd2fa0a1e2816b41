"""Stage-1 training on a tiny toy set: outputs, resume after a crash mid-epoch, CAM errors, loss-mode choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from data.toy import make_toy_dataset
from net.fcn_loss import FCNLoss
from sp_cam import train_fcn
from sp_cam.cam_store import save_cam
from sp_cam.config import ConfigError, load_config
from sp_cam.paths import RunPaths

SIZE = 64


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy_data", num_train=5, num_val=2, image_size=SIZE)


def make_config(work: Path, root: Path, *extra: str):
    return load_config(
        None,
        [
            f"run.work_dir={work}",
            "run.device=cpu",
            "run.num_threads=1",
            "data.dataset=toy",
            f"data.root={root}",
            "toy.num_train=5",
            "toy.num_val=2",
            f"toy.image_size={SIZE}",
            f"data.crop_size={SIZE}",
            "data.resize_long_min=48",
            "data.resize_long_max=80",
            "data.num_workers=0",
            "fcn.epochs=2",
            "fcn.batch_size=2",
            "fcn.affinity_warmup=0.5",
            "fcn.log_every=1",
            *extra,
        ],
    )


def write_cams(work: Path, root: Path, bad_shape: bool = False) -> None:
    """CAMs "produced any other way": the GT mask of each image as a hard map of its classes."""
    from data.voc_layout import VOCLayout

    layout = VOCLayout(root, saliency_dir=root / "saliency_map")
    cams = RunPaths.from_work_dir(work).cams
    for i, image_id in enumerate(layout.ids("train")):
        mask = layout.load_mask(image_id)
        classes = layout.labels(image_id)
        maps = np.stack([(mask == c).astype(np.float32) for c in classes]) if classes else np.zeros((0, *mask.shape))
        if bad_shape and i == 0:
            maps = maps[:, :-3]
        save_cam(cams / f"{image_id}.npz", maps, classes)


def final_weights(work: Path) -> dict[str, torch.Tensor]:
    return torch.load(RunPaths.model(RunPaths.from_work_dir(work).fcn), weights_only=True)["model"]


def test_run_outputs_and_resume_after_crash(tmp_path, toy_root, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    work_a = tmp_path / "a"
    write_cams(work_a, toy_root)
    cfg_a = make_config(work_a, toy_root)
    final = train_fcn.run(cfg_a)
    fcn_dir = RunPaths.from_work_dir(work_a).fcn
    assert final == RunPaths.model(fcn_dir) and RunPaths.done(fcn_dir).is_file()
    assert "loss mode saliency" in caplog.text
    saved = torch.load(final, weights_only=True)
    assert saved["metric"]["name"] == "gt_reconstruction_miou"
    assert 0 <= saved["metric"]["miou"] <= 100 and saved["metric"]["initial_miou"] is not None
    records = [json.loads(line) for line in (fcn_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # 5 images, batch 2, drop_last: 2 steps x 2 epochs
    assert [r["affinity"] for r in train] == [False, False, False, True]  # step > 0.5 * 4 (0-based 3)
    # the affinity step pooled the CAMs into cell labels (some cells uncertain); warm-up steps did not
    assert 0 < train[-1]["ignored_cells"] < 1 and train[0]["ignored_cells"] == 0
    assert train[-1]["loss_press"] >= 0 and train[-1]["loss_diff"] >= 0
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "epoch")

    # DONE: a second run does nothing
    before = final.stat().st_mtime_ns
    assert train_fcn.run(cfg_a) == final and final.stat().st_mtime_ns == before

    # same run, killed in the middle of epoch 2, then restarted: the same final weights
    work_b = tmp_path / "b"
    write_cams(work_b, toy_root)
    cfg_b = make_config(work_b, toy_root)
    calls = {"n": 0}
    original = FCNLoss.forward

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # step 4 = second step of epoch 2
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FCNLoss, "forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_fcn.run(cfg_b)
    monkeypatch.setattr(FCNLoss, "forward", original)
    assert RunPaths.last_checkpoint(RunPaths.from_work_dir(work_b).fcn).is_file()
    assert not RunPaths.model(RunPaths.from_work_dir(work_b).fcn).exists()
    train_fcn.run(cfg_b)
    a, b = final_weights(work_a), final_weights(work_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cam_errors(tmp_path, toy_root):
    work = tmp_path / "nocams"
    with pytest.raises(FileNotFoundError, match="CAM folder not found"):
        train_fcn.run(make_config(work, toy_root))
    work = tmp_path / "badcams"
    write_cams(work, toy_root, bad_shape=True)
    with pytest.raises(ValueError, match=r"\.npz: CAM size \(61, 64\) does not match the image size \(64, 64\)"):
        train_fcn.run(make_config(work, toy_root))


def test_labels_only_mode_without_saliency(tmp_path, toy_root, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config(
        tmp_path / "w", toy_root, "data.saliency_dir=none", "fcn.epochs=1", "fcn.affinity_warmup=1", "fcn.batch_size=8"
    )
    final = train_fcn.run(cfg)  # no CAMs needed: the affinity terms never switch on; batch 8 > 5 images
    assert "loss mode labels_only" in caplog.text and "no saliency maps" in caplog.text
    records = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_color" in r for r in records if r["kind"] == "train")
    assert torch.load(final, weights_only=True)["mode"] == "labels_only"


def test_reconstruct_gt_is_exact_on_cell_aligned_masks():
    cell = 4
    gt = torch.zeros(16, 16, dtype=torch.int64)
    gt[:, 8:] = 2
    gt[0, 0] = 255
    q = torch.zeros(1, 9, 16, 16)
    q[:, 4] = 1  # every pixel in its own cell
    pred = train_fcn.reconstruct_gt(q, gt, num_classes=3, grid=16, steps=0, cell_size=cell)
    assert torch.equal(pred[gt != 255], gt[gt != 255])


def test_cli_errors(tmp_path, capsys):
    assert train_fcn.main(["run.work_dir=" + str(tmp_path), "fcn.mode=bogus"]) == 2
    err = capsys.readouterr().err
    assert "fcn.mode: 'bogus' is not a valid value; expected one of auto, saliency, labels_only" in err
    assert train_fcn.main(["run.work_dir=" + str(tmp_path), "data.crop_size=100"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_select_last_keeps_the_last_epoch(tmp_path, toy_root):
    work = tmp_path / "last"
    write_cams(work, toy_root)
    train_fcn.run(make_config(work, toy_root, "fcn.select=last"))
    fcn_dir = RunPaths.from_work_dir(work).fcn
    saved = torch.load(RunPaths.model(fcn_dir), weights_only=True)
    assert saved["metric"] == {"name": "last_epoch", "epoch": 2}
    last = torch.load(RunPaths.last_checkpoint(fcn_dir), weights_only=True)["model"]
    assert all(torch.equal(saved["model"][k], last[k]) for k in last)
    with pytest.raises(ConfigError, match="fcn.select: 'best' is not a valid value; expected one of gt, last"):
        make_config(tmp_path / "bad", toy_root, "fcn.select=best")  # refused at load, before any stage runs


def test_build_loss_uses_every_field():
    from sp_cam.config import FCNConfig

    cfg = FCNConfig(cell_size=8, th_bg=0.1, relu_t=0.5, diff_weight=3.0, interior_min_same=10, pos_weight=0.01)
    loss = train_fcn.build_loss(cfg, num_classes=80, mode="labels_only")
    assert (loss.cell_size, loss.th_bg, loss.relu_t, loss.diff_weight, loss.interior_min_same) == (8, 0.1, 0.5, 3.0, 10)
    assert loss.num_classes == 80 and loss.mode == "labels_only" and loss.pos_weight == 0.01
    for name in ("sal_threshold", "color_weight", "recon_weight", "th_step", "th_fg", "press_weight"):
        assert getattr(loss, name) == getattr(cfg, name), name


def test_loader_workers_see_every_epoch(tmp_path, toy_root):
    """The loader's worker processes live for the whole run; the epoch (augmentations, CAMs from the affinity
    epoch on) travels with each index, so two workers give the weights of the in-process loader."""
    weights = {}
    for workers in (0, 2):
        work = tmp_path / f"w{workers}"
        write_cams(work, toy_root)
        train_fcn.run(make_config(work, toy_root, "fcn.epochs=3", f"data.num_workers={workers}"))
        weights[workers] = final_weights(work)
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
