"""The guards wired into the stages, end to end: ids and names never leave their folder, outputs are never reused for
other inputs, one run per stage folder, damaged intermediates are redone, dataset folders are checked, and the
pipeline's launch of every step across nodes.

Each refusal is one ``error: ...`` line naming the file or key, exit code 2, and touches no file outside the work dir
and no finished output (the building blocks are tested in test_bad_guards.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.ids import BadIdError
from data.label_png import read_label_png
from data.toy import make_toy_dataset
from data.voc_layout import VOCLayout
from net.spixel_fcn import build_spixel_fcn
from sp_cam import ablation, eval_seg, export_cams, make_pseudo, pipeline, train_cls, train_fcn, train_seg
from sp_cam.cam_store import is_valid
from sp_cam.config import load_config, save_config
from sp_cam.guard import remove_outputs, write_done
from sp_cam.io import load_checkpoint, save_checkpoint
from sp_cam.paths import LabelOutputs, RunPaths
from sp_cam.score_store import load_scores
from sp_cam.stage_guard import seg_inputs
from tests.test_bad_guards import HOLD
from tests.test_bad_inputs import error_line, escaping_setup, run_module, snapshot
from tests.test_export_cams import _config_with_cam_model
from tests.test_make_pseudo import new_run
from tests.test_train_cls import TOY_SIZE, TOY_TRAIN, TOY_VAL, tiny_config
from tests.test_train_fcn import make_config as fcn_config
from tests.test_train_fcn import write_cams
from tests.test_train_seg import label_folder
from tests.test_train_seg import make_config as seg_config

ROOT = Path(__file__).resolve().parents[1]
STALE_TMP = ".model.pt.abcdefgh.tmp.pt"  # what atomic_write leaves when killed mid-write


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", TOY_TRAIN, TOY_VAL, image_size=TOY_SIZE, seed=0)


@pytest.fixture(scope="module")
def other_root(tmp_path_factory) -> Path:
    """Another dataset with the same ids (the toy generator names them alike), of another image size."""
    return make_toy_dataset(tmp_path_factory.mktemp("other") / "toy", TOY_TRAIN, TOY_VAL, image_size=48, seed=1)


def outputs(folder: Path) -> dict[str, str]:
    """:func:`snapshot` of a run's files, less the stage locks (an empty file, created by the first run that locks)."""
    return {k: v for k, v in snapshot(folder).items() if not Path(k).name.startswith(".lock")}


def config_file(cfg, path: Path) -> str:
    save_config(cfg, path)
    return str(path)


def hold_lock(folder: Path, lock_name: str = ".lock") -> subprocess.Popen:
    """Another process holding ``folder/lock_name`` (test_bad_guards.HOLD), once it says so."""
    script = HOLD.replace("StageLock(sys.argv[1], ", f"StageLock(sys.argv[1], lock_name={lock_name!r}, label=")
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


# -------------------------------------------------------------------- 1. path escape: the second guard


def test_per_id_paths_are_built_inside_their_folder(tmp_path):
    paths = RunPaths.from_work_dir(tmp_path / "work")
    seg = paths.seg
    builders = [
        paths.cam_file,
        paths.scores_file,
        paths.pseudo_label,
        paths.score_map,
        paths.seg_label_outputs.label,
        lambda i: RunPaths.seg_score_file(seg, "val", i),
        lambda i: RunPaths.seg_prediction(seg, "val", i),
        lambda i: RunPaths.voc_test_result(seg, i),
    ]
    for build in builders:
        assert build("2007_000032").parent.resolve().is_relative_to((tmp_path / "work").resolve())
        for name in ("../../../outside/rel_x", f"{tmp_path}/outside/abs_x"):
            with pytest.raises(BadIdError, match="outside this folder"):
                build(name)
    for split in ("../../../outside", f"{tmp_path}/outside"):
        for folder in (RunPaths.seg_scores, RunPaths.seg_predictions):
            with pytest.raises(BadIdError, match="outside this folder"):
                folder(seg, split)
    with pytest.raises(BadIdError, match="outside this folder"):
        RunPaths.seg_summary(seg, "../../../outside")  # eval_<split>.json: an absolute split stays below eval_


