"""sp_cam/io.py: atomic writes, label PNGs, safe checkpoints, JSON lines."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.classes import label_colormap
from data.label_png import read_label_png
from sp_cam.io import (
    append_jsonl,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    write_label_png,
)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temp file left
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": [1, 2]}


def test_label_png_round_trip(tmp_path):
    label = np.array([[0, 1, 20], [255, 3, 0]], np.uint8)
    write_label_png(tmp_path / "l.png", label)
    img = Image.open(tmp_path / "l.png")
    assert img.mode == "P"
    palette = np.asarray(img.getpalette()[: 256 * 3]).reshape(256, 3)
    np.testing.assert_array_equal(palette, label_colormap())
    assert tuple(palette[15]) == (192, 128, 128)  # VOC person colour
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), label)
    Image.fromarray(label, mode="L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "g.png"), label)


def test_label_png_errors(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        write_label_png(tmp_path / "x.png", np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="0..254"):
        write_label_png(tmp_path / "x.png", np.array([[-1, 0]]))
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png"):
        read_label_png(tmp_path / "rgb.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_label_png(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        read_label_png(tmp_path / "bad.png")


class _Evil:
    pass


def test_checkpoint_round_trip_and_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 7, "config": {"run": {"seed": 0}}, "names": ["a"]}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["step"] == 7 and back["names"] == ["a"]
    save_checkpoint(tmp_path / "other" / "d.pt", state)  # same state, other path: same bytes
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600
    assert (tmp_path / "other" / "d.pt").read_bytes() == (tmp_path / "c.pt").read_bytes()
    torch.save({"obj": _Evil()}, tmp_path / "evil.pt")  # an arbitrary object needs unpickling: refused
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="none.pt"):
        load_checkpoint(tmp_path / "none.pt")


def test_append_jsonl(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    append_jsonl(path, {"epoch": 0, "miou": 1.5})
    append_jsonl(path, {"epoch": 1})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": 0, "miou": 1.5}, {"epoch": 1}]


def test_atomic_write_flushes_file_before_rename_and_folder_after(tmp_path, monkeypatch):
    """Durable across a power cut: the data reach the disk before the new name does, and the name after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "cam" / "last.pt"
    save_checkpoint(path, {"step": 1})
    (kind, tmp_name), (rkind, src, dst), (dkind, folder) = events
    assert (kind, rkind, dkind) == ("fsync", "replace", "fsync")
    assert tmp_name == src and Path(src).parent == path.parent and dst == str(path)
    assert folder == str(path.parent)
    assert load_checkpoint(path) == {"step": 1}


def test_folder_flush_is_best_effort(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 1:  # the folder: some file systems refuse it
            refuse(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x" and len(calls) == 2
