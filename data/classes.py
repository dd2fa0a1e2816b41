"""Class names, the ignore value and the VOC colour map: the one owner of these facts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255  # VOC: object borders and difficult regions in GT masks

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# COCO category ids (instances_*.json) in the order of COCO_CLASSES[1:].
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip


def label_colormap(n: int = 256) -> np.ndarray:
    """The VOC bit-interleaved colour map, (n, 3) uint8; entry 255 is the ignore colour (224, 224, 192)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


_INDEXED_LINE = re.compile(r"^(\d+)[ \t]+(\S.*)$")  # "<index><TAB or spaces><name>"


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """Class names from a ``labels.txt``, background first; the VOC names if the file is absent.

    Two formats, told apart by the first non-blank line:

    * one name per line (``background``, ``aeroplane``, ...), as ``tools/prepare_*.py`` and the toy generator write;
    * ``<index><TAB><name>`` or ``<index> <name>`` lines with indices 0, 1, ..., K in order, as deeplab-pytorch's
      ``labels.txt`` and ``tools/deeplab_handoff.py`` write.

    Names may contain spaces ("traffic light"); blank lines are skipped. A malformed line, a duplicate name or fewer
    than two names is one error naming the file (and the line).
    """
    path = Path(path)
    if not path.is_file():
        return VOC_CLASSES
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the class names ({e})") from None
    lines = [(no, line.strip()) for no, line in enumerate(text.splitlines(), start=1) if line.strip()]
    indexed = bool(lines) and _INDEXED_LINE.match(lines[0][1]) is not None
    names: list[str] = []
    for no, line in lines:
        if not indexed:
            names.append(line)
            continue
        m = _INDEXED_LINE.match(line)
        if m is None or int(m.group(1)) != len(names):
            raise ValueError(
                f"{path}:{no}: expected '{len(names)}<TAB><name>' (indices 0..K in order, as on line "
                f"{lines[0][0]}), got {line!r}"
            )
        names.append(m.group(2).strip())
    if len(names) < 2:
        raise ValueError(f"{path}: expected background plus at least one class name, one per line")
    seen: dict[str, int] = {}
    for (no, _), name in zip(lines, names, strict=True):
        if name in seen:
            raise ValueError(f"{path}:{no}: duplicate class name {name!r} (first on line {seen[name]})")
        seen[name] = no
    return tuple(names)
