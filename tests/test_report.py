"""tools/report.py on a small fake work dir: every plot embedded and written, missing inputs noted, resumes applied."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

from tools import report

IMG_TAG = '<img src="data:image/png;base64,'
CLASSES = ["background", "square", "disc", "triangle", "ring"]


def write_jsonl(path: Path, lines: list[dict | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def cam_log() -> list[dict | str]:
    """Stage A, 2 steps per epoch. The first run crashes in epoch 3 after logging it (99s: stale values) with a
    half-written line; the resumed run restarts after epoch 2 and logs epoch 3 again."""

    def train(epoch: int, step: int, loss: float) -> dict:
        return {"kind": "train", "epoch": epoch, "step": step, "loss": loss, "loss_cls": loss * 0.9,
                "loss_sal": 0.05, "lr": 1e-3 * (1 - step / 7), "images_per_s": 10.0 + step}  # fmt: skip

    def epoch(e: int, miou: float) -> dict:
        pairs = {f"t=0,th={th}": miou - abs(th - 0.5) * 10 for th in (0.4, 0.5, 0.6)}
        return {"kind": "epoch", "epoch": e, "step": 2 * e, "loss": 0.5, "eval_miou": miou, "eval_fg_miou": miou / 2,
                "eval_t": 0, "eval_th": 0.5, "eval_pairs": pairs, "eval_map": 50 + e, "eval_map_chance": 34.0,
                "eval_images": 8}  # fmt: skip

    return [
        train(1, 1, 0.9), train(1, 2, 0.8), epoch(1, 20.0),
        train(2, 3, 0.7), train(2, 4, 0.6), epoch(2, 25.0),
        train(3, 5, 99.0), train(3, 6, 99.0), epoch(3, 99.0), '{"kind": "train", "epo',
        {"kind": "resume", "epoch": 2, "step": 4},
        train(3, 5, 0.5), train(3, 6, 0.45), epoch(3, 30.0),
    ]  # fmt: skip


def fcn_log() -> list[dict]:
    lines: list[dict] = [{"kind": "eval", "epoch": 0, "step": 0, "eval_miou": 15.0, "eval_fg_miou": 0.0}]
    for step in range(1, 9):
        aff = step > 5
        lines.append({"kind": "train", "epoch": (step + 1) // 2, "step": step, "affinity": aff, "sem": 8000.0 / step,
                      "pos": 70.0 - step, "recon": 40.0 - step, "press": 0.5 if aff else 0.0, "diff": 0.0,
                      "total": 40.0 - step + (0.5 if aff else 0.0)})  # fmt: skip
        if step % 2 == 0:
            lines.append({"kind": "epoch", "epoch": step // 2, "step": step, "loss": 30.0, "eval_miou": 15.0 + step,
                          "eval_fg_miou": 2.0 * step, "eval_images": 8})  # fmt: skip
    return lines


def fake_run(root: Path) -> Path:
    """A work dir with two stage logs, a sweep and a metrics.json with per_class and ablation; no config, no models."""
    write_jsonl(root / "cam" / "metrics.jsonl", cam_log())
    (root / "cam" / "DONE").write_text("cam finished after 3 epochs\n")
    write_jsonl(root / "fcn" / "metrics.jsonl", fcn_log())
    pairs = [{"t": t, "th": th, "miou": 30 + t - 20 * abs(th - 0.5), "fg_miou": None if t == 10 else 20.0 + t}
             for t in (0, 5, 10) for th in (0.4, 0.5, 0.6)]  # fmt: skip
    (root / "pseudo").mkdir(parents=True)
    (root / "pseudo" / "sweep.json").write_text(json.dumps({"split": "train", "num_gt_images": 8, "pairs": pairs}))
    ablation = [
        {"key": "a", "name": "baseline CAM", "upsample": "bilinear", "t": None, "th": 0.4, "miou": 26.5, "note": "",
         "final": False},
        {"key": "b", "name": "SP-CAM, no random walk", "upsample": "psam", "t": 0, "th": 0.5, "miou": 30.0, "note": "",
         "final": False},
        {"key": "c", "name": "SP-CAM + random walk", "upsample": "psam", "t": 5, "th": 0.5, "miou": 35.0, "note": "",
         "final": True},
        {"key": "d", "name": "SP-CAM + random walk", "upsample": "bilinear", "t": 5, "th": None, "miou": None,
         "note": "not computed: run make_pseudo with pseudo.ablation=true", "final": False},
    ]  # fmt: skip
    per_class = {
        "class_names": CLASSES,
        "rows": {"seg": [80.0, 40.0, None, 30.0, 20.0], "cam": [70.0, 20.0, 25.0, 10.0, 5.0],
                 "spcam": [75.0, 35.0, 30.0, 20.0, 15.0]},
    }  # fmt: skip
    metrics = {"miou": 35.0, "fg_miou": 24.0, "cam_miou": 26.5, "cam_th": 0.4, "t": 5, "th": 0.5, "select": "gt",
               "split": "train", "num_images": 8, "num_gt_images": 8, "upsample": "psam", "ablation": ablation,
               "per_class": per_class}  # fmt: skip
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(re.escape(IMG_TAG) + r"([A-Za-z0-9+/=]+)\"", page)]


def test_report_of_a_fake_run(tmp_path, capsys):
    root = fake_run(tmp_path / "work")
    assert report.main([str(root)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = (root / "report.html").read_text()
    pngs = {p.stem: p.read_bytes() for p in (root / "report").glob("*.png")}
    assert set(pngs) == {"cam_train", "cam_eval", "fcn_train", "fcn_eval", "sweep", "per_class", "ablation"}
    # one embedded image per plot, the same bytes as the file beside the page; nothing loaded from elsewhere
    assert page.count(IMG_TAG) == len(pngs)
    assert sorted(embedded_pngs(page)) == sorted(pngs.values())
    assert not re.search(r"(src|href)=\"(https?:|//)|<script|<link", page)
    for name, data in pngs.items():
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert image.shape[0] > 100 and image.shape[1] > 200, name
        assert image.std() > 0, name
    # the selected pair (t=5, th=0.5) is outlined in pure red; nothing else in the viridis map is
    sweep = np.asarray(Image.open(io.BytesIO(pngs["sweep"])).convert("RGB")).astype(int)
    assert ((sweep[..., 0] > 240) & (sweep[..., 1] < 20) & (sweep[..., 2] < 20)).sum() > 50
    assert "selected t=5, th=0.5 (red box)" in page
    # missing inputs: one note each
    for text in [
        "stage 2: SP-CAM: skipped, no spcam/metrics.jsonl",
        "stage 4: segmentation network: skipped, no seg/metrics.jsonl",
        "config: skipped, no config.yaml",
        "example figure: skipped, no config.yaml",
        "figures: none (no figures/*.png)",
    ]:
        assert f'<p class="note">{text}' in page, text
    assert "cam/metrics.jsonl: skipped 1 unreadable line(s)" in page
    assert "resumed 1x" in page and "cam finished after 3 epochs" in page
    # headline numbers and the ablation table (final row marked, null shown as "-")
    assert "35.00" in page and "8.50" in page  # miou, and SP-CAM - CAM
    assert '<tr class="final"><td>c</td><td>SP-CAM + random walk (final)</td>' in page


def test_resume_drops_what_the_interrupted_run_logged(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, cam_log())
    slog = report.read_stage_log(path)
    assert [r["step"] for r in slog.train] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in slog.train[4:]] == [0.5, 0.45]
    assert list(slog.evals) == [1, 2, 3] and slog.evals[3]["eval_miou"] == 30.0
    assert len(slog.resumes) == 1 and slog.bad_lines == 1


def test_unknown_stages_are_included(tmp_path):
    for stage in ("distill", "fcn", "aux"):
        write_jsonl(tmp_path / stage / "metrics.jsonl", [])
    (tmp_path / "cams").mkdir()  # a folder without a log is no stage
    assert report.stage_names(tmp_path) == ["cam", "fcn", "spcam", "seg", "aux", "distill"]


def test_examples_section_renders_or_notes(tmp_path, monkeypatch):
    root = tmp_path / "work"
    (root / "pseudo_labels").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "pseudo_labels" / f"train_{i:05d}.png")
    (root / "figures").mkdir()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(root / "figures" / "toy.png")
    (root / "config.yaml").write_text("data:\n  dataset: toy\n")
    calls = []
    figure = np.tile(np.arange(64, dtype=np.uint8)[:, None, None], (1, 96, 3))

    def render(cfg, ids, height=160):
        calls.append((cfg.run.work_dir, cfg.run.device, list(ids), height))
        return figure

    fake = types.ModuleType("tools.visualize")
    fake.render = render
    monkeypatch.setitem(sys.modules, "tools.visualize", fake)
    assert report.main([str(root), "--height", "90"]) == 0
    assert calls == [(str(root), "cpu", [f"train_{i:05d}" for i in range(4)], 90)]
    page = (root / "report.html").read_text()
    np.testing.assert_array_equal(np.asarray(Image.open(root / "report" / "examples.png")), figure)
    assert page.count(IMG_TAG) == 2  # the example figure and figures/toy.png
    assert "<td>dataset</td><td>toy</td>" in page  # from config.yaml
    assert "stage A: CAM baseline: skipped, no cam/metrics.jsonl" in page
    assert "sweep: skipped, sweep.json not found" in page
    assert "headline numbers: skipped, metrics.json not found" in page

    def broken(cfg, ids, height=160):
        raise FileNotFoundError(f"checkpoint not found: {root}/fcn/model.pt")

    fake.render = broken
    out = tmp_path / "elsewhere" / "run.html"
    assert report.main([str(root), "--out", str(out), "--ids", "train_00005"]) == 0
    page = out.read_text()
    assert f"example figure: skipped, FileNotFoundError: checkpoint not found: {root}/fcn/model.pt" in page
    assert page.count(IMG_TAG) == 1 and not (out.parent / "run" / "examples.png").exists()


def test_missing_work_dir(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: work directory not found: {tmp_path / 'nope'}\n"
