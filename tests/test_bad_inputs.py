"""Bad and damaged inputs through the existing entry points: one line naming the file, key or value, exit code 2,
nothing written or deleted outside the work directory, no finished output touched.

The building blocks behind these guarantees (id checks, locks, fingerprints) are tested in test_bad_guards.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.toy import make_toy_dataset
from data.voc_layout import VOCLayout
from net.backbones import read_state_dict
from net.spixel_fcn import build_spixel_fcn
from sp_cam import cli, export_cams, make_pseudo, train_fcn
from sp_cam.cam_store import load_cam, save_cam
from sp_cam.config import ConfigError, save_config
from sp_cam.io import atomic_write_text, load_checkpoint, save_checkpoint
from sp_cam.paths import RunPaths
from sp_cam.runtime import setup_logging
from sp_cam.score_store import has_signature, load_scores, save_scores
from tests.test_export_cams import _config_with_cam_model
from tests.test_make_pseudo import new_run
from tests.test_prepare_tools import make_voc_and_sbd
from tests.test_train_fcn import make_config as fcn_config
from tests.test_train_fcn import write_cams
from tests.test_voc_layout import make_voc_fixture
from tools import prepare_voc12

ROOT = Path(__file__).resolve().parents[1]
TOY_SIZE = 40


def one_line(text: str, *needles: str) -> str:
    """Assert ``text`` is one line (plus its newline) holding every needle; return it stripped."""
    line = text.strip()
    assert line and "\n" not in line, f"expected one line, got:\n{text}"
    assert "Traceback" not in line and "\x1b" not in line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def error_line(stderr: str, *needles: str) -> str:
    """The one ``error: ...`` line that ends a command's stderr (after its log lines and progress bars), checked as
    :func:`one_line`; no traceback anywhere."""
    assert "Traceback" not in stderr and stderr.count("error: ") == 1, f"expected one error line, got:\n{stderr}"
    return one_line(stderr[stderr.index("error: ") :], "error: ", *needles)


def one_line_error(excinfo, *needles: str) -> str:
    return one_line(str(excinfo.value), *needles)


def snapshot(folder: Path, skip_suffixes: tuple[str, ...] = (".log",)) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (log files left out: a refused run still logs)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix not in skip_suffixes
    }


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True, check=False, env=env
    )


# -------------------------------------------------------------------- path escape (issue 1)


def escaping_setup(tmp_path: Path, split: str) -> tuple[Path, Path, list[str], dict[str, str]]:
    """A toy dataset 4 folders below ``tmp_path`` whose ``split`` list also holds ``../../../../../outside/rel_x`` and
    ``<tmp_path>/outside/abs_x``: both have an image and labels (so nothing but the id check stops them), and
    ``outside/abs_x.png`` is a sentinel (also the GT mask and saliency map the absolute id would name)."""
    root = make_toy_dataset(tmp_path / "d1" / "d2" / "d3" / "toy", 2, 2, image_size=TOY_SIZE, seed=0)
    outside = tmp_path / "outside"
    outside.mkdir()
    rng = np.random.default_rng(0)
    bad = ["../../../../../outside/rel_x", f"{outside}/abs_x"]
    for name in ("rel_x", "abs_x"):
        Image.fromarray(rng.integers(0, 256, (TOY_SIZE, TOY_SIZE, 3), dtype=np.uint8)).save(outside / f"{name}.jpg")
    Image.fromarray(np.zeros((TOY_SIZE, TOY_SIZE), np.uint8), mode="L").save(outside / "abs_x.png")
    lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    good = lst.read_text().split()
    lst.write_text("".join(f"{i}\n" for i in good + bad))
    labels = json.loads((root / "cls_labels.json").read_text())
    labels.update({i: [1] for i in bad})
    (root / "cls_labels.json").write_text(json.dumps(labels))
    assert (root / "JPEGImages" / f"{bad[0]}.jpg").resolve() == outside / "rel_x.jpg"
    return root, lst, bad, snapshot(outside)


def test_layout_refuses_ids_that_leave_the_folder(tmp_path):
    root, lst, bad, _ = escaping_setup(tmp_path, "train")
    good = len(lst.read_text().split()) - 2
    with pytest.raises(ValueError) as e:
        VOCLayout(root).ids("train")
    one_line_error(e, f"{lst}:{good + 1}:", repr(bad[0]), "path separator")
    lst.write_text(lst.read_text().replace(bad[0] + "\n", ""))
    with pytest.raises(ValueError) as e:
        VOCLayout(root).ids("train")
    one_line_error(e, f"{lst}:{good + 1}:", repr(bad[1]), "absolute path")


@pytest.mark.parametrize("line", ["..", "a..b", "C:x", "a\\b", "\\\\server\\share\\x", "x\x00y"])
def test_layout_refuses_other_unsafe_ids(tmp_path, line):
    root = make_voc_fixture(tmp_path / "voc")
    lst = root / "ImageSets" / "Segmentation" / "train.txt"
    lst.write_text("2007_000001\n\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        VOCLayout(root).ids("train", check_images=False)
    one_line_error(e, f"{lst}:3:", "ids are used as file names")


def test_layout_names_the_line_of_a_duplicate_id(tmp_path):
    root = make_voc_fixture(tmp_path / "voc")
    lst = root / "ImageSets" / "Segmentation" / "train.txt"
    lst.write_text("2007_000001\n2007_000002\n2007_000001\n")
    with pytest.raises(ValueError) as e:
        VOCLayout(root).ids("train")
    one_line_error(e, f"{lst}:3:", "2007_000001", "line 1")


def test_export_cams_writes_nothing_outside(tmp_path):
    root, lst, bad, outside_before = escaping_setup(tmp_path, "train")
    work = tmp_path / "w1" / "w2" / "w3" / "work"
    cfg = _config_with_cam_model(work, root)
    save_config(cfg, tmp_path / "cfg.yaml")
    work_before = snapshot(work)
    res = run_module("sp_cam.export_cams", "-c", tmp_path / "cfg.yaml")
    assert res.returncode == 2, res.stderr
    error_line(res.stderr, f"{lst}:", "ids are used as file names")
    assert snapshot(tmp_path / "outside") == outside_before  # abs_x.png intact, no rel_x.npz / abs_x.npz
    assert snapshot(work) == work_before  # no CAM file, no DONE
    assert not any(tmp_path.rglob("*.npz"))


def test_make_pseudo_deletes_and_writes_nothing_outside(tmp_path):
    root, lst, bad, outside_before = escaping_setup(tmp_path, "val")
    lst.write_text(lst.read_text().replace(bad[0] + "\n", ""))  # the absolute id: the file it named was deleted
    work = tmp_path / "work"
    cfg = new_run(work, "data.dataset=folder", f"data.root={root}")
    save_config(cfg, tmp_path / "cfg.yaml")
    work_before = snapshot(work)
    res = run_module("sp_cam.make_pseudo", "-c", tmp_path / "cfg.yaml")
    assert res.returncode == 2, res.stderr
    error_line(res.stderr, f"{lst}:", repr(bad[1]), "absolute path")
    assert snapshot(tmp_path / "outside") == outside_before
    assert snapshot(work) == work_before
    assert not RunPaths.from_work_dir(work).pseudo_labels.exists()


def test_prepare_voc12_refuses_ids_that_leave_the_folder(tmp_path, capsys):
    voc, sbd = make_voc_and_sbd(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (6, 4)).save(outside / "rel_x.jpg")  # what VOC2012/JPEGImages/../../outside/rel_x.jpg names
    (sbd / "train.txt").write_text("s1\n../../outside/rel_x\ns2\n")
    before = snapshot(tmp_path)
    assert prepare_voc12.main(["--voc", str(voc), "--sbd", str(sbd)]) == 2
    error_line(capsys.readouterr().err, f"{sbd / 'train.txt'}:2:", "'../../outside/rel_x'")
    assert snapshot(tmp_path) == before  # no train_aug.txt, cls_labels.json or labels.txt written


def test_deeplab_handoff_refuses_an_absolute_id(tmp_path):
    images, pseudo = tmp_path / "data" / "JPEGImages", tmp_path / "work" / "pseudo_labels"
    images.mkdir(parents=True)
    pseudo.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (5, 4)).save(outside / "abs_x.jpg")
    Image.fromarray(np.zeros((4, 5), np.uint8), mode="L").save(outside / "abs_x.png")
    lst = tmp_path / "ids.txt"
    lst.write_text(f"{outside}/abs_x\n")
    before = snapshot(tmp_path)
    res = run_module(
        "tools.deeplab_handoff", "--pseudo", pseudo, "--images", images, "--list", lst, "--out", tmp_path / "o"
    )
    assert res.returncode == 2
    error_line(res.stderr, f"{lst}:1:", "absolute path")
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_deeplab_handoff_non_image_in_images_is_one_line(tmp_path):
    images, pseudo = tmp_path / "data" / "JPEGImages", tmp_path / "work" / "pseudo_labels"
    images.mkdir(parents=True)
    pseudo.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 5), np.uint8), mode="L").save(pseudo / "a.png")
    (images / "a.jpg").write_text("not an image\n")
    res = run_module("tools.deeplab_handoff", "--pseudo", pseudo, "--images", images, "--out", tmp_path / "o")
    assert res.returncode == 2
    error_line(res.stderr, str(images / "a.jpg"))
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------- masks and images (issues 2, 8)


def test_sixteen_bit_gt_mask_refused(tmp_path):
    root = make_voc_fixture(tmp_path / "voc")
    path = root / "SegmentationClass" / "2007_000001.png"
    Image.fromarray(np.ones((24, 32), np.uint16)).save(path)  # values 0..K: read modulo 256 before
    assert Image.open(path).mode.startswith("I")
    with pytest.raises(ValueError) as e:
        VOCLayout(root).load_mask("2007_000001")
    one_line_error(e, str(path), "16-bit")


def test_gt_mask_that_is_not_a_png_refused(tmp_path):
    root = make_voc_fixture(tmp_path / "voc")
    path = root / "SegmentationClass" / "2007_000001.png"
    Image.fromarray(np.zeros((24, 32), np.uint8), mode="L").save(path, format="JPEG")  # lossy: not class indices
    with pytest.raises(ValueError) as e:
        VOCLayout(root).load_mask("2007_000001")
    one_line_error(e, str(path), "JPEG", "expected a PNG")


def test_truncated_gt_mask_is_one_line(tmp_path):
    root = make_voc_fixture(tmp_path / "voc")
    path = root / "SegmentationClass" / "2007_000001.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError) as e:
        VOCLayout(root).load_mask("2007_000001")
    one_line_error(e, str(path))


def test_sixteen_bit_image_saved_as_jpg_refused(tmp_path):
    root = make_voc_fixture(tmp_path / "voc")
    path = root / "JPEGImages" / "2007_000001.jpg"
    Image.fromarray(np.full((24, 32), 1000, np.uint16)).save(path, format="PNG")  # loaded as all 255 before
    with pytest.raises(ValueError) as e:
        VOCLayout(root).load_image("2007_000001")
    one_line_error(e, str(path), "mode I", "8-bit")


def test_sixteen_bit_saliency_refused(tmp_path):
    root = make_voc_fixture(tmp_path / "voc")
    path = root / "saliency_map" / "2007_000001.png"
    Image.fromarray(np.full((24, 32), 1000, np.uint16)).save(path)
    with pytest.raises(ValueError) as e:
        VOCLayout(root, saliency_dir=root / "saliency_map").load_saliency("2007_000001")
    one_line_error(e, str(path), "8-bit")


def test_dataset_root_that_is_a_file(tmp_path):
    (tmp_path / "root.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        VOCLayout(tmp_path / "root.txt")
    one_line_error(e, str(tmp_path / "root.txt"), "not a folder")
    root = make_voc_fixture(tmp_path / "voc")
    with pytest.raises(ValueError) as e:
        VOCLayout(root, saliency_dir=tmp_path / "root.txt")
    one_line_error(e, str(tmp_path / "root.txt"), "not a folder")


# -------------------------------------------------------------------- damaged checkpoints (issue 4)


def damaged_weights(tmp_path: Path, name: str) -> dict[str, Path]:
    """Files named ``<kind>/<name>`` that no safe load accepts, each with the word its message must hold."""
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "step": 1}, good)
    out = {}

    def put(kind: str, data: bytes) -> None:
        p = tmp_path / kind / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[kind] = p

    put("empty", b"")
    put("truncated", good.read_bytes()[: good.stat().st_size // 2])
    put("pickle", pickle.dumps({"model": {"w": [0.0, 0.0]}}))
    put("text", b"hello, this is not a checkpoint\n")
    put("object", b"")
    torch.save({"model": zipfile.ZipInfo("x")}, out["object"])  # a Python object a weights-only load refuses
    return out


WORDS = {"empty": "empty", "truncated": "truncated", "pickle": "pickle", "text": "not a torch.save file",
         "object": "Python objects"}  # fmt: skip


def test_damaged_checkpoint_is_one_line(tmp_path):
    for kind, path in damaged_weights(tmp_path, "last.pt").items():
        with pytest.raises(ValueError) as e:
            load_checkpoint(path)
        one_line_error(e, str(path), "not a loadable checkpoint", WORDS[kind])


def test_damaged_fcn_weights_are_one_line(tmp_path):
    for kind, path in damaged_weights(tmp_path, "fcn.pth").items():
        with pytest.raises(ValueError) as e:
            build_spixel_fcn(path)
        one_line_error(e, str(path), WORDS[kind])


def test_damaged_pretrained_backbone_is_one_line(tmp_path):
    for kind, path in damaged_weights(tmp_path, "resnet50.pth").items():
        with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError) as e:
            warnings.simplefilter("always")
            read_state_dict(path)
        one_line_error(e, str(path), WORDS[kind])
        assert not caught, [str(w.message) for w in caught]  # torch's warnings about a refused file: kept back


def test_export_with_an_empty_model_file_exits_2(tmp_path, capsys):
    root = make_toy_dataset(tmp_path / "toy", 2, 2, image_size=TOY_SIZE, seed=0)
    cfg = _config_with_cam_model(tmp_path / "work", root)
    model = RunPaths.model(RunPaths.from_work_dir(tmp_path / "work").cam)
    model.write_bytes(b"")
    save_config(cfg, tmp_path / "cfg.yaml")
    assert export_cams.main(["-c", str(tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, str(model), "empty")


# -------------------------------------------------------------------- damaged .npz files (issue 4)


def damaged_npz(path: Path, make) -> dict[str, Path]:
    make(path)
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    variants = {"empty": b"", "truncated": data[: len(data) // 2], "one byte short": data[:-1], "flipped": flipped}
    out = {}
    for name, content in variants.items():
        p = path.with_name(f"{name.replace(' ', '_')}{path.suffix}")
        p.write_bytes(bytes(content))
        out[name] = p
    return out


def test_damaged_cam_file_is_one_line(tmp_path):
    def make(p):
        save_cam(p, np.random.default_rng(0).random((2, 30, 40)), [1, 3])

    for path in damaged_npz(tmp_path / "cam.npz", make).values():
        with pytest.raises(ValueError) as e:
            load_cam(path, 5)
        one_line_error(e, str(path), "not a valid CAM file")


def test_damaged_scores_file_is_one_line_and_recomputed(tmp_path):
    def make(p):
        rng = np.random.default_rng(0)
        save_scores(p, {"signature": np.asarray("sig"), "scores": rng.random((2, 1, 30, 40)).astype(np.float16)})

    for name, path in damaged_npz(tmp_path / "s.npz", make).items():
        with pytest.raises(ValueError) as e:
            load_scores(path)
        one_line_error(e, str(path), "not a valid scores file")
        if name != "flipped":  # the signature entry itself is intact there: only a full read sees the damage
            assert has_signature(path, "sig") is False


def test_make_pseudo_resume_recomputes_a_truncated_scores_file(tmp_path):
    cfg = new_run(tmp_path / "work")
    make_pseudo.run(cfg)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    ids = sorted(p.stem for p in paths.scores.glob("*.npz"))
    target = paths.scores_file(ids[1])
    good = load_scores(target)
    RunPaths.done(paths.pseudo).unlink()
    target.write_bytes(target.read_bytes()[:100])  # a kill while copying, a full disk ...
    make_pseudo.run(cfg)
    assert RunPaths.done(paths.pseudo).is_file()
    again = load_scores(target)
    np.testing.assert_array_equal(again["scores"], good["scores"])


def test_stage1_with_a_truncated_cam_file_is_one_line(tmp_path, capsys):
    root = make_toy_dataset(tmp_path / "toy_data", num_train=5, num_val=2, image_size=64)
    work = tmp_path / "work"
    write_cams(work, root)
    bad = RunPaths.from_work_dir(work).cam_file(VOCLayout(root).ids("train")[-1])  # read in a DataLoader worker
    bad.write_bytes(bad.read_bytes()[:50])
    cfg = fcn_config(work, root, "data.num_workers=2")
    save_config(cfg, tmp_path / "cfg.yaml")
    assert train_fcn.main(["-c", str(tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, str(bad), "not a valid CAM file")
    assert not RunPaths.done(RunPaths.from_work_dir(work).fcn).exists()


# -------------------------------------------------------------------- one line, not a traceback (issue 5)


class _Failing(torch.utils.data.Dataset):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        if index == 1:
            raise self.error
        return index


@pytest.mark.parametrize(
    "error, expected",
    [
        (ValueError("x.png: bad"), "error: x.png: bad\n"),
        (FileNotFoundError("image not found: /d/x.jpg"), "error: image not found: /d/x.jpg\n"),
        (ConfigError("data.root: not a folder"), "error: data.root: not a folder\n"),
    ],
)
def test_dataloader_worker_error_is_its_own_line(capsys, error, expected):
    def body() -> None:
        list(torch.utils.data.DataLoader(_Failing(error), num_workers=2, batch_size=None))

    assert cli.run_command(body) == 2
    assert capsys.readouterr().err == expected


def test_stage_with_a_damaged_image_and_workers_is_one_line(tmp_path, capsys):
    root = make_toy_dataset(tmp_path / "toy", 4, 2, image_size=TOY_SIZE, seed=0)
    ids = VOCLayout(root).ids("train")
    image = root / "JPEGImages" / f"{ids[-1]}.jpg"
    image.write_bytes(image.read_bytes()[:100])
    cfg = _config_with_cam_model(tmp_path / "work", root, "data.num_workers=2")
    save_config(cfg, tmp_path / "cfg.yaml")
    assert export_cams.main(["-c", str(tmp_path / "cfg.yaml")]) == 2
    error_line(capsys.readouterr().err, str(image))


def _stage_commands(tmp_path: Path, work: Path) -> list[tuple[str, object, list[str]]]:
    from sp_cam import ablation, pipeline, train_cls

    root = make_toy_dataset(tmp_path / "toy", 2, 2, image_size=TOY_SIZE, seed=0)
    overrides = [f"run.work_dir={work}", "run.device=cpu", "data.dataset=folder", f"data.root={root}"]
    cfg_file = tmp_path / "cfg.yaml"
    atomic_write_text(cfg_file, "run:\n  device: cpu\n")
    return [
        ("train_cls", train_cls.main, ["cam", *overrides]),
        ("train_fcn", train_fcn.main, overrides),
        ("export_cams", export_cams.main, overrides),
        ("make_pseudo", make_pseudo.main, ["-c", str(cfg_file), *overrides]),
        ("ablation", ablation.main, ["-c", str(cfg_file), *overrides]),
        ("pipeline", pipeline.main, ["-c", str(cfg_file), *overrides]),
    ]


def test_every_stage_with_a_work_dir_below_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the work dir's parent should be\n")
    work = blocker / "work"
    for name, main, argv in _stage_commands(tmp_path, work):
        assert main(argv) == 2, name
        err = error_line(capsys.readouterr().err, str(work))
        assert "cannot write" in err or "not found" in err, (name, err)
        if name != "ablation":  # the evaluation opens no log: it stops at the missing selection
            assert f"{blocker} is a file, not a folder" in err, (name, err)
    assert blocker.read_text().startswith("a file")


def test_log_file_without_permission_is_one_line(tmp_path, monkeypatch, capsys):
    log_file = tmp_path / "work" / "cam" / "train.log"

    def refuse(self, filename, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(filename))

    monkeypatch.setattr(logging.FileHandler, "__init__", refuse)
    assert cli.run_command(lambda: setup_logging("INFO", log_file)) == 2
    assert capsys.readouterr().err == f"error: cannot write {log_file}: Permission denied\n"


def test_read_only_file_system_when_writing_is_one_line(tmp_path, monkeypatch, capsys):
    target = tmp_path / "work" / "cams" / "a.npz"

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(target.parent))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    assert cli.run_command(lambda: save_cam(target, np.zeros((1, 2, 2)), [1])) == 2
    assert capsys.readouterr().err == f"error: cannot write {target}: Read-only file system\n"
    assert not target.exists()


def test_other_os_errors_naming_a_file_are_one_line(capsys):
    def body() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/x/cam")

    assert cli.run_command(body) == 2
    assert capsys.readouterr().err == "error: cannot write /runs/x/cam: Permission denied\n"

    def bug() -> None:
        raise OSError("no file named: a bug keeps its traceback")

    with pytest.raises(OSError):
        cli.run_command(bug)


def test_checkpoint_write_to_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "cam" / "last.pt"
    save_checkpoint(path, {"step": 1})

    real_save = torch.save

    class FullDisk:  # the file torch.save writes to: the disk fills up after a few bytes
        def __init__(self, f) -> None:
            self.f, self.written = f, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def full(obj, f, *args, **kwargs):
        real_save(obj, FullDisk(f), *args, **kwargs)  # torch raises a RuntimeError from the OSError

    monkeypatch.setattr(torch, "save", full)
    assert cli.run_command(lambda: save_checkpoint(path, {"step": 2})) == 2
    assert capsys.readouterr().err == f"error: cannot write {path}: No space left on device\n"
    assert load_checkpoint(path) == {"step": 1}  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # and no temporary file is left
