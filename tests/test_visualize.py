"""tools/visualize.py on a tiny finished run: layout of the figure and content of its panels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from data.classes import label_colormap
from sp_cam import ablation, make_pseudo
from sp_cam.config import save_config
from sp_cam.open_data import open_dataset
from sp_cam.paths import RunPaths
from tests.test_make_pseudo import new_run
from tools import visualize


def test_figure_layout_and_panels(tmp_path, capsys):
    cfg = new_run(tmp_path / "work", "toy.num_val=2", "pseudo.ablation=false")
    make_pseudo.run(cfg)
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    save_config(cfg, paths.config)
    layout = open_dataset(cfg)
    ids = layout.ids("val") + layout.ids("train")  # the train id has no stage-3 scores or pseudo label
    out = tmp_path / "fig.png"
    assert visualize.main(["--work-dir", str(paths.root), "--ids", *ids, "--out", str(out), "--height", "80"]) == 0
    assert "wrote" in capsys.readouterr().out
    fig = np.asarray(Image.open(out).convert("RGB"))
    box = 80  # toy images are square
    cols, rows = len(visualize.COLUMNS), len(ids)
    assert fig.shape == (visualize.HEADER + rows * (box + visualize.PAD) + visualize.PAD, cols * (box + visualize.PAD)
                         + visualize.PAD, 3)  # fmt: skip

    def panel(r: int, c: int) -> np.ndarray:
        y, x = visualize.HEADER + r * (box + visualize.PAD), visualize.PAD + c * (box + visualize.PAD)
        return fig[y : y + box, x : x + box]

    # GT and pseudo-label panels are the palette colours of the label maps, resized by nearest neighbour
    mask = layout.load_mask(ids[0])
    gt = np.asarray(Image.fromarray(mask).resize((box, box), Image.NEAREST))
    np.testing.assert_array_equal(panel(0, 5), label_colormap()[gt])
    label = np.asarray(Image.open(paths.pseudo_labels / f"{ids[0]}.png").resize((box, box), Image.NEAREST))
    np.testing.assert_array_equal(panel(0, 4), label_colormap()[label])
    # superpixel boundaries are drawn in their colour; the image panel has none of them
    assert (panel(0, 1) == visualize.BOUNDARY_COLOUR).all(-1).sum() > box
    assert not np.array_equal(panel(0, 2), panel(0, 0))  # CAM heat map over the image
    # the train id: no SP-CAM scores, no pseudo label -> grey panels
    assert (panel(2, 3) == visualize.MISSING_GREY).mean() > 0.9
    assert (panel(2, 4) == visualize.MISSING_GREY).mean() > 0.9

    # this run was made with pseudo.ablation=false: the ablation reports the rows it cannot fill as null, with a note
    rows = {r["key"]: r for r in ablation.run(cfg)["ablation"]}
    assert rows["b"]["miou"] is not None and rows["c"]["miou"] is not None
    assert all(rows[k]["miou"] is None and "pseudo.ablation=true" in rows[k]["note"] for k in "adef")


def test_boundaries():
    segs = np.array([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
    np.testing.assert_array_equal(
        visualize.boundaries(segs), [[False, True, False], [True, True, True], [False, False, False]]
    )


def test_missing_config_is_a_clear_error(tmp_path, capsys):
    assert visualize.main(["--work-dir", str(tmp_path), "--ids", "x"]) == 2
    assert "run config not found" in capsys.readouterr().err
