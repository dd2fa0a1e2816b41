"""The whole pipeline through scripts/train_all.sh on a tiny toy dataset: outputs, metrics, re-runs, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.label_png import read_label_png

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "run.device=cpu",
    "run.num_threads=1",
    "toy.num_train=6",
    "toy.num_val=3",
    "toy.image_size=64",
    "data.crop_size=64",
    "data.resize_long_min=48",
    "data.resize_long_max=80",
    "data.num_workers=0",
    "cam.backbone=tiny",
    "cam.pretrained=",
    "cam.freeze_backbone=false",
    "cam.epochs=1",
    "cam.batch_size=2",
    "spcam.backbone=tiny",
    "spcam.pretrained=",
    "spcam.freeze_backbone=false",
    "spcam.epochs=1",
    "spcam.batch_size=2",
    "spcam.drm_encoder_widths=[4,4,4,4,4]",
    "spcam.drm_head_widths=[8]",
    "fcn.epochs=2",
    "fcn.batch_size=2",
    "export.scales=[1.0]",
    "pseudo.scales=[1.0,0.5]",
    "pseudo.t_list=[0,2]",
    "seg.backbone=tiny",
    "seg.init=none",
    "seg.iterations=3",
    "seg.batch_size=2",
    "seg.crop_size=48",
    "seg.eval_every=0",
    "seg.test_scales=[1.0,0.5]",
    "seg.crf=none",
    "seg.gt_reference=true",
]


def train_all(work: Path, *extra: str, script: str = "train_all.sh") -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = ["bash", str(ROOT / "scripts" / script), "--work-dir", str(work), *TINY, *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("pipeline") / "work"
    out = finish(train_all(work))
    assert "| " in out  # the ablation table is printed
    return work


def test_outputs_and_metrics(full_run: Path):
    metrics = json.loads((full_run / "metrics.json").read_text())
    for key in ("miou", "cam_miou", "t", "th", "select", "split", "num_images"):
        assert key in metrics, key
    assert 0.0 <= metrics["miou"] <= 100.0 and 0.0 <= metrics["cam_miou"] <= 100.0
    assert metrics["t"] in (0, 2) and metrics["select"] == "gt" and metrics["split"] == "train"
    ids = (full_run / "toy_data" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert metrics["num_images"] == len(ids) == 6
    for i in ids:
        label = read_label_png(full_run / "pseudo_labels" / f"{i}.png")
        assert label.shape == (64, 64) and label.max() <= 5
    assert (full_run / "ablation.md").read_text().count("\n") >= 5
    for stage in ("cam", "cams", "fcn", "spcam", "pseudo", "seg", "seg_gt"):
        assert (full_run / stage / "DONE").is_file(), stage
    for key in ("seg_miou", "seg_miou_ms", "seg_gt_miou"):  # stage 4 on val, and its supervised reference
        assert 0.0 <= metrics[key] <= 100.0, key
    assert "seg_miou_crf" not in metrics and metrics["seg_split"] == "val" and metrics["absent"] == "present"
    assert [r["key"] for r in metrics["seg_ablation"]] == ["g", "h", "j", "k"]
    assert set(metrics["per_class"]["rows"]) == {"cam", "spcam", "seg", "seg_gt"}
    assert all(len(v) == 6 for v in metrics["per_class"]["rows"].values())
    val = (full_run / "toy_data" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert sorted(p.stem for p in (full_run / "seg" / "predictions" / "val").glob("*.png")) == sorted(val)
    assert (full_run / "config.yaml").is_file()


def test_rerun_skips_finished_work(full_run: Path):
    before = {p: p.stat().st_mtime_ns for p in (full_run / "pseudo_labels").iterdir()}
    model_mtime = (full_run / "spcam" / "model.pt").stat().st_mtime_ns
    metrics = (full_run / "metrics.json").read_text()
    start = time.time()
    finish(train_all(full_run))
    assert (full_run / "spcam" / "model.pt").stat().st_mtime_ns == model_mtime
    assert {p: p.stat().st_mtime_ns for p in (full_run / "pseudo_labels").iterdir()} == before
    assert json.loads((full_run / "metrics.json").read_text()) == json.loads(metrics)
    assert time.time() - start < 120


def test_killed_run_resumes_to_the_same_metrics(full_run: Path, tmp_path: Path):
    work = tmp_path / "work"
    proc = train_all(work)
    deadline = time.time() + 240
    while not (work / "fcn" / "last.pt").is_file():  # killed inside stage 1, after its first epoch
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the script and the pipeline it runs, as a kill of the terminal would
    proc.communicate()
    assert not (work / "metrics.json").exists()  # killed before the end (usually inside stage 1)
    finish(train_all(work))
    resumed = json.loads((work / "metrics.json").read_text())
    reference = json.loads((full_run / "metrics.json").read_text())
    assert resumed["miou"] == pytest.approx(reference["miou"], abs=1e-6)
    assert resumed["cam_miou"] == pytest.approx(reference["cam_miou"], abs=1e-6)
    a = read_label_png(work / "pseudo_labels" / "train_00000.png")
    b = read_label_png(full_run / "pseudo_labels" / "train_00000.png")
    assert np.array_equal(a, b)


def test_train_sp_cam_with_given_fcn_weights(full_run: Path, tmp_path: Path):
    work = tmp_path / "work"
    finish(train_all(work, "--fcn-weights", str(full_run / "fcn" / "model.pt"), script="train_sp_cam.sh"))
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["cam_miou"] is None and 0.0 <= metrics["miou"] <= 100.0
    assert not (work / "cam").exists() and not (work / "fcn").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data-root", "/nonexistent/folder"], "--data-root"),
        (["--nproc", "zero"], "--nproc"),
        (["--config", "/nonexistent.yaml"], "--config"),
        (["cam.epochz=1"], "cam.epochz"),
        (["--bogus"], "unknown argument"),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(tmp_path: Path, args: list[str], message: str):
    cmd = ["bash", str(ROOT / "scripts" / "train_all.sh"), "--work-dir", str(tmp_path / "w"), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[0]


def test_data_root_without_images_is_refused(tmp_path: Path):
    root = tmp_path / "data"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (root / "cls_labels.json").write_text('{"a": [1], "b": [2]}')
    cmd = [sys.executable, "-m", "sp_cam.pipeline", "-c", "scripts/configs/toy.yaml", f"run.work_dir={tmp_path / 'w'}"]
    cmd += ["data.dataset=folder", f"data.root={root}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "JPEGImages" in result.stderr or "image" in result.stderr.lower()


def test_two_processes_with_torchrun(tmp_path: Path):
    """--nproc 2: training (stage 1 too) under torchrun (gloo on CPU), export and pseudo labels sharded over two
    processes."""
    work = tmp_path / "work"
    out = finish(train_all(work, "--nproc", "2"))
    launches = [line for line in out.splitlines() if "launching:" in line]
    assert all("--nproc_per_node=2" in line for line in launches)
    modules = [line.split(" -m ")[-1].split(" -c ")[0] for line in launches]
    assert modules == [
        "sp_cam.train_cls cam",
        "sp_cam.export_cams",
        "sp_cam.train_fcn",
        "sp_cam.train_cls spcam",
        "sp_cam.make_pseudo",
        "sp_cam.train_seg",
        "sp_cam.eval_seg",
        "sp_cam.train_seg",
        "sp_cam.eval_seg",
    ]
    assert launches[-1].endswith("seg.labels=gt") and launches[-2].endswith("seg.labels=gt")
    fcn_records = [json.loads(x) for x in (work / "fcn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in fcn_records if r["kind"] == "epoch"] == [3, 6]  # 6 images, global batch 2, rank 0 logs
    assert "gloo on CPU: no SyncBatchNorm, the 14 BN layers of SpixelNet keep per-process batch statistics" in out
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and 0.0 <= metrics["miou"] <= 100.0
    assert len(list((work / "cams").glob("*.npz"))) == 6
    assert len(list((work / "pseudo_labels").glob("*.png"))) == 6