@pytest.mark.parametrize("split_key", ["seg.train_split", "seg.eval_split"])
def test_stage4_training_refuses_a_list_that_leaves_the_folder(tmp_path, split_key):
    root, lst, bad, outside_before = escaping_setup(tmp_path, "val")
    work = tmp_path / "work"
    work.mkdir()
    cfg = seg_config(work, root, "gt", f"{split_key}=val")
    for kept in bad[1:] if split_key == "seg.train_split" else bad[:1]:
        lst.write_text(lst.read_text().replace(kept + "\n", ""))  # one bad id per case: '/x' or '../../x'
    res = run_module("sp_cam.train_seg", "-c", config_file(cfg, tmp_path / "cfg.yaml"))
    assert res.returncode == 2, res.stderr
    error_line(res.stderr, f"{lst}:", "ids are used as file names")
    assert snapshot(tmp_path / "outside") == outside_before
    assert outputs(work) == {}  # not even the stage's config.yaml


def test_stage4_evaluation_refuses_a_list_or_split_that_leaves_the_folder(tmp_path):
    root, lst, bad, outside_before = escaping_setup(tmp_path, "val")
    work = tmp_path / "work"
    model = RunPaths.model(RunPaths.from_work_dir(work).seg_gt)
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")  # never read: the list is refused first
    cfg_file = config_file(seg_config(work, root, "gt"), tmp_path / "cfg.yaml")
    work_before = outputs(work)
    res = run_module("sp_cam.eval_seg", "-c", cfg_file)
    assert res.returncode == 2, res.stderr
    error_line(res.stderr, f"{lst}:", repr(bad[0]), "ids are used as file names")
    # a split name is a folder name of the work dir: one that leads outside is refused before any list is read
    res = run_module("sp_cam.eval_seg", "-c", cfg_file, "--split", "../../../../../../outside_split")
    assert res.returncode == 2, res.stderr
    error_line(res.stderr, "outside this folder")
    assert snapshot(tmp_path / "outside") == outside_before and outputs(work) == work_before
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.npz"))


# -------------------------------------------------------------------- 2. stale outputs: the catalogue


