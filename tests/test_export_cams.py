"""Step B: CAM export of the baseline (files, shapes, present classes, resume, shards, bad input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.toy import make_toy_dataset
from data.voc_layout import VOCLayout
from sp_cam import export_cams
from sp_cam.cam_store import load_cam
from sp_cam.config import Config, config_to_dict
from sp_cam.inference import infer_scores
from sp_cam.io import save_checkpoint
from sp_cam.models import build_classifier, load_classifier
from sp_cam.paths import RunPaths
from tests.test_train_cls import TOY_SIZE, TOY_TRAIN, TOY_VAL, tiny_config

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", TOY_TRAIN, TOY_VAL, image_size=TOY_SIZE, seed=0)


def _config_with_cam_model(work: Path, root: Path, *extra: str, model_type: str = "cam") -> Config:
    """A work dir holding a (randomly initialised) baseline in the final-weights format of the classifier stages."""
    cfg = tiny_config(work, root, "export.scales=[0.5,1.0]", *extra)
    torch.manual_seed(0)
    model = build_classifier(cfg.cam, "cam", NUM_CLASSES)
    save_checkpoint(
        RunPaths.model(RunPaths.from_work_dir(work).cam),
        {
            "model_type": model_type,
            "model": model.state_dict(),
            "config": config_to_dict(cfg),
            "num_classes": NUM_CLASSES,
            "backbone": "tiny",
            "metrics": {},
        },
    )
    return cfg


def test_export_stores_present_classes_at_image_size(toy_root, tmp_path):
    cfg = _config_with_cam_model(tmp_path, toy_root)
    out = export_cams.run(cfg)
    layout = VOCLayout(toy_root)
    ids = layout.ids("train")
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(ids)
    assert RunPaths.done(out).is_file()
    model = load_classifier(RunPaths.model(RunPaths.from_work_dir(tmp_path).cam), "cam")
    for image_id in ids[:3]:
        with np.load(out / f"{image_id}.npz", allow_pickle=False) as z:
            assert z["classes"].tolist() == layout.labels(image_id) and z["cams"].dtype == np.uint8
        size = layout.image_size(image_id)
        cams = load_cam(out / f"{image_id}.npz", NUM_CLASSES, expect_size=size)
        assert cams.shape == (NUM_CLASSES, *size)
        absent = [c - 1 for c in range(1, NUM_CLASSES + 1) if c not in layout.labels(image_id)]
        assert np.all(cams[absent] == 0)
        assert np.all(cams.max(axis=(1, 2))[[c - 1 for c in layout.labels(image_id)]] > 0.99)  # make_cam peak
        # the stored maps are the multi-scale + flip scores of the CAM path, quantised to uint8
        from data.transforms import to_tensor_image

        image = to_tensor_image(layout.load_image(image_id))[None]
        ref = infer_scores(model, None, image, torch.from_numpy(layout.label_vector(image_id)), [0.5, 1.0], True, [0])
        assert np.abs(cams - ref[0][1:].numpy()).max() <= 0.5 / 255 + 1e-6


def test_export_is_resumable(toy_root, tmp_path):
    cfg = _config_with_cam_model(tmp_path, toy_root, "export.dtype=float16")
    out = export_cams.run(cfg)
    files = sorted(out.glob("*.npz"))
    files[0].unlink()
    RunPaths.done(out).unlink()
    stamps = {p: p.stat().st_mtime_ns for p in files[1:]}
    export_cams.run(cfg)
    assert files[0].is_file() and RunPaths.done(out).is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing else rewritten
    with np.load(files[0], allow_pickle=False) as z:
        assert z["cams"].dtype == np.float16


def test_shards_partition_the_ids(toy_root, tmp_path):
    cfg = _config_with_cam_model(tmp_path, toy_root)
    ids = VOCLayout(toy_root).ids("train")
    out = export_cams.run(cfg, shard=(1, 3))
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(ids[1::3])
    assert not RunPaths.done(out).exists()
    export_cams.run(cfg, shard=(0, 3))
    assert not RunPaths.done(out).exists()
    export_cams.run(cfg, shard=(2, 3))
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(ids) and RunPaths.done(out).is_file()


def test_export_refuses_an_spcam_checkpoint_and_a_missing_model(toy_root, tmp_path):
    cfg = _config_with_cam_model(tmp_path / "a", toy_root, model_type="spcam")
    with pytest.raises(ValueError, match="holds a 'spcam' model, but a 'cam' model was expected"):
        export_cams.run(cfg)
    with pytest.raises(FileNotFoundError, match="baseline CAM weights not found"):
        export_cams.run(tiny_config(tmp_path / "b", toy_root))


def test_command_line(toy_root, tmp_path, capsys):
    cfg = _config_with_cam_model(tmp_path, toy_root)
    base = [f"run.work_dir={tmp_path}", "run.device=cpu", "data.dataset=folder", f"data.root={toy_root}"]
    assert export_cams.main(["--shard", "3/2", *base]) == 2
    assert "--shard '3/2'" in capsys.readouterr().err
    assert export_cams.main(["--shard", "0/4", *base, "export.scales=[1.0]", "export.flip=false"]) == 0
    ids = VOCLayout(toy_root).ids("train")
    assert sorted(p.stem for p in RunPaths.from_work_dir(cfg.run.work_dir).cams.glob("*.npz")) == sorted(ids[0::4])
