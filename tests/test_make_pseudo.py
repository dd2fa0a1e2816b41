"""Stage 3 end to end on a tiny toy run with random-init models saved as the trainers save them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.label_png import read_label_png
from net.spixel_fcn import build_spixel_fcn
from sp_cam import ablation, make_pseudo
from sp_cam.config import Config, config_to_dict, load_config
from sp_cam.io import save_checkpoint
from sp_cam.metrics import confusion_matrix, iou_from_confusion
from sp_cam.models import build_classifier
from sp_cam.open_data import open_dataset
from sp_cam.paths import RunPaths
from sp_cam.score_store import load_scores

TINY = [
    "run.device=cpu",
    "data.dataset=toy",
    "toy.num_train=1",
    "toy.num_val=4",
    "toy.image_size=40",  # not a multiple of 16: exercises the resize to the padded size and back
    "data.pseudo_split=val",
    "data.num_workers=0",
    "cam.backbone=tiny",
    "spcam.backbone=tiny",
    "spcam.drm_encoder_widths=[4,4,4,4,4]",
    "spcam.drm_head_widths=[8]",
    "pseudo.scales=[1.0,0.5]",
    "pseudo.flip=true",
    "pseudo.t_list=[0,3]",
    "pseudo.th_list=[0.2,0.4]",
]


def tiny_config(work: Path, *extra: str) -> Config:
    return load_config(None, [f"run.work_dir={work}", *TINY, *extra])


def write_checkpoints(cfg: Config, with_cam: bool = True, seed: int = 0) -> None:
    """Random-init SP-CAM / CAM / FCN weights in the trainers' final-weights formats."""
    torch.manual_seed(seed)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    k = open_dataset(cfg).num_classes
    for kind, folder in (("spcam", paths.spcam), ("cam", paths.cam)):
        if kind == "cam" and not with_cam:
            continue
        ccfg = getattr(cfg, kind)
        model = build_classifier(ccfg, kind, k, pretrained="")
        save_checkpoint(
            RunPaths.model(folder),
            {
                "model_type": kind,
                "model": model.state_dict(),
                "config": config_to_dict(cfg),
                "num_classes": k,
                "backbone": ccfg.backbone,
            },
        )
    save_checkpoint(RunPaths.model(paths.fcn), {"model": build_spixel_fcn("").state_dict()})


def new_run(root: Path, *extra: str, with_cam: bool = True) -> Config:
    cfg = tiny_config(root, *extra)
    write_checkpoints(cfg, with_cam)
    return cfg


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Config:
    """One complete make_pseudo run (select=gt), shared by the read-only tests."""
    torch.manual_seed(0)
    cfg = new_run(tmp_path_factory.mktemp("pseudo") / "work")
    make_pseudo.run(cfg)
    return cfg


def copy_run(cfg: Config, dest: Path, *extra: str) -> Config:
    shutil.copytree(cfg.run.work_dir, dest)
    return tiny_config(dest, *extra)


def test_outputs_and_reported_miou(done_run):
    cfg = done_run
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    layout = open_dataset(cfg)
    ids = layout.ids("val")
    sel = json.loads((paths.selection).read_text())
    sweep = json.loads((paths.sweep).read_text())
    assert RunPaths.done(paths.pseudo).is_file()
    assert sel["select"] == "gt" and sel["num_images"] == len(ids) == sel["num_gt_images"]
    pairs = {(p["t"], p["th"]): p["miou"] for p in sweep["pairs"]}
    assert sorted(pairs) == [(0, 0.2), (0, 0.4), (3, 0.2), (3, 0.4)]
    assert pairs[(sel["t"], sel["th"])] == max(pairs.values()) == sel["miou"]
    # the PNGs are valid palette maps of the image sizes, and their mIoU against GT is the reported one
    conf = np.zeros((layout.num_classes + 1,) * 2, dtype=np.int64)
    for image_id in ids:
        png = paths.pseudo_labels / f"{image_id}.png"
        assert Image.open(png).mode == "P"
        label = read_label_png(png)
        assert label.shape == layout.image_size(image_id)
        assert int(label.max()) <= layout.num_classes
        present = set(np.unique(label).tolist()) - {0}
        assert present <= set(layout.labels(image_id))  # absent classes never appear
        conf += confusion_matrix(label, layout.load_mask(image_id), layout.num_classes + 1)
    assert iou_from_confusion(conf).miou == pytest.approx(sel["miou"], abs=1e-9)
    with np.load(paths.scores_file(ids[0])) as z:
        assert z["scores"].dtype == np.float16
        assert z["scores"].shape == (2, len(z["classes"]), *layout.image_size(ids[0]))
        assert z["conf_psam"].shape == (2, 2, layout.num_classes + 1, layout.num_classes + 1)