def test_make_pseudo_with_another_dataset_root_is_refused_then_recomputed(tmp_path, monkeypatch, capsys):
    cfg = new_run(tmp_path / "work")
    make_pseudo.run(cfg)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    other = make_toy_dataset(tmp_path / "other", 1, 4, image_size=56, seed=3)  # the same ids, 56x56 images
    moved = new_run(tmp_path / "work", "data.dataset=folder", f"data.root={other}")
    finished = outputs(paths.root)
    assert make_pseudo.main(["-c", config_file(moved, tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, str(paths.pseudo / "DONE"), "data.pseudo.root", "--force pseudo")
    assert outputs(paths.root) == finished  # nothing of the finished stage touched
    recorded = json.loads(RunPaths.done(paths.pseudo).read_text())["inputs"]["data"]["pseudo"]["root"]
    assert recorded == "WORK_DIR/toy_data"  # the toy set inside the run: a moved run keeps its markers

    RunPaths.done(paths.pseudo).unlink()  # without the marker: every scores file of the old dataset is stale
    computed = []
    real = make_pseudo.process_image
    monkeypatch.setattr(
        make_pseudo, "process_image", lambda m, item, *a: computed.append(item["id"]) or real(m, item, *a)
    )
    make_pseudo.run(moved)
    ids = VOCLayout(other).ids("val")
    assert sorted(computed) == sorted(ids)
    for image_id in ids:
        assert read_label_png(paths.pseudo_label(image_id)).shape == (56, 56)
        assert load_scores(paths.scores_file(image_id))["scores"].shape[-2:] == (56, 56)


def test_export_with_another_dataset_root_is_refused(toy_root, other_root, tmp_path, capsys):
    cfg = _config_with_cam_model(tmp_path, toy_root)
    export_cams.run(cfg)
    cams = RunPaths.from_work_dir(tmp_path).cams
    finished = outputs(cams)
    moved = _config_with_cam_model(tmp_path, other_root)
    assert export_cams.main(["-c", config_file(moved, tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, str(cams / "DONE"), "export finished for other inputs", "data.train.root")
    assert outputs(cams) == finished


def test_unfinished_export_with_other_settings_is_refused(toy_root, tmp_path, capsys):
    cfg = _config_with_cam_model(tmp_path, toy_root)
    export_cams.run(cfg, shard=(0, 2))  # an interrupted export: some CAM files, no DONE
    cams = RunPaths.from_work_dir(tmp_path).cams
    before = outputs(cams)
    other = _config_with_cam_model(tmp_path, toy_root, "export.scales=[1.0]")
    assert export_cams.main(["-c", config_file(other, tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, str(cams / "STARTED"), "was started for other inputs", "export.scales")
    assert outputs(cams) == before


@pytest.fixture(scope="module")
def trained_cam(toy_root, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cam") / "work"
    train_cls.run(tiny_config(work, toy_root), "cam")
    return work


def test_finished_training_stage_with_other_settings_is_refused(trained_cam, toy_root, tmp_path, capsys):
    sdir = RunPaths.from_work_dir(trained_cam).cam
    finished = outputs(sdir)
    other = tiny_config(trained_cam, toy_root, "cam.lr=0.02", "data.num_workers=1", "cam.log_every=3")
    assert train_cls.main(["cam", "-c", config_file(other, tmp_path / "cfg.yaml")]) == 2
    line = error_line(capsys.readouterr().err, str(sdir / "DONE"), "config.cam.lr: 0.01 -> 0.02", "--force cam")
    assert "num_workers" not in line and "log_every" not in line  # how a stage runs is not what it computes
    assert outputs(sdir) == finished
    assert json.loads((sdir / "DONE").read_text())["inputs"]["data"]["train"]["root"] == str(toy_root.resolve())


def test_stage2_refuses_other_fcn_weights(toy_root, tmp_path, capsys):
    fcn_file = tmp_path / "fcn.pt"
    torch.manual_seed(0)
    save_checkpoint(fcn_file, {"model": build_spixel_fcn("").state_dict()})
    cfg = tiny_config(tmp_path / "work", toy_root, f"fcn.weights={fcn_file}", "spcam.epochs=1")
    train_cls.run(cfg, "spcam")
    sdir = RunPaths.from_work_dir(tmp_path / "work").spcam
    finished = outputs(sdir)
    torch.manual_seed(1)
    save_checkpoint(fcn_file, {"model": build_spixel_fcn("").state_dict()})  # stage 1 retrained in place
    assert train_cls.main(["spcam", "-c", config_file(cfg, tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, str(sdir / "DONE"), "upstream.fcn")
    assert outputs(sdir) == finished


def test_stage1_refuses_cams_of_another_export(tmp_path, capsys):
    root = make_toy_dataset(tmp_path / "toy_data", num_train=5, num_val=2, image_size=64)
    work = tmp_path / "work"
    write_cams(work, root)
    cams_done = RunPaths.done(RunPaths.from_work_dir(work).cams)
    write_done(cams_done, {"export": "first"})
    cfg = fcn_config(work, root, "fcn.epochs=1")
    train_fcn.run(cfg)
    finished = outputs(RunPaths.from_work_dir(work).fcn)
    write_done(cams_done, {"export": "second"})  # step B redone for other inputs
    assert train_fcn.main(["-c", config_file(cfg, tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, "fcn/DONE", "upstream.cams")
    assert outputs(RunPaths.from_work_dir(work).fcn) == finished


def test_stage4_inputs_follow_its_labels(toy_root, tmp_path):
    layout = VOCLayout(toy_root)
    cfg = seg_config(tmp_path / "w", toy_root, "", "seg.train_split=")
    done = RunPaths.from_work_dir(tmp_path / "w").pseudo_outputs.done
    write_done(done, {"t": 0})
    first = seg_inputs(cfg, layout)["upstream"]["labels"]
    write_done(done, {"t": 3})  # stage 3 re-selected
    assert seg_inputs(cfg, layout)["upstream"]["labels"] != first
    folder = label_folder(toy_root, tmp_path / "labels")
    given = seg_config(tmp_path / "w", toy_root, folder)
    before = seg_inputs(given, layout)["upstream"]["labels"]
    png = folder / f"{layout.ids('train')[0]}.png"
    png.write_bytes(png.read_bytes() + b"\0")
    assert seg_inputs(given, layout)["upstream"]["labels"] != before


def _crash_in_epoch_2(monkeypatch):
    original = train_cls.compute_loss
    calls = {"n": 0}

    def killed(model, fcn, batch, ccfg, ctx, *args):
        if ctx.epoch == 1:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt("killed")
        return original(model, fcn, batch, ccfg, ctx, *args)

    monkeypatch.setattr(train_cls, "compute_loss", killed)
    return original


def test_resume_with_changed_hyper_parameters_is_refused(toy_root, tmp_path, monkeypatch, capsys, caplog):
    work = tmp_path / "work"
    cfg = tiny_config(work, toy_root, "cam.lr=0.05")
    original = _crash_in_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_cls.run(cfg, "cam")
    monkeypatch.setattr(train_cls, "compute_loss", original)
    sdir = RunPaths.from_work_dir(work).cam
    interrupted = outputs(sdir)
    changed = tiny_config(work, toy_root, "cam.lr=0.02")
    assert train_cls.main(["cam", "-c", config_file(changed, tmp_path / "cfg.yaml")]) == 2
    error_line(
        capsys.readouterr().err, str(sdir / "last.pt"), "config.cam.lr: 0.05 -> 0.02", "run.allow_config_change=true"
    )
    assert outputs(sdir) == interrupted  # config.yaml still the one of the run that wrote last.pt
    assert load_config(sdir / "config.yaml").cam.lr == 0.05
    allowed = tiny_config(work, toy_root, "cam.lr=0.02", "run.allow_config_change=true")
    train_cls.run(allowed, "cam")
    assert "cam.lr" in caplog.text and RunPaths.done(sdir).is_file()
    assert load_config(sdir / "config.yaml").cam.lr == 0.02


@pytest.fixture(scope="module")
def evaluated_seg(toy_root, tmp_path_factory) -> tuple[Path, dict]:
    """A stage-4 run trained on stand-in labels and evaluated on val: (work dir, summary)."""
    base = tmp_path_factory.mktemp("seg")
    cfg = seg_config(base / "w", toy_root, label_folder(toy_root, base / "labels"), "seg.iterations=2")
    train_seg.run(cfg)
    return base / "w", eval_seg.run(cfg)


def _seg_copy(evaluated_seg, toy_root, dest: Path, *extra: str):
    work, _ = evaluated_seg
    shutil.copytree(work, dest)
    return seg_config(dest, toy_root, work.parent / "labels", "seg.iterations=2", *extra)


def test_stage4_evaluation_with_other_settings_is_refused(evaluated_seg, toy_root, tmp_path, capsys):
    other = _seg_copy(evaluated_seg, toy_root, tmp_path / "w", "seg.test_scales=[1.0]")
    sdir = RunPaths.from_work_dir(tmp_path / "w").seg
    finished = outputs(sdir)
    assert eval_seg.main(["-c", config_file(other, tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, "eval_val.json", "config.seg.test_scales", "sp_cam.eval_seg --force")
    assert outputs(sdir) == finished


def test_stage4_evaluation_redoes_damaged_files(evaluated_seg, toy_root, tmp_path):
    cfg = _seg_copy(evaluated_seg, toy_root, tmp_path / "w")
    sdir = RunPaths.from_work_dir(tmp_path / "w").seg
    finished = outputs(sdir)
    ids = VOCLayout(toy_root).ids("val")
    files = [RunPaths.seg_scores(sdir, "val") / f"{i}.npz" for i in ids[:2]]
    with np.load(files[0]) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(files[0], **arrays)  # stored, not compressed: a flipped byte of the matrices is inside the data
    data = bytearray(files[0].read_bytes())
    data[data.index(arrays["conf_single"].tobytes()) + 8] ^= 0xFF
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:40])
    RunPaths.seg_summary(sdir, "val").unlink()
    assert eval_seg.run(cfg)["modes"] == evaluated_seg[1]["modes"]  # a damaged file is redone, not a crash
    assert outputs(sdir) == finished


# -------------------------------------------------------------------- --force


def test_force_removes_only_the_stage_outputs_inside_the_work_dir(trained_cam, toy_root, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(trained_cam, work)
    sdir = RunPaths.from_work_dir(work).cam
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's\n")
    (sdir / "linked").symlink_to(outside, target_is_directory=True)
    old_done = (sdir / "DONE").read_text()
    changed = tiny_config(work, toy_root, "cam.lr=0.02")
    assert train_cls.main(["cam", "--force", "-c", config_file(changed, tmp_path / "cfg.yaml")]) == 0
    assert (outside / "keep.txt").read_text() == "not the run's\n" and not (sdir / "linked").exists()
    assert (sdir / "DONE").read_text() != old_done and load_config(sdir / "config.yaml").cam.lr == 0.02
    assert load_checkpoint(RunPaths.model(sdir))["config"]["cam"]["lr"] == 0.02
    assert (sdir / ".lock").read_text() == ""  # the lock file stays: removing it would let two runs lock two files


def test_remove_outputs_stays_inside_and_keeps_locks(tmp_path):
    work = tmp_path / "work"
    stage = work / "pseudo"
    (stage / "scores").mkdir(parents=True)
    for name in (".lock", ".lock-shard-0-of-2", "run.log", "DONE", "scores/a.npz"):
        (stage / name).write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.png").write_text("x")
    (work / "pseudo_labels").symlink_to(outside, target_is_directory=True)
    for bad in (tmp_path / "elsewhere", work, work / ".." / "outside"):
        with pytest.raises(ValueError, match="not inside the work dir") as e:
            remove_outputs(work, [stage, bad])
        assert "\n" not in str(e.value)
    assert (stage / "DONE").is_file()  # a refused call removes nothing
    assert remove_outputs(work, [stage, work / "pseudo_labels", work / "none"]) == [stage, work / "pseudo_labels"]
    assert sorted(p.name for p in stage.iterdir()) == [".lock", ".lock-shard-0-of-2", "run.log"]
    assert (outside / "a.png").is_file() and not (work / "pseudo_labels").exists()


def test_make_pseudo_force_recomputes_everything(tmp_path, monkeypatch, capsys):
    cfg = new_run(tmp_path / "work")
    make_pseudo.run(cfg)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    label = paths.pseudo_label(VOCLayout(paths.toy_data).ids("val")[0])
    label.write_bytes(b"a label of an older run")
    computed = []
    real = make_pseudo.process_image
    monkeypatch.setattr(
        make_pseudo, "process_image", lambda m, item, *a: computed.append(item["id"]) or real(m, item, *a)
    )
    cfg_file = config_file(cfg, tmp_path / "cfg.yaml")
    assert make_pseudo.main(["-c", cfg_file, "--force"]) == 0
    assert len(computed) == 4 and read_label_png(label).ndim == 2
    assert make_pseudo.main(["-c", cfg_file, "--force", "--shard", "0/2"]) == 2
    error_line(capsys.readouterr().err, "--force with --shard")


def test_pipeline_passes_force_to_the_steps(toy_root, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_cls, "run", lambda cfg, kind, force=False: calls.append(("cam", force)))
    monkeypatch.setattr(export_cams, "run", lambda cfg, force=False: calls.append(("export", force)))
    cfg = tiny_config(tmp_path / "work", toy_root)
    pipeline.run(cfg, ["cam", "export"], force=pipeline.parse_steps("export", "--force"))
    assert calls == [("cam", False), ("export", True)]
    with pytest.raises(ValueError, match=r"--force: unknown step\(s\) \['cams'\]"):
        pipeline.parse_steps("export,cams", "--force")
    with pytest.raises(ValueError, match="--force fcn: not among the steps that run"):
        pipeline.run(cfg, ["cam"], force=["fcn"])
    cmd = pipeline.torchrun_command(
        Path("c.yaml"), ["sp_cam.make_pseudo"], [], pipeline.Launch(nproc=2), "pseudo", True
    )
    assert cmd[-4:] == ["sp_cam.make_pseudo", "-c", "c.yaml", "--force"]


# -------------------------------------------------------------------- 3. one run per stage folder


RUN_A = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sp_cam import train_cls
    release = Path(sys.argv[2])
    original = train_cls.compute_loss
    def waiting(*args, **kwargs):
        while not release.exists():
            time.sleep(0.05)
        return original(*args, **kwargs)
    train_cls.compute_loss = waiting
    raise SystemExit(train_cls.main(["cam", "-c", sys.argv[1]]))
    """
)


def test_second_run_of_a_training_stage_fails_and_leaves_the_first_alone(toy_root, tmp_path, capsys):
    work = tmp_path / "work"
    cfg_a = config_file(tiny_config(work, toy_root, "cam.lr=0.02"), tmp_path / "a.yaml")
    cfg_b = config_file(tiny_config(work, toy_root, "cam.lr=0.05"), tmp_path / "b.yaml")
    release = tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_a = subprocess.Popen([sys.executable, "-c", RUN_A, cfg_a, str(release)], cwd=ROOT, env=env,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        started = RunPaths.from_work_dir(work).cam / "config.yaml"
        deadline = time.monotonic() + 120
        while not started.is_file():  # run A is training (it waits in its first step)
            assert run_a.poll() is None and time.monotonic() < deadline, run_a.stderr.read() if run_a.poll() else ""
            time.sleep(0.05)
        start = time.monotonic()
        assert train_cls.main(["cam", "-c", cfg_b]) == 2
        assert time.monotonic() - start < 30  # at once: no training, no waiting
        error_line(capsys.readouterr().err, "cam: cam is already running", f"pid {run_a.pid}", cfg_a)
    finally:
        release.write_text("go")
        _, err = run_a.communicate(timeout=300)
    assert run_a.returncode == 0, err[-3000:]
    sdir = RunPaths.from_work_dir(work).cam
    assert load_config(sdir / "config.yaml").cam.lr == 0.02
    final, last = load_checkpoint(sdir / "model.pt"), load_checkpoint(sdir / "last.pt")
    assert final["config"]["cam"]["lr"] == 0.02 and last["config"]["cam"]["lr"] == 0.02
    records = [json.loads(x) for x in (sdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]  # run A's two epochs, nothing of run B
    assert final["metrics"]["miou"] == max(r["eval_miou"] for r in epochs)  # the best score reported is A's own


def test_every_stage_command_takes_its_folder_lock(tmp_path, toy_root, capsys):
    cam_cfg = _config_with_cam_model(tmp_path / "e", toy_root)
    pseudo_cfg = new_run(tmp_path / "p")
    make_pseudo.run(pseudo_cfg)
    seg_work = tmp_path / "s"
    (seg_work / "seg").mkdir(parents=True)
    (seg_work / "seg" / "model.pt").write_bytes(b"weights")
    seg_cfg = seg_config(seg_work, toy_root, "labels")
    cases = [
        (export_cams.main, [], cam_cfg, RunPaths.from_work_dir(tmp_path / "e").cams, ".lock"),
        (export_cams.main, ["--shard", "1/2"], cam_cfg, RunPaths.from_work_dir(tmp_path / "e").cams,
         ".lock-shard-1-of-2"),
        (make_pseudo.main, [], pseudo_cfg, RunPaths.from_work_dir(tmp_path / "p").pseudo, ".lock"),
        (ablation.main, [], pseudo_cfg, tmp_path / "p", ".lock-ablation"),
        (eval_seg.main, [], seg_cfg, seg_work / "seg", ".lock"),
    ]  # fmt: skip
    for n, (main, args, cfg, folder, lock_name) in enumerate(cases):
        cfg_file = config_file(cfg, tmp_path / f"cfg{n}.yaml")
        holder = hold_lock(folder, lock_name)
        try:
            assert main(["-c", cfg_file, *args]) == 2, main.__module__
            error_line(capsys.readouterr().err, f"{folder}:", "is already running", f"pid {holder.pid}")
        finally:
            holder.kill()
            holder.wait()


def test_stale_temporaries_are_removed_on_start(trained_cam, toy_root, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(trained_cam, work)
    sdir = RunPaths.from_work_dir(work).cam
    (sdir / STALE_TMP).write_bytes(b"half a checkpoint")
    (sdir / "notes.txt").write_text("kept")
    train_cls.run(tiny_config(work, toy_root), "cam")  # finished: skipped, but cleaned
    assert not (sdir / STALE_TMP).exists() and (sdir / "notes.txt").is_file()
    cfg = new_run(tmp_path / "p")
    make_pseudo.run(cfg)
    scores = RunPaths.from_work_dir(tmp_path / "p").scores
    (scores / ".x.npz.abcdefgh.tmp.npz").write_bytes(b"half")
    make_pseudo.run(cfg)
    assert not (scores / ".x.npz.abcdefgh.tmp.npz").exists()


# -------------------------------------------------------------------- 4. damaged intermediates


def test_export_redoes_damaged_cam_files(toy_root, tmp_path):
    cfg = _config_with_cam_model(tmp_path, toy_root)
    out = export_cams.run(cfg)
    files = sorted(out.glob("*.npz"))
    files[0].write_bytes(b"")
    files[1].write_bytes(files[1].read_bytes()[:60])
    RunPaths.done(out).unlink()
    stamps = {p: p.stat().st_mtime_ns for p in files[2:]}
    export_cams.run(cfg)
    assert is_valid(files[0]) and is_valid(files[1]) and RunPaths.done(out).is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_stage1_damaged_cam_file_says_how_to_redo_it(tmp_path, capsys):
    root = make_toy_dataset(tmp_path / "toy_data", num_train=5, num_val=2, image_size=64)
    work = tmp_path / "work"
    write_cams(work, root)
    paths = RunPaths.from_work_dir(work)
    bad = paths.cam_file(VOCLayout(root).ids("train")[0])
    bad.write_bytes(b"")
    assert train_fcn.main(["-c", config_file(fcn_config(work, root), tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, str(bad), "not a valid CAM file", str(paths.cams / "DONE"), "export_cams")


def test_hand_launched_shard_treats_a_damaged_scores_file_as_missing(tmp_path):
    cfg = new_run(tmp_path / "work")
    make_pseudo.run(cfg, shard=(1, 2))
    make_pseudo.run(cfg, shard=(0, 2))
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    ids = VOCLayout(paths.toy_data).ids("val")
    good = load_scores(paths.scores_file(ids[1]))
    RunPaths.done(paths.pseudo).unlink()
    target = paths.scores_file(ids[1])  # of shard 1/2
    target.write_bytes(target.read_bytes()[:100])
    assert make_pseudo.run(cfg, shard=(0, 2)) == {}  # shard 1's file is not done: left to it
    assert not RunPaths.done(paths.pseudo).exists()
    assert make_pseudo.run(cfg, shard=(1, 2))["select"] == "gt"
    np.testing.assert_array_equal(load_scores(target)["scores"], good["scores"])
    empty = paths.scores_file(ids[0])
    empty.write_bytes(b"")
    RunPaths.done(paths.pseudo).unlink()
    make_pseudo.run(cfg)
    assert load_scores(empty)["scores"].dtype == np.float16


# -------------------------------------------------------------------- 5. dataset folders


def test_dataset_folders_that_are_files(toy_root, tmp_path, capsys):
    a_file = tmp_path / "root.txt"
    a_file.write_text("x")
    cases = [
        ([f"data.root={a_file}", "data.dataset=folder"], "is not a folder (data.root)"),
        ([f"data.root={a_file}", "data.dataset=voc12"], "is not a folder (data.root)"),
        ([f"data.root={a_file}", "data.dataset=toy"], "is not a folder (data.root)"),
        ([f"data.root={toy_root}", "data.dataset=folder", f"data.saliency_dir={a_file}"],
         "is not a folder (data.saliency_dir)"),
    ]  # fmt: skip
    for overrides, message in cases:
        work = tmp_path / "work"
        assert export_cams.main([f"run.work_dir={work}", "run.device=cpu", *overrides]) == 2
        error_line(capsys.readouterr().err, f"{a_file} {message}")
    assert a_file.read_text() == "x"


# -------------------------------------------------------------------- 6. the pipeline across nodes


def _launches(monkeypatch) -> list[list[str]]:
    launched: list[list[str]] = []

    def fake(cmd, check=False):
        launched.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(pipeline.subprocess, "run", fake)
    return launched


def test_multi_node_commands(toy_root, tmp_path, monkeypatch):
    launched = _launches(monkeypatch)
    evaluated = []
    monkeypatch.setattr(ablation, "run", lambda cfg, force=False: evaluated.append(cfg))
    script = (ROOT / "scripts" / "slurm_train_all.sh").read_text()
    flags = ["--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id"]
    assert all(flag in script for flag in flags)  # what the SLURM example passes
    cfg = tiny_config(tmp_path / "work", toy_root)
    cfg_file = config_file(cfg, tmp_path / "cfg.yaml")
    argv = ["-c", cfg_file, "--nproc", "1", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "head:29500",
            "--rdzv-id", "4711", "--steps", "cam,seg,eval"]  # fmt: skip
    assert pipeline.main(argv) == 0
    rdzv = ["--nnodes=2", "--node_rank=1", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_endpoint=head:29500"]
    head = [sys.executable, "-m", "torch.distributed.run", *rdzv]
    assert [c[: len(head)] for c in launched] == [head] * 3  # one process per node: under torchrun all the same
    assert [c[len(head)] for c in launched] == ["--rdzv_id=4711-cam", "--rdzv_id=4711-seg-train_seg",
                                                "--rdzv_id=4711-seg-eval_seg"]  # fmt: skip
    assert [c[len(head) + 1 : c.index("-c")] for c in launched] == [
        ["-m", "sp_cam.train_cls", "cam"], ["-m", "sp_cam.train_seg"], ["-m", "sp_cam.eval_seg"]]  # fmt: skip
    private = Path(launched[0][launched[0].index("-c") + 1])
    assert not private.is_relative_to(tmp_path / "work")
    assert not evaluated and not (tmp_path / "work").exists()  # node 1 writes nothing of its own

    launched.clear()
    assert pipeline.main([*argv[:7], "0", *argv[8:]]) == 0  # node 0
    assert [c[4] for c in launched] == ["--node_rank=0"] * 3
    assert Path(launched[0][launched[0].index("-c") + 1]) == RunPaths.from_work_dir(tmp_path / "work").config
    assert len(evaluated) == 1 and (tmp_path / "work" / "pipeline.log").is_file()

    launched.clear()
    assert pipeline.main(["-c", cfg_file, "--nproc", "2", "--steps", "cam"]) == 0  # one node: standalone, as before
    assert launched[0][3:5] == ["--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1", "--rdzv-id", "1"], "--node-rank 2"),
        (["--nnodes", "0"], "--nnodes must be an integer >= 1"),
        (["--nnodes", "2", "--rdzv-endpoint", "head", "--rdzv-id", "1"], "--rdzv-endpoint must be HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "head:29500"], "--rdzv-id"),
        (["--force", "stage1"], "--force: unknown step"),
    ],
)
def test_bad_launch_options_are_one_line(tmp_path, capsys, args, message):
    assert pipeline.main(["-c", "scripts/configs/toy.yaml", f"run.work_dir={tmp_path / 'w'}", *args]) == 2
    error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "w").exists()


def test_labels_outputs_folders_cover_what_stage3_writes(tmp_path):
    out = RunPaths.from_work_dir(tmp_path).pseudo_outputs
    assert isinstance(out, LabelOutputs)
    assert {out.selection.parent, out.sweep.parent, out.done.parent, out.scores_file("a").parent,
            out.label("a").parent, out.score_map("a").parent} <= set(out.folders)  # fmt: skip
