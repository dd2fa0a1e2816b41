"""The guards behind "nothing escapes the work directory, nothing damaged crashes": id checks, the path guard,
stale temporary files, CAM validity, stage locks and DONE fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from data.ids import BadIdError, check_id, path_inside, read_id_list
from sp_cam import cli
from sp_cam.cam_store import is_valid, save_cam
from sp_cam.guard import (
    StageLock,
    StageLockedError,
    StaleOutputError,
    check_done,
    file_digest,
    fingerprint,
    list_digest,
    write_done,
)
from sp_cam.io import atomic_write_text, is_stale_temporary, remove_stale_temporaries
from tests.test_voc_layout import make_voc_fixture

ROOT = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "image_id, problem",
    [
        ("", "is empty"),
        ("a\x00b", "contains a NUL character"),
        ("/outside/abs_x", "is an absolute path"),
        ("\\outside\\abs_x", "is an absolute path"),
        ("C:\\outside\\abs_x", "is an absolute path"),
        ("C:abs_x", "is an absolute path"),
        ("\\\\server\\share\\x", "is an absolute path"),
        ("../../../../../outside/rel_x", "contains a path separator"),
        ("sub/x", "contains a path separator"),
        ("sub\\x", "contains a path separator"),
        ("..", "contains '..'"),
        ("x..", "contains '..'"),
        ("a b", "contains white space"),
        ("a\tb", "contains white space"),
        ("a\u00a0b", "contains white space"),
    ],
)
def test_check_id_refuses(image_id, problem):
    with pytest.raises(BadIdError) as e:
        check_id(image_id, "lists/train.txt", 7)
    assert str(e.value) == f"lists/train.txt:7: id {image_id!r} {problem}; ids are used as file names"


@pytest.mark.parametrize("image_id", ["2007_000032", "COCO_train2014_000000000009", "a.b", "x-1", ".hidden", "é"])
def test_check_id_accepts(image_id):
    assert check_id(image_id, "list.txt", 1) == image_id


def test_read_id_list_names_the_line(tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("a\n\n  \nb extra columns\n/etc/passwd\n")
    with pytest.raises(BadIdError, match=rf"^{lst}:5: id '/etc/passwd' is an absolute path"):
        read_id_list(lst)
    lst.write_text("a\nb\na\n")
    with pytest.raises(BadIdError, match=rf"^{lst}:3: duplicate id 'a' \(first on line 1\)"):
        read_id_list(lst)
    assert read_id_list(lst, unique=False) == ["a", "b"]
    lst.write_text("a\n\nb 1\n")
    assert read_id_list(lst) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_id_list(tmp_path / "nope.txt")


def test_path_inside(tmp_path):
    folder = tmp_path / "work" / "cams"
    assert path_inside(folder, "2007_000032", ".npz") == folder / "2007_000032.npz"
    assert path_inside(folder, "sub/x", ".npz") == folder / "sub" / "x.npz"  # deeper is still inside
    escaping = ["../x", "../../../../../outside/rel_x", f"{tmp_path}/outside/abs_x", "a/../../x", "", "a\x00"]
    for name, suffix in [*((n, ".npz") for n in escaping), ("..", ""), (".", ""), ("a/..", "")]:
        with pytest.raises(BadIdError) as e:
            path_inside(folder, name, suffix)
        msg = str(e.value)
        assert msg.startswith(f"{folder}: name {name!r} ") and "\n" not in msg
    assert path_inside(folder, "..", ".npz") == folder / "...npz"  # a file name, inside
    with pytest.raises(BadIdError, match="outside this folder"):
        path_inside(folder, "/outside/abs_x", ".png")


def test_path_inside_follows_folder_links_not_file_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "labels").symlink_to(outside, target_is_directory=True)  # a work folder kept on another disk: fine
    assert path_inside(work / "labels", "a", ".png") == work / "labels" / "a.png"
    (work / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BadIdError, match="outside this folder"):
        path_inside(work, "escape/a", ".png")  # a link inside the folder leading out of it
    (work / "a.png").symlink_to(outside / "a.png")  # the file itself is replaced as a link, never written through
    assert path_inside(work, "a", ".png") == work / "a.png"


# -------------------------------------------------------------------- stale temporary files


def test_kill_during_atomic_write_leaves_a_temporary_that_is_removed(tmp_path):
    folder = tmp_path / "cam"
    folder.mkdir()
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from sp_cam.io import atomic_write
        def write(tmp):
            tmp.write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write(Path({str(folder / "last.pt")!r}), write)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=False)
    assert res.returncode == -signal.SIGKILL
    left = [p for p in folder.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".last.pt.") and left[0].name.endswith(".tmp.pt")
    keep = {
        "last.pt": "x",
        ".lock": "",
        ".last.pt.abcdefg.tmp.pt": "7 random characters",
        ".last.pt.abcdefgh.tmp.npz": "another suffix",
        ".last.pt.ABCDEFGH.tmp.pt": "upper case",
        "x.tmp": "",
        ".DONE.abcdefgh.tmp.bak": "",
        "notes.last.pt.abcdefgh.tmp.pt": "no leading dot",
    }
    for name, text in keep.items():
        (folder / name).write_text(text)
    (folder / ".best.pt.abcdefgh.tmp.pt").mkdir()  # a folder of that name is not ours
    (folder / ".model.pt.abcdefgh.tmp.pt").symlink_to(folder / "last.pt")  # nor a link
    (folder / ".DONE.zzzzzzzz.tmp").write_text("")  # a DONE marker's temporary file is
    removed = remove_stale_temporaries(folder)
    assert removed == sorted([left[0], folder / ".DONE.zzzzzzzz.tmp"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*keep, ".best.pt.abcdefgh.tmp.pt", ".model.pt.abcdefgh.tmp.pt"]
    )
    assert remove_stale_temporaries(folder) == [] and remove_stale_temporaries(tmp_path / "none") == []


def test_stale_temporary_pattern_is_atomic_writes(tmp_path, monkeypatch):
    import tempfile

    made = []
    real = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    for name in ("a.txt", "DONE", "x.tar.gz", ".hidden", "many.dots.in.name.npz"):
        atomic_write_text(tmp_path / name, "x")
    assert len(made) == 5 and all(is_stale_temporary(p) for p in made)


# -------------------------------------------------------------------- CAM files


def test_cam_is_valid(tmp_path):
    good = tmp_path / "good.npz"
    save_cam(good, np.random.default_rng(0).random((2, 8, 9)), [1, 4])
    assert is_valid(good)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad = {"empty": b"", "truncated": data[: len(data) // 2], "short": data[:-1], "flipped": bytes(flipped)}
    for name, content in bad.items():
        (tmp_path / f"{name}.npz").write_bytes(content)
        assert not is_valid(tmp_path / f"{name}.npz"), name
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    np.savez(tmp_path / "keys.npz", classes=np.array([1], np.int16), cams=np.zeros((1, 2, 2), np.uint8))
    np.savez(
        tmp_path / "shape.npz",
        classes=np.array([1, 2], np.int16),
        cams=np.zeros((1, 2, 2), np.uint8),
        size=np.array([2, 2], np.int32),
    )
    for name in ("array", "keys", "shape", "missing"):
        assert not is_valid(tmp_path / f"{name}.npz"), name


# -------------------------------------------------------------------- stage lock


HOLD = textwrap.dedent(
    """
    import sys, time
    from sp_cam.guard import StageLock
    with StageLock(sys.argv[1], "stage A", command="python -m sp_cam.train_cls cam"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_second_run_of_a_stage_fails_at_once(tmp_path, capsys):
    folder = tmp_path / "cam"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(StageLockedError) as e, StageLock(folder, "stage A"):
            raise AssertionError("ran while another process held the lock")
        assert time.monotonic() - start < 5
        msg = str(e.value)
        assert msg.startswith(f"{folder}: stage A is already running (pid {holder.pid} on {socket.gethostname()}")
        assert "python -m sp_cam.train_cls cam" in msg and "\n" not in msg

        def body() -> None:
            with StageLock(folder, "stage A"):
                pass

        assert cli.run_command(body) == 2
        assert capsys.readouterr().err.count("\n") == 1
    finally:
        holder.kill()
        holder.wait()
    with StageLock(folder, "stage A"):  # the holder was killed: the flock went with it
        record = json.loads((folder / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert set(record) == {"pid", "host", "started", "command"}


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "pseudo"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    record = {"pid": dead_pid, "host": socket.gethostname(), "started": time.time() - 60, "command": "killed run"}
    (folder / ".lock").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="sp_cam.guard"), StageLock(folder, "pseudo labels"):
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    assert any(str(dead_pid) in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    assert (folder / ".lock").read_text() == ""  # released: nobody holds it


def test_lock_is_released_on_exceptions_and_can_be_disabled(tmp_path):
    folder = tmp_path / "fcn"
    with pytest.raises(RuntimeError, match="boom"), StageLock(folder, "stage 1"):
        raise RuntimeError("boom")
    assert (folder / ".lock").read_text() == ""
    with StageLock(folder, "stage 1"), StageLock(tmp_path / "cam", "stage A"):
        pass
    with (
        StageLock(folder, "export", lock_name=".lock-shard-0-of-2"),
        StageLock(folder, "export", lock_name=".lock-shard-1-of-2"),
    ):
        with pytest.raises(StageLockedError), StageLock(folder, "export", lock_name=".lock-shard-1-of-2"):
            pass
    with StageLock(tmp_path / "other", "stage 2", enabled=False):  # rank > 0 under torchrun
        assert not (tmp_path / "other").exists()


def test_lock_in_a_folder_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e, StageLock(tmp_path / "file" / "cam", "stage A"):
        pass
    assert (
        str(e.value)
        == f"cannot write {tmp_path / 'file' / 'cam' / '.lock'}: {tmp_path / 'file'} is a file, not a folder"
    )


# -------------------------------------------------------------------- fingerprints and DONE markers


def test_fingerprint_is_stable(tmp_path):
    a = {"cam": {"lr": 0.1, "epochs": 5, "scales": (1.0, 0.5)}, "weights": "ab12", "root": tmp_path}
    b = {"root": str(tmp_path), "weights": "ab12", "cam": {"scales": [1.0, 0.5], "epochs": 5, "lr": 0.1}}
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64 and fingerprint(a) != fingerprint({**b, "weights": "ab13"})
    code = f"from sp_cam.guard import fingerprint; print(fingerprint({b!r}))"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == fingerprint(a)  # another process (another hash seed) agrees
    with pytest.raises(TypeError, match="object"):
        fingerprint({"x": object()})


def test_file_and_list_digests(tmp_path):
    big = tmp_path / "model.pt"
    data = np.random.default_rng(0).bytes(3 * 2**20 + 17)  # more than one chunk
    big.write_bytes(data)
    assert file_digest(big) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        file_digest(tmp_path / "nope.pt")
    from data.voc_layout import VOCLayout

    layout = VOCLayout(make_voc_fixture(tmp_path / "voc"))
    d = list_digest(layout, "train")
    assert d["root"] == str(layout.root.resolve()) and d["split"] == "train"
    assert d["list_sha256"] == hashlib.sha256(layout.list_file("train").read_bytes()).hexdigest()
    layout.list_file("train").write_text("2007_000001\n")
    assert list_digest(layout, "train")["list_sha256"] != d["list_sha256"]


def test_done_marker_reused_for_the_same_inputs_refused_for_others(tmp_path):
    done = tmp_path / "cam" / "DONE"
    inputs = {"config": {"cam": {"lr": 0.1, "epochs": 5}}, "data": {"split": "train", "list_sha256": "a" * 64}}
    assert check_done(done, inputs) is False
    write_done(done, inputs, {"epochs_run": 5})
    record = json.loads(done.read_text())
    assert record["fingerprint"] == fingerprint(inputs) and record["extra"] == {"epochs_run": 5}
    assert check_done(done, json.loads(json.dumps(inputs))) is True
    changed = {"config": {"cam": {"lr": 0.2, "epochs": 5}}, "data": {"split": "train", "list_sha256": "b" * 64}}
    with pytest.raises(StaleOutputError) as e:
        check_done(done, changed)
    msg = str(e.value)
    assert msg.startswith(f"{done}: cam finished for other inputs (")
    assert "config.cam.lr: 0.1 -> 0.2" in msg
    assert f'data.list_sha256: "{"a" * 36}... -> "{"b" * 36}...' in msg  # long values shortened
    assert msg.endswith("use a new run.work_dir or --force cam") and "\n" not in msg
    with pytest.raises(StaleOutputError, match=r"seed: \(absent\) -> 3.*--force stage_a$"):
        check_done(done, {**inputs, "seed": 3}, stage="stage_a")


def test_old_done_markers_are_reused_with_a_warning(tmp_path, caplog):
    done = tmp_path / "fcn" / "DONE"
    done.parent.mkdir()
    for text in ("stage 1 finished after 12 epochs\n", json.dumps({"t": 3, "th": 0.4, "finished": 1.0}) + "\n", ""):
        done.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sp_cam.guard"):
            assert check_done(done, {"config": {"fcn": {"lr": 1e-4}}}) is True
        assert any("older version" in r.getMessage() and str(done) in r.getMessage() for r in caplog.records)
