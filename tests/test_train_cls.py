"""Stage A / stage 2 training loop: outputs, resume, gradient accumulation, bad input (CPU, tiny backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.toy import make_toy_dataset
from sp_cam import train_cls
from sp_cam.config import Config, load_config, save_config
from sp_cam.io import load_checkpoint, save_checkpoint
from sp_cam.models import load_classifier, load_frozen_fcn
from sp_cam.paths import RunPaths
from sp_cam.runtime import rng_state, set_rng_state

TOY_TRAIN, TOY_VAL, TOY_SIZE = 8, 4, 64


def tiny_config(work: Path, root: Path, *extra: str) -> Config:
    """A config that trains in about a second: tiny backbone, 32-px crops, 2 steps per epoch."""
    overrides = [
        f"run.work_dir={work}",
        "run.device=cpu",
        "data.dataset=folder",
        f"data.root={root}",
        "data.crop_size=32",
        "data.resize_long_min=32",
        "data.resize_long_max=64",
        "data.num_workers=0",
    ]
    for section in ("cam", "spcam"):
        overrides += [
            f"{section}.backbone=tiny",
            f"{section}.batch_size=4",
            f"{section}.epochs=2",
            f"{section}.eval_max_images=2",
            f"{section}.eval_t=[0,2]",
            f"{section}.drm_encoder_widths=[4,4,4,4,4]",
            f"{section}.drm_head_widths=[8]",
            f"{section}.drm_head_lr_mult=10",
        ]
    return load_config(None, overrides + list(extra))


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", TOY_TRAIN, TOY_VAL, image_size=TOY_SIZE, seed=0)


@pytest.fixture(scope="module")
def trained_cam(toy_root, tmp_path_factory) -> Config:
    cfg = tiny_config(tmp_path_factory.mktemp("work"), toy_root)
    train_cls.run(cfg, "cam")
    return cfg


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_cam_training_writes_final_weights_metrics_and_done(trained_cam):
    sdir = RunPaths.from_work_dir(trained_cam.run.work_dir).cam
    final = load_checkpoint(RunPaths.model(sdir))
    assert final["model_type"] == "cam" and final["num_classes"] == 5 and final["backbone"] == "tiny"
    assert set(final["metrics"]) >= {"epoch", "miou", "map", "t", "th"}
    assert RunPaths.done(sdir).is_file() and RunPaths.last_checkpoint(sdir).is_file()
    records = [json.loads(line) for line in (sdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 <= r["eval_miou"] <= 100 and 0 <= r["eval_map"] <= 100 for r in epochs)
    last = load_checkpoint(RunPaths.last_checkpoint(sdir))
    assert last["epoch"] == 2 and last["step"] == 4  # 8 images / batch 4 = 2 steps per epoch
    assert {"model", "optimizer", "scheduler", "rng", "config", "best"} <= set(last)
    # GT selection: the final weights are those of the best evaluated epoch
    best = load_checkpoint(RunPaths.best_checkpoint(sdir))
    assert final["metrics"]["epoch"] == best["metrics"]["epoch"]
    assert _max_diff(final["model"], best["model"]) == 0.0
    model = load_classifier(RunPaths.model(sdir), "cam")
    assert model.num_classes == 5 and not model.training


def test_finished_stage_is_skipped(trained_cam):
    final = RunPaths.model(RunPaths.from_work_dir(trained_cam.run.work_dir).cam)
    before = final.stat().st_mtime_ns
    assert train_cls.run(trained_cam, "cam") == final
    assert final.stat().st_mtime_ns == before


def test_checkpoint_of_the_other_model_type_is_refused(trained_cam):
    final = RunPaths.model(RunPaths.from_work_dir(trained_cam.run.work_dir).cam)
    with pytest.raises(ValueError, match=r"holds a 'cam' model, but a 'spcam' model was expected"):
        load_classifier(final, "spcam")


def test_resume_after_a_crash_equals_an_uninterrupted_run(toy_root, tmp_path, monkeypatch):
    extra = ("cam.epochs=3", "cam.eval_every=0", "cam.select=last", "cam.momentum=intended", "cam.lr=0.05")
    ref = tiny_config(tmp_path / "ref", toy_root, *extra)
    train_cls.run(ref, "cam")

    cfg = tiny_config(tmp_path / "crash", toy_root, *extra)
    original = train_cls.compute_loss
    calls = {"epoch 2": 0}

    def killed_in_epoch_2(model, fcn, batch, ccfg, ctx, *args):
        if ctx.epoch == 1:
            calls["epoch 2"] += 1
            if calls["epoch 2"] == 2:  # after the first step of epoch 2
                raise KeyboardInterrupt("killed")
        return original(model, fcn, batch, ccfg, ctx, *args)

    monkeypatch.setattr(train_cls, "compute_loss", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_cls.run(cfg, "cam")
    sdir = RunPaths.from_work_dir(cfg.run.work_dir).cam
    assert load_checkpoint(RunPaths.last_checkpoint(sdir))["epoch"] == 1
    assert not RunPaths.model(sdir).exists()

    monkeypatch.setattr(train_cls, "compute_loss", original)
    train_cls.run(cfg, "cam")  # a new call finds last.pt and continues
    resumed = _weights(RunPaths.model(sdir))
    uninterrupted = _weights(RunPaths.model(RunPaths.from_work_dir(ref.run.work_dir).cam))
    assert _max_diff(resumed, uninterrupted) == 0.0


def test_gradient_accumulation_matches_the_full_batch(toy_root, tmp_path):
    extra = ("cam.epochs=1", "cam.eval_every=0", "cam.select=last", "cam.lr=0.1")
    full = tiny_config(tmp_path / "full", toy_root, *extra, "cam.grad_accum=1")
    accum = tiny_config(tmp_path / "accum", toy_root, *extra, "cam.grad_accum=2")
    half = tiny_config(tmp_path / "half", toy_root, *extra, "cam.batch_size=2")
    for cfg in (full, accum, half):
        train_cls.run(cfg, "cam")
    w = {
        name: _weights(RunPaths.model(RunPaths.from_work_dir(c.run.work_dir).cam))
        for name, c in (("full", full), ("accum", accum), ("half", half))
    }
    assert _max_diff(w["full"], w["accum"]) < 1e-5  # batch 4 x accum 1 == micro-batch 2 x accum 2 (frozen BN)
    assert _max_diff(w["full"], w["half"]) > 1e-3  # while a real batch of 2 trains differently


def test_batch_not_divisible_by_accumulation_is_an_error(toy_root, tmp_path):
    cfg = tiny_config(tmp_path, toy_root, "cam.grad_accum=3")
    with pytest.raises(ValueError, match=r"cam.batch_size=4 .* divisible by .* 3"):
        train_cls.run(cfg, "cam")


def test_spcam_trains_with_a_frozen_fcn(toy_root, tmp_path):
    from net.spixel_fcn import build_spixel_fcn

    fcn_file = tmp_path / "fcn.pt"
    save_checkpoint(fcn_file, {"model": build_spixel_fcn("").state_dict(), "epoch": 0})
    cfg = tiny_config(tmp_path / "work", toy_root, f"fcn.weights={fcn_file}", "spcam.epochs=1")
    final = train_cls.run(cfg, "spcam")
    state = load_checkpoint(final)
    assert state["model_type"] == "spcam" and any(k.startswith("get_tran_conv") for k in state["model"])
    assert set(state["metrics"]) >= {"miou", "map", "t", "th"} and state["metrics"]["t"] in (0, 2)
    fcn = load_frozen_fcn(fcn_file, torch.device("cpu"))
    assert not fcn.training and not any(p.requires_grad for p in fcn.parameters())
    with pytest.raises(ValueError, match="'spcam' model, but a 'cam' model"):
        load_classifier(final, "cam")


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(toy_root, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, toy_root, "cam.eval_every=0", "cam.select=last")
    original = train_cls.compute_loss

    def nan_in_epoch_2(model, fcn, batch, ccfg, ctx, *args):
        loss, parts = original(model, fcn, batch, ccfg, ctx, *args)
        return (loss * float("nan") if ctx.epoch == 1 else loss), parts

    monkeypatch.setattr(train_cls, "compute_loss", nan_in_epoch_2)
    sdir = RunPaths.from_work_dir(cfg.run.work_dir).cam
    with pytest.raises(train_cls.TrainingDivergedError, match=r"non-finite loss .* epoch 2, step 1/2"):
        train_cls.run(cfg, "cam")
    last = load_checkpoint(RunPaths.last_checkpoint(sdir))
    assert last["epoch"] == 1 and last["step"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not RunPaths.model(sdir).exists() and not RunPaths.done(sdir).exists()


def test_image_without_positive_class_is_named(toy_root, tmp_path):
    import shutil

    root = tmp_path / "toy"
    shutil.copytree(toy_root, root)
    labels_file = root / "cls_labels.json"
    labels = json.loads(labels_file.read_text())
    first = sorted(labels)[0]
    labels[first] = []
    labels_file.write_text(json.dumps(labels))
    with pytest.raises(ValueError, match=rf"no positive class, e.g. \['{first}'\]"):
        train_cls.run(tiny_config(tmp_path / "work", root), "cam")


def test_batch_label_checks():
    ok = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    train_cls.check_batch_labels(["a", "b"], ok, 3)
    with pytest.raises(ValueError, match="image 'b' has no positive class"):
        train_cls.check_batch_labels(["a", "b"], torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), 3)
    with pytest.raises(ValueError, match="do not fit a model of 2 foreground classes"):
        train_cls.check_batch_labels(["a", "b"], ok, 2)  # class 3 is beyond the model's classes


def test_average_precision_by_hand():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2]])
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    ap = train_cls.average_precision(scores, labels)
    assert ap[0] == pytest.approx((1 / 1 + 2 / 3) / 2) and np.isnan(ap[1])
    assert train_cls.mean_average_precision(scores, labels) == pytest.approx((100 * 5 / 6, 100 * 2 / 3))
    perfect = train_cls.average_precision(np.array([[3.0], [2.0], [1.0]]), np.array([[1], [1], [0]]))
    assert perfect[0] == 1.0


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    import random

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_command_line(trained_cam, tmp_path, capsys):
    save_config(trained_cam, tmp_path / "cfg.yaml")
    assert train_cls.main(["cam", "-c", str(tmp_path / "cfg.yaml")]) == 0  # finished for this config: skipped
    assert train_cls.main(["cam", "cam.no_such_key=1"]) == 2
    assert "unknown key 'cam.no_such_key'" in capsys.readouterr().err
    # the documented order: model type, then -c FILE, then overrides
    assert (
        train_cls.main(
            ["cam", "-c", str(Path(__file__).resolve().parents[1] / "scripts/configs/toy.yaml"), "cam.no_such_key=1"]
        )
        == 2
    )
    assert "unknown key 'cam.no_such_key'" in capsys.readouterr().err


def test_labels_only_mode_and_cpu_fallbacks(toy_root, tmp_path, caplog):
    cfg = tiny_config(
        tmp_path,
        toy_root,
        "data.saliency_dir=none",
        "cam.epochs=1",
        "cam.eval_every=0",
        "cam.select=last",
        "cam.amp=bf16",
        "cam.tensorboard=true",
    )
    with caplog.at_level("INFO"):
        train_cls.run(cfg, "cam")
    sdir = RunPaths.from_work_dir(cfg.run.work_dir).cam
    records = [json.loads(line) for line in (sdir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["loss_sal"] == 0.0 and r["loss"] == r["loss_cls"] for r in records)
    assert "labels-only mode" in caplog.text and "cam.amp=bf16 is for CUDA only" in caplog.text
    assert RunPaths.tensorboard(sdir).is_dir() or "tensorboard package is not installed" in caplog.text


def test_in_training_map_reuses_the_scale_1_pass(trained_cam):
    """The mAP of the evaluation comes from the pseudo-label pass's own logits: the same as a separate forward."""
    from data.datasets import EvalDataset
    from sp_cam.open_data import open_dataset

    cfg = trained_cam
    model = load_classifier(RunPaths.model(RunPaths.from_work_dir(cfg.run.work_dir).cam), "cam")
    dataset = EvalDataset(open_dataset(cfg), cfg.data.eval_split)
    result = train_cls.evaluate(model, None, dataset, cfg.cam, "cam", cfg.fcn.cell_size)
    n = result["images"]
    scores = np.stack([train_cls.classification_score(model, None, dataset[i]["image"][None], 16) for i in range(n)])
    labels = np.stack([np.asarray(dataset[i]["label"]) for i in range(n)])
    assert result["map"] == train_cls.mean_average_precision(scores, labels)[0]


def test_weak_checkpoint_messages_name_what_is_wrong(trained_cam, tmp_path):
    """A checkpoint without a stage entry says so (not 'stage None'); a weights mismatch names the keys."""
    sdir = RunPaths.from_work_dir(trained_cam.run.work_dir).cam
    state = load_checkpoint(RunPaths.model(sdir))
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("classifier")}
    save_checkpoint(tmp_path / "broken.pt", state)
    with pytest.raises(
        ValueError, match=r"weights do not fit the cam model \(Missing key\(s\) in state_dict: .classifier"
    ):
        load_classifier(tmp_path / "broken.pt", "cam")
    cfg = tiny_config(tmp_path / "w", Path(trained_cam.data.root))
    last = RunPaths.last_checkpoint(RunPaths.from_work_dir(cfg.run.work_dir).cam)
    save_checkpoint(last, {"model": {}, "epoch": 1})
    with pytest.raises(ValueError, match=r"last.pt: not a training checkpoint \(no 'stage' entry\), not of 'cam'"):
        train_cls.run(cfg, "cam")
