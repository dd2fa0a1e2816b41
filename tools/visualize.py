"""Render, for chosen ids of a finished run, a row of: image / superpixels / CAM / SP-CAM / pseudo label / GT.

    python -m tools.visualize --work-dir WORK_DIR --ids ID [ID ...] [--out FILE] [--height PX] [-c CONFIG]

* superpixels: the trained FCN's hard superpixels (each pixel joins its argmax PSAM cell) drawn as boundaries;
* CAM: the baseline CAM (step B export of the id if there is one, else the CAM model at the pseudo-label scales), the
  maximum over the image's classes as a heat map over the image;
* SP-CAM: the fused stage-3 scores at the selected t (stored by make_pseudo, else recomputed), same rendering;
* pseudo label / GT: VOC palette colours (GT 255 in the ignore colour).

A panel whose input is missing (no CAM model, no GT mask, id outside the pseudo split) is drawn grey with a note.
The run's config is WORK_DIR/config.yaml unless ``-c`` names one. Default output: WORK_DIR/figures/visualize.png.
numpy, PIL and OpenCV only.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw

from data.classes import label_colormap
from data.label_png import read_label_png
from sp_cam.config import Config, ConfigError, load_config
from sp_cam.io import atomic_write
from sp_cam.paths import RunPaths

COLUMNS = ("image", "superpixels", "CAM", "SP-CAM", "pseudo label", "GT")
PAD = 6  # pixels between panels and around the figure
HEADER = 22  # height of the column-title band
HEAT_ALPHA = 0.55  # weight of the heat map over the image
BOUNDARY_COLOUR = (255, 40, 40)
MISSING_GREY = 200


def _panel_missing(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), MISSING_GREY, dtype=np.uint8)


def boundaries(segments: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W) bool, True where the right or lower neighbour is another segment."""
    edge = np.zeros(segments.shape, dtype=bool)
    edge[:, :-1] |= segments[:, :-1] != segments[:, 1:]
    edge[:-1, :] |= segments[:-1, :] != segments[1:, :]
    return edge


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB and (H, W) scores in [0, 1] -> JET heat map blended over the image."""
    jet = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (HEAT_ALPHA * jet + (1 - HEAT_ALPHA) * image).astype(np.uint8)


def colour_labels(label: np.ndarray) -> np.ndarray:
    return label_colormap()[label.astype(np.int64)]


class RunViews:
    """Loads what a run wrote (and the networks, lazily) to build the panels of one id."""

    def __init__(self, cfg: Config) -> None:
        from sp_cam.open_data import open_dataset

        self.cfg = cfg
        self.paths = RunPaths.from_work_dir(cfg.run.work_dir)
        self.layout = open_dataset(cfg)
        self._fcn = self._cam = None
        sel = self.paths.selection
        self.t = int(json.loads(sel.read_text())["t"]) if sel.is_file() else None

    def fcn(self):
        if self._fcn is None:
            from sp_cam.models import fcn_weights_path, load_frozen_fcn

            self._fcn = load_frozen_fcn(fcn_weights_path(self.cfg), torch.device("cpu"))
        return self._fcn

    def cam_model(self):
        if self._cam is None:
            from sp_cam.models import load_classifier

            path = RunPaths.model(self.paths.cam)
            self._cam = load_classifier(path, "cam") if path.is_file() else False
        return self._cam or None

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        from data.transforms import to_tensor_image

        return to_tensor_image(image)[None]

    def superpixels(self, image: np.ndarray) -> np.ndarray:
        from data.transforms import inference_inputs
        from sp_cam.inference import superpixel_ids

        with torch.no_grad():
            _, fcn_in = inference_inputs(self._image_tensor(image), 1.0, self.cfg.fcn.cell_size)
            q = self.fcn()(fcn_in)
        segs = superpixel_ids(q, image.shape[:2], self.cfg.fcn.cell_size).numpy()
        out = image.copy()
        out[boundaries(segs)] = BOUNDARY_COLOUR
        return out

    def cam_heat(self, image_id: str, image: np.ndarray) -> np.ndarray | None:
        from sp_cam.cam_store import load_cam

        k = self.layout.num_classes
        path = self.paths.cam_file(image_id)
        if path.is_file():
            return load_cam(path, k, image.shape[:2]).max(0)
        model = self.cam_model()
        if model is None:
            return None
        from sp_cam.inference import infer_present

        p = self.cfg.pseudo
        res = infer_present(model, None, self._image_tensor(image), torch.from_numpy(self.layout.label_vector(image_id)),
                            p.scales, p.flip, [0], ("bilinear",), cell_size=self.cfg.fcn.cell_size)  # fmt: skip
        scores = res.scores[("bilinear", 0)]
        return scores.max(0).values.numpy() if scores.shape[0] else np.zeros(image.shape[:2], np.float32)

    def spcam_heat(self, image_id: str) -> np.ndarray | None:
        from sp_cam.score_store import fused_at, load_scores

        path = self.paths.scores_file(image_id)
        if not path.is_file() or self.t is None:
            return None
        arrays = load_scores(path)
        _, fused = fused_at(arrays, self.t)
        size = tuple(int(v) for v in arrays["size"])
        return fused.max(0).values.numpy() if fused.shape[0] else np.zeros(size, np.float32)

    def row(self, image_id: str) -> list[tuple[np.ndarray, str]]:
        """The six panels of an id at full resolution, each with a note ("" when present)."""
        image = self.layout.load_image(image_id)
        h, w = image.shape[:2]
        cam = self.cam_heat(image_id, image)
        sp = self.spcam_heat(image_id)
        png = self.paths.pseudo_label(image_id)
        mask = self.layout.load_mask(image_id)
        return [
            (image, ""),
            (self.superpixels(image), ""),
            (heat_overlay(image, cam), "") if cam is not None else (_panel_missing(h, w), "no CAM"),
            (heat_overlay(image, sp), "") if sp is not None else (_panel_missing(h, w), "no scores"),
            (colour_labels(read_label_png(png)), "") if png.is_file() else (_panel_missing(h, w), "no label"),
            (colour_labels(mask), "") if mask is not None else (_panel_missing(h, w), "no GT"),
        ]


def panel_box(sizes: Sequence[tuple[int, int]], height: int) -> tuple[int, int]:
    """(box height, box width) of every panel: ``height`` tall, as wide as the widest scaled image."""
    return height, max(max(1, round(w * height / h)) for h, w in sizes)


def compose(rows: Sequence[list[tuple[np.ndarray, str]]], height: int) -> np.ndarray:
    """Lay the rows out under a title band: (HEADER + n (box_h + PAD) + PAD, 6 (box_w + PAD) + PAD, 3) uint8."""
    box_h, box_w = panel_box([r[0][0].shape[:2] for r in rows], height)
    canvas = Image.new(
        "RGB", (len(COLUMNS) * (box_w + PAD) + PAD, HEADER + len(rows) * (box_h + PAD) + PAD), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(COLUMNS):
        draw.text((PAD + c * (box_w + PAD) + 2, 5), title, fill=(0, 0, 0))
    for r, panels in enumerate(rows):
        y = HEADER + r * (box_h + PAD)
        for c, (pixels, note) in enumerate(panels):
            h, w = pixels.shape[:2]
            sw = max(1, round(w * box_h / h))
            tile = Image.fromarray(pixels).resize((sw, box_h), Image.NEAREST)
            x = PAD + c * (box_w + PAD)
            canvas.paste(tile, (x, y))
            if note:
                draw.text((x + 4, y + box_h // 2 - 5), note, fill=(60, 60, 60))
    return np.asarray(canvas)


def render(cfg: Config, ids: Sequence[str], height: int = 160) -> np.ndarray:
    """The figure for ``ids`` as an (H, W, 3) uint8 array."""
    if not ids:
        raise ValueError("give at least one id (--ids)")
    if height < 16:
        raise ValueError(f"--height must be at least 16 pixels, got {height}")
    views = RunViews(cfg)
    return compose([views.row(i) for i in ids], height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="the run's work directory")
    parser.add_argument("--ids", type=str, nargs="+", required=True, help="dataset ids, one row each")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default WORK_DIR/figures/visualize.png)")
    parser.add_argument("--height", type=int, default=160, help="panel height in pixels")
    parser.add_argument(
        "-c", "--config", type=Path, default=None, help="the run's config (default WORK_DIR/config.yaml)"
    )
    args = parser.parse_args(argv)
    try:
        config = args.config or RunPaths.from_work_dir(args.work_dir).config
        if not Path(config).is_file():
            raise FileNotFoundError(f"run config not found: {config} (pass -c CONFIG)")
        cfg = load_config(config, [f"run.work_dir={args.work_dir}", "run.device=cpu"])
        figure = render(cfg, args.ids, args.height)
        out = args.out or RunPaths.from_work_dir(args.work_dir).figures / "visualize.png"
        atomic_write(out, lambda tmp: Image.fromarray(figure).save(tmp, format="PNG"))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({figure.shape[1]}x{figure.shape[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
