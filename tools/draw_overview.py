"""Draw the three-stage overview diagram of the README (figures/overview.png) with PIL only.

python -m tools.draw_overview [--out figures/overview.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# (column, row, width in columns, title, lines, fill colour)
BOXES = [
    (0, 0, 1, "images + tags", ["'dog', 'sofa'"], (236, 236, 236)),
    (0, 1, 1, "saliency maps", ["(optional)"], (236, 236, 236)),
    (1, 0, 1, "Stage A", ["CAM baseline", "cls + EPS loss"], (255, 228, 196)),
    (2, 0, 1, "Step B", ["multi-scale CAM", "export (.npz)"], (255, 228, 196)),
    (3, 0, 1, "Stage 1", ["superpixel FCN", "L_p + L_press + L_diff"], (204, 229, 255)),
    (3, 1, 1, "PSAM (B,9,H,W)", ["ASAM (B,25,h,w)", "closed form"], (204, 229, 255)),
    (
        1,
        2,
        2,
        "Stage 2: SP-CAM classifier",
        ["backbone -> CAM logits", "DRM kernels from [x5, E(PSAM)]"],
        (212, 240, 212),
    ),
    (3, 2, 1, "Stage 3", ["multi-scale + flip", "random walk on ASAM", "PSAM upsampling"], (255, 214, 214)),
    (4, 2, 1, "pseudo labels", ["PNG 0..K", "-> DeepLab-V2"], (236, 236, 236)),
]
ARROWS = [((0, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 0), (3, 0)), ((3, 0), (3, 1)), ((0, 1), (1, 0)), ((0, 1), (1, 2)),
          ((3, 1), (1, 2)), ((1, 2), (3, 2)), ((3, 1), (3, 2)), ((3, 2), (4, 2))]  # fmt: skip
CELL_W, CELL_H, PAD = 230, 130, 24


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _box_xy(col: float, row: float, span: int = 1) -> tuple[int, int, int, int]:
    x0, y0 = PAD + col * CELL_W, PAD + row * CELL_H
    return int(x0), int(y0), int(x0 + span * CELL_W - PAD), int(y0 + CELL_H - PAD)


def draw(out: Path) -> None:
    width, height = PAD + 5 * CELL_W, PAD + 3 * CELL_H
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    title, body = _font(17), _font(14)
    centres = {}
    for col, row, span, head, lines, fill in BOXES:
        x0, y0, x1, y1 = _box_xy(col, row, span)
        d.rounded_rectangle((x0, y0, x1, y1), radius=10, fill=fill, outline=(90, 90, 90), width=2)
        d.text((x0 + 10, y0 + 8), head, fill="black", font=title)
        for i, line in enumerate(lines):
            d.text((x0 + 10, y0 + 34 + 20 * i), line, fill=(40, 40, 40), font=body)
        centres[(col, row)] = (x0, y0, x1, y1)
    for a, b in ARROWS:
        ax0, ay0, ax1, ay1 = centres[a]
        bx0, by0, bx1, by1 = centres[b]
        if by0 > ay1:  # downwards
            start = ((ax0 + ax1) // 2, ay1)
            end = (min(max(start[0], bx0 + 20), bx1 - 20), by0)
        elif bx0 > ax1:  # rightwards
            start, end = (ax1, (ay0 + ay1) // 2), (bx0, (by0 + by1) // 2)
        else:  # leftwards
            start, end = (ax0, (ay0 + ay1) // 2), (bx1, (by0 + by1) // 2)
        d.line((start, end), fill=(60, 60, 60), width=3)
        dx, dy = end[0] - start[0], end[1] - start[1]
        norm = max((dx * dx + dy * dy) ** 0.5, 1e-6)
        ux, uy = dx / norm, dy / norm
        tip = [
            end,
            (end[0] - 12 * ux + 6 * uy, end[1] - 12 * uy - 6 * ux),
            (end[0] - 12 * ux - 6 * uy, end[1] - 12 * uy + 6 * ux),
        ]
        d.polygon(tip, fill=(60, 60, 60))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("figures/overview.png"))
    args = parser.parse_args(argv)
    draw(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