def test_rerun_skips_everything(done_run, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(make_pseudo, "process_image", boom)
    monkeypatch.setattr(make_pseudo, "write_label_png", boom)
    assert make_pseudo.run(done_run)["select"] == "gt"


def test_resume_after_crash_computes_only_missing(done_run, tmp_path, monkeypatch):
    cfg = copy_run(done_run, tmp_path / "w")
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    ids = open_dataset(cfg).ids("val")
    before = (paths.pseudo_labels / f"{ids[0]}.png").read_bytes()
    RunPaths.done(paths.pseudo).unlink()
    (paths.scores_file(ids[1])).unlink()
    (paths.pseudo_labels / f"{ids[2]}.png").unlink()
    seen = []
    real = make_pseudo.process_image

    def spy(models, item, *a, **k):
        seen.append(item["id"])
        return real(models, item, *a, **k)

    monkeypatch.setattr(make_pseudo, "process_image", spy)
    make_pseudo.run(cfg)
    assert seen == [ids[1]]
    assert all((paths.pseudo_labels / f"{i}.png").is_file() for i in ids)
    assert (paths.pseudo_labels / f"{ids[0]}.png").read_bytes() == before


def test_fixed_selection_rewrites_labels_without_rerunning_networks(done_run, tmp_path, monkeypatch):
    old = json.loads((RunPaths.from_work_dir(done_run.run.work_dir).selection).read_text())
    t, th = (3, 0.2) if (old["t"], old["th"]) == (0, 0.4) else (0, 0.4)  # a pair other than the selected one
    cfg = copy_run(
        done_run, tmp_path / "w", "pseudo.select=fixed", f"pseudo.t={t}", f"pseudo.th={th}", "pseudo.save_scores=true"
    )
    monkeypatch.setattr(make_pseudo, "process_image", lambda *a, **k: pytest.fail("networks rerun"))
    rec = make_pseudo.run(cfg)
    assert (rec["select"], rec["t"], rec["th"]) == ("fixed", t, th)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    sweep = json.loads((paths.sweep).read_text())
    assert rec["miou"] == next(p["miou"] for p in sweep["pairs"] if (p["t"], p["th"]) == (t, th))
    for image_id in open_dataset(cfg).ids("val"):
        arrays = load_scores(paths.scores_file(image_id))
        np.testing.assert_array_equal(
            read_label_png(paths.pseudo_labels / f"{image_id}.png"), make_pseudo.labels_for(arrays, t, th, 0.0)
        )
        assert (paths.score_map(image_id)).is_file()


def test_fixed_threshold_outside_the_sweep_is_scored(done_run, tmp_path, monkeypatch):
    cfg = copy_run(done_run, tmp_path / "w", "pseudo.select=fixed", "pseudo.t=3", "pseudo.th=0.33")
    monkeypatch.setattr(make_pseudo, "process_image", lambda *a, **k: pytest.fail("networks rerun"))
    rec = make_pseudo.run(cfg)
    layout = open_dataset(cfg)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    conf = sum(
        confusion_matrix(read_label_png(paths.pseudo_labels / f"{i}.png"), layout.load_mask(i), layout.num_classes + 1)
        for i in layout.ids("val")
    )
    assert rec["th"] == 0.33 and rec["miou"] == pytest.approx(iou_from_confusion(conf).miou, abs=1e-9)


def test_sharded_run_equals_single_process(done_run, tmp_path):
    cfg = new_run(tmp_path / "w")
    assert make_pseudo.run(cfg, shard=(1, 2)) == {}  # leaves phase 2 to the shard that completes the set
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    ids = open_dataset(cfg).ids("val")
    assert sorted(p.stem for p in paths.scores.glob("*.npz")) == sorted(ids[1::2])
    assert not RunPaths.done(paths.pseudo).exists()
    rec = make_pseudo.run(cfg, shard=(0, 2))
    assert RunPaths.done(paths.pseudo).is_file()
    ref = json.loads((RunPaths.from_work_dir(done_run.run.work_dir).selection).read_text())
    assert (rec["t"], rec["th"], rec["miou"]) == (ref["t"], ref["th"], ref["miou"])


def test_select_gt_without_gt_is_an_error(done_run, tmp_path):
    cfg = copy_run(done_run, tmp_path / "w")
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    shutil.rmtree(paths.toy_data / "SegmentationClass")
    shutil.rmtree(paths.scores)
    RunPaths.done(paths.pseudo).unlink()
    with pytest.raises(ValueError, match="select=fixed"):
        make_pseudo.run(cfg)
    fixed = tiny_config(Path(cfg.run.work_dir), "pseudo.select=fixed", "pseudo.t=3", "pseudo.th=0.3")
    rec = make_pseudo.run(fixed)  # reuses the scores of the failed run
    assert rec["miou"] is None and rec["num_gt_images"] == 0 and (rec["t"], rec["th"]) == (3, 0.3)
    metrics = ablation.run(fixed)
    assert metrics["miou"] is None and metrics["num_images"] == 4


def test_labels_for_ignore_band():
    arrays = {
        "t_list": np.array([0]),
        "classes": np.array([1, 3], dtype=np.int16),
        "scores": np.array([[[[0.9, 0.5, 0.1]], [[0.2, 0.45, 0.05]]]], dtype=np.float16),
    }
    np.testing.assert_array_equal(make_pseudo.labels_for(arrays, 0, 0.3, 0.0), [[1, 1, 0]])
    np.testing.assert_array_equal(make_pseudo.labels_for(arrays, 0, 0.3, 0.1), [[1, 255, 0]])


def test_config_and_cli_errors(tmp_path, capsys):
    assert make_pseudo.main(["-c", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"run:\n  work_dir: {tmp_path / 'w'}\n")
    assert make_pseudo.main(["-c", str(cfg_file), "pseudo.select=fixed", "pseudo.t=7"]) == 2
    assert "pseudo.t=7" in capsys.readouterr().err
    assert make_pseudo.main(["-c", str(cfg_file), "--shard", "3/2"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_missing_weights_named(tmp_path):
    cfg = tiny_config(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="SP-CAM weights not found"):
        make_pseudo.run(cfg)


def test_ablation_report(done_run):
    metrics = ablation.run(done_run)
    paths = RunPaths.from_work_dir(done_run.run.work_dir)
    for key in ("miou", "cam_miou", "t", "th", "select", "split", "num_images"):
        assert key in metrics
    assert json.loads(paths.metrics.read_text()) == metrics
    rows = {r["key"]: r for r in metrics["ablation"]}
    assert sorted(rows) == list("abcdef")
    assert rows["c"]["final"] and rows["c"]["miou"] == metrics["miou"]
    assert metrics["cam_miou"] == rows["a"]["miou"] is not None
    assert all(rows[k]["miou"] is not None and 0 <= rows[k]["miou"] <= 100 for k in "abcdef")
    assert rows["b"]["t"] == 0 and rows["d"]["upsample"] == "bilinear"
    table = paths.ablation_table.read_text()
    assert "| c | **SP-CAM + random walk** (final)" in table
    assert json.loads((paths.ablation).read_text())["rows"][0]["key"] == "a"


def test_ablation_without_cam_model(tmp_path):
    cfg = new_run(tmp_path / "w", "toy.num_val=1", with_cam=False)
    make_pseudo.run(cfg)
    metrics = ablation.run(cfg)
    assert metrics["cam_miou"] is None and "stage A" in metrics["cam_note"]
    assert metrics["miou"] is not None


def test_gt_free_row_takes_t_and_th_chosen_on_the_heldout_split(tmp_path):
    cfg = new_run(tmp_path / "w", "data.pseudo_split=train", "toy.num_train=3", "pseudo.heldout_split=val")
    make_pseudo.run(cfg)
    metrics = ablation.run(cfg)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    heldout = json.loads(paths.heldout_outputs.selection.read_text())
    assert heldout["split"] == "val" and heldout["select"] == "gt"
    assert not paths.heldout_outputs.labels.exists()  # the held-out pass only selects
    row = {r["key"]: r for r in metrics["ablation"]}["c'"]
    assert (row["t"], row["th"]) == (heldout["t"], heldout["th"]) and "`val`" in row["name"]
    # its mIoU is that of the pseudo split's own sweep at the held-out pair
    pairs = {(p["t"], p["th"]): p["miou"] for p in json.loads(paths.sweep.read_text())["pairs"]}
    assert row["miou"] == pytest.approx(pairs[(heldout["t"], heldout["th"])], abs=1e-9)
    assert metrics["heldout"] == {"split": "val", "t": row["t"], "th": row["th"], "miou": row["miou"]}
    assert row["miou"] <= metrics["miou"] + 1e-9  # the pair chosen on the split itself is the best there
    assert "| c' | SP-CAM + random walk, (t, th) chosen on `val`" in paths.ablation_table.read_text()
