"""Stage 4 (sp_cam.train_seg, sp_cam.eval_seg) on a tiny toy set: outputs, resume, DDP, bad labels, CRF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.label_png import read_label_png
from data.toy import make_toy_dataset
from sp_cam import eval_seg, train_seg
from sp_cam.config import load_config, save_config
from sp_cam.io import load_checkpoint, write_label_png
from sp_cam.models import build_segmenter, load_segmenter
from sp_cam.paths import RunPaths
from sp_cam.runtime import derive_seed, seed_everything
from tests.test_distributed import torchrun

SIZE = 64


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", num_train=8, num_val=3, image_size=SIZE, seed=0)


def label_folder(root: Path, dest: Path) -> Path:
    """Stand-in pseudo labels: the GT masks of the train split with the ignore band set to background."""
    dest.mkdir(parents=True, exist_ok=True)
    for image_id in (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        mask = read_label_png(root / "SegmentationClass" / f"{image_id}.png")
        write_label_png(dest / f"{image_id}.png", np.where(mask == 255, 0, mask))
    return dest


def make_config(work: Path, root: Path, labels: Path | str, *extra: str):
    return load_config(
        None,
        [
            f"run.work_dir={work}",
            "run.device=cpu",
            "run.num_threads=1",
            "data.dataset=folder",
            f"data.root={root}",
            f"data.crop_size={SIZE}",
            "data.num_workers=0",
            f"seg.labels={labels}",
            "seg.train_split=train",
            "seg.eval_split=val",
            "seg.backbone=tiny",
            "seg.iterations=4",
            "seg.batch_size=4",
            "seg.crop_size=48",
            "seg.eval_every=2",
            "seg.lr=0.01",
            "seg.test_scales=[1.0,0.5]",
            "seg.crf=none",
            "seg.log_every=1",
            *extra,
        ],
    )


def weights(work: Path, stage: str = "seg") -> dict[str, torch.Tensor]:
    return load_checkpoint(RunPaths.model(RunPaths.from_work_dir(work).stage(stage)))["model"]


def test_train_then_evaluate(toy_root, tmp_path):
    cfg = make_config(tmp_path / "w", toy_root, label_folder(toy_root, tmp_path / "labels"))
    final = train_seg.run(cfg)
    sdir = final.parent
    assert sdir.name == "seg" and RunPaths.done(sdir).is_file()
    saved = load_checkpoint(final)
    assert saved["stage"] == "seg" and saved["num_classes"] == 5 and saved["backbone"] == "tiny"
    records = [json.loads(x) for x in RunPaths.metrics_log(sdir).read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]  # every seg.eval_every steps and the last
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]  # 8 images, batch 4: 2 steps per epoch
    assert all(0 <= r["eval_miou"] <= 100 for r in records if r["kind"] == "eval")
    initial = load_segmenter(final)
    assert not initial.training

    summary = eval_seg.run(cfg)
    assert set(summary["modes"]) == {"single", "ms_flip"} and summary["num_gt_images"] == 3
    assert summary["absent"] == "present" and summary["final_mode"] == "ms_flip"
    assert 0 <= summary["modes"]["single"]["miou"] <= 100
    # the single-scale mode is the in-training evaluation of the final weights
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert summary["modes"]["single"]["miou"] == pytest.approx(last_eval["eval_miou"], abs=1e-9)
    val = (toy_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    preds = RunPaths.seg_predictions(sdir, "val")
    assert sorted(p.stem for p in preds.iterdir()) == sorted(val)
    assert read_label_png(preds / f"{val[0]}.png").shape == (SIZE, SIZE)
    before = RunPaths.seg_summary(sdir, "val").stat().st_mtime_ns
    assert eval_seg.run(cfg) == summary and RunPaths.seg_summary(sdir, "val").stat().st_mtime_ns == before


def test_gt_reference_trains_into_its_own_folder(toy_root, tmp_path):
    cfg = make_config(tmp_path / "w", toy_root, "gt", "seg.iterations=2")
    assert train_seg.run(cfg).parent.name == "seg_gt"
    assert not (tmp_path / "w" / "seg").exists()
    assert eval_seg.run(cfg)["num_gt_images"] == 3


def test_resume_after_a_kill_equals_an_uninterrupted_run(toy_root, tmp_path, monkeypatch):
    labels = label_folder(toy_root, tmp_path / "labels")
    train_seg.run(make_config(tmp_path / "ref", toy_root, labels, "seg.iterations=6"))
    cfg = make_config(tmp_path / "crash", toy_root, labels, "seg.iterations=6")
    original = train_seg.seg_loss
    calls = {"n": 0}

    def killed_in_step_4(outputs, target):
        calls["n"] += 1
        if calls["n"] == 4:  # in the second epoch, after its first step
            raise KeyboardInterrupt("killed")
        return original(outputs, target)

    monkeypatch.setattr(train_seg, "seg_loss", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_seg.run(cfg)
    sdir = RunPaths.from_work_dir(cfg.run.work_dir).seg
    assert load_checkpoint(RunPaths.last_checkpoint(sdir))["step"] == 2 and not RunPaths.model(sdir).exists()
    monkeypatch.setattr(train_seg, "seg_loss", original)
    train_seg.run(cfg)
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "crash")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one_on_the_same_global_batch(toy_root, tmp_path):
    labels = label_folder(toy_root, tmp_path / "labels")
    extra = ("seg.iterations=2", "seg.eval_every=0")
    single = make_config(tmp_path / "single", toy_root, labels, *extra)
    train_seg.run(single)
    ddp = make_config(tmp_path / "ddp", toy_root, labels, *extra)
    save_config(ddp, tmp_path / "ddp.yaml")
    torchrun(["sp_cam.train_seg"], tmp_path / "ddp.yaml")
    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    seed_everything(derive_seed(single.run.seed))  # the initial weights of both runs
    init = build_segmenter(single.seg, 5).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in init if init[k].is_floating_point()) > 1e-4


def _break_missing(folder: Path, image_id: str) -> str:
    (folder / f"{image_id}.png").unlink()
    return "label not found"


def _break_rgb(folder: Path, image_id: str) -> str:
    Image.new("RGB", (SIZE, SIZE)).save(folder / f"{image_id}.png")
    return "RGB"


def _break_value(folder: Path, image_id: str) -> str:
    write_label_png(folder / f"{image_id}.png", np.full((SIZE, SIZE), 9, dtype=np.uint8))
    return "label value 9 out of range 0..5"


def _break_size(folder: Path, image_id: str) -> str:
    write_label_png(folder / f"{image_id}.png", np.zeros((SIZE, SIZE + 3), dtype=np.uint8))
    return "does not match the image size"


@pytest.mark.parametrize("damage", [_break_missing, _break_rgb, _break_value, _break_size])
def test_bad_labels_are_one_line_naming_the_file_before_training(toy_root, tmp_path, damage, capsys):
    labels = label_folder(toy_root, tmp_path / "labels")
    bad_id = "train_00003"
    message = damage(labels, bad_id)
    cfg = make_config(tmp_path / "w", toy_root, labels)
    save_config(cfg, tmp_path / "c.yaml")
    assert train_seg.main(["-c", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and f"{bad_id}.png" in err, err
    sdir = RunPaths.from_work_dir(cfg.run.work_dir).seg
    assert not RunPaths.last_checkpoint(sdir).exists() and not RunPaths.metrics_log(sdir).exists()


def test_missing_pseudo_labels_say_which_stage_to_run(toy_root, tmp_path):
    cfg = make_config(tmp_path / "w", toy_root, "")
    with pytest.raises(FileNotFoundError, match="pseudo labels not found: .*pseudo_labels .*sp_cam.make_pseudo"):
        train_seg.run(cfg)


def test_crf_refines_and_is_required_when_asked(toy_root, tmp_path, monkeypatch):
    from sp_cam import crf

    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 255  # two flat regions
    probs = np.zeros((2, 16, 16), np.float32)
    probs[0, :, :8], probs[1, :, 8:] = 0.8, 0.8
    probs[1, :, :8], probs[0, :, 8:] = 0.2, 0.2
    probs[:, 5, 3] = (0.45, 0.55)  # one noisy pixel inside the dark region
    refined = crf.dense_crf(image, probs, crf.CRFParams())
    assert refined.shape == (2, 16, 16) and np.allclose(refined.sum(0), 1, atol=1e-4)
    labels = refined.argmax(0)
    assert labels[5, 3] == 0  # the noisy pixel joins its region
    assert (labels[:, :8] == 0).all() and (labels[:, 8:] == 1).all()  # the colour edge stays

    cfg = make_config(tmp_path / "w", toy_root, "gt", "seg.crf=require")
    monkeypatch.setattr(eval_seg, "crf_available", lambda: False)
    monkeypatch.setitem(__import__("sys").modules, "pydensecrf.densecrf", None)
    with pytest.raises(ValueError, match="pip install pydensecrf2"):
        eval_seg.use_crf(cfg)
    shutil.rmtree(tmp_path / "w", ignore_errors=True)
