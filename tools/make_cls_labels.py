"""Build ``cls_labels.json`` ({id: [foreground class indices]}) from VOC XML annotations or from segmentation masks.

    python -m tools.make_cls_labels --root ROOT --source xml   [--annotations DIR] [--list FILE ...] [--out FILE]
    python -m tools.make_cls_labels --root ROOT --source masks [--masks DIR] [--list FILE ...] [--out FILE]

Class names come from ``ROOT/labels.txt`` (the 21 VOC names when absent) or ``--class-names``. From XML every
``<object><name>`` counts (difficult and truncated objects included, as IRN / PuzzleCAM do); from masks every value
1..K present (255 and 0 are not classes).
"""

import argparse
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from data.classes import IGNORE_INDEX, read_class_names
from data.label_png import read_label_png
from sp_cam.io import atomic_write_json


def labels_from_xml(path: str | Path, class_names: Sequence[str]) -> list[int]:
    """Foreground class indices (1..K, ascending) named by the ``<object>`` entries of a VOC XML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from None
    index = {name: i for i, name in enumerate(class_names)}
    found = set()
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index or index[name] == 0:
            raise ValueError(f"{path}: unknown class name {name!r} (expected one of {', '.join(class_names[1:])})")
        found.add(index[name])
    return sorted(found)


def labels_from_mask(mask: np.ndarray, num_classes: int, source: str = "mask") -> list[int]:
    """Foreground class indices present in a (H, W) class-index mask (0 and 255 excluded)."""
    values = np.unique(mask)
    bad = [int(v) for v in values if v > num_classes and v != IGNORE_INDEX]
    if bad:
        raise ValueError(f"{source}: mask value {bad[0]} out of range 0..{num_classes} (or {IGNORE_INDEX})")
    return [int(v) for v in values if 0 < v <= num_classes]


def read_id_lists(paths: Iterable[str | Path]) -> list[str]:
    """Union of the ids of several list files, first-seen order."""
    seen: dict[str, None] = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"list file not found: {p}")
        for line in p.read_text().splitlines():
            if line.strip():
                seen.setdefault(line.split()[0], None)
    return list(seen)


def build_from_xml(annotations: Path, class_names: Sequence[str], ids: Sequence[str] | None = None):
    """{id: labels} for ``ids`` (default: every ``*.xml`` in ``annotations``)."""
    if not annotations.is_dir():
        raise FileNotFoundError(f"annotation folder not found: {annotations}")
    ids = sorted(p.stem for p in annotations.glob("*.xml")) if ids is None else list(ids)
    return {i: labels_from_xml(annotations / f"{i}.xml", class_names) for i in ids}


def build_from_masks(masks: Path, num_classes: int, ids: Sequence[str] | None = None):
    """{id: labels} for ``ids`` (default: every ``*.png`` in ``masks``)."""
    if not masks.is_dir():
        raise FileNotFoundError(f"mask folder not found: {masks}")
    ids = sorted(p.stem for p in masks.glob("*.png")) if ids is None else list(ids)
    out = {}
    for i in ids:
        path = masks / f"{i}.png"
        out[i] = labels_from_mask(read_label_png(path), num_classes, str(path))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=str, required=True, help="VOC-layout dataset folder")
    parser.add_argument("--source", type=str, choices=("xml", "masks"), default="xml")
    parser.add_argument("--annotations", type=str, default="", help="default ROOT/Annotations")
    parser.add_argument("--masks", type=str, default="", help="default ROOT/SegmentationClass")
    parser.add_argument("--list", type=str, nargs="*", default=[], help="only the ids of these list files")
    parser.add_argument("--class-names", type=str, default="", help="default ROOT/labels.txt")
    parser.add_argument("--out", type=str, default="", help="default ROOT/cls_labels.json")
    args = parser.parse_args(argv)
    root = Path(args.root)
    try:
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {root}")
        names_path = Path(args.class_names) if args.class_names else root / "labels.txt"
        if args.class_names and not names_path.is_file():
            raise FileNotFoundError(f"class-name file not found: {names_path}")
        names = read_class_names(names_path)
        ids = read_id_lists(args.list) if args.list else None
        if args.source == "xml":
            labels = build_from_xml(Path(args.annotations) if args.annotations else root / "Annotations", names, ids)
        else:
            masks = Path(args.masks) if args.masks else root / "SegmentationClass"
            labels = build_from_masks(masks, len(names) - 1, ids)
        out = Path(args.out) if args.out else root / "cls_labels.json"
        atomic_write_json(out, labels)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: labels of {len(labels)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
