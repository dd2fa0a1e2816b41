"""Check a pseudo-label folder and prepare it for DeepLab-V2 training with kazuto1011/deeplab-pytorch.

    python tools/deeplab_handoff.py --pseudo WORK_DIR/pseudo_labels --images VOC2012/JPEGImages \\
        [--list VOC2012/ImageSets/Segmentation/train_aug.txt] [--gt VOC2012/SegmentationClassAug \\
        --val-list VOC2012/ImageSets/Segmentation/val.txt] --out handoff/

Checks every listed id (default: every PNG of ``--pseudo``): the label PNG exists, is a palette (P) or grey (L) image
of class indices 0..N_CLASSES-1 or 255, and has the size of its image. The first problem stops the run with a one-line
error.

deeplab-pytorch's ``vocaug`` dataset reads ``ROOT/VOC2012/ImageSets/SegmentationAug/<split>.txt``, whose lines are
``<image path> <label path>``, each path relative to ``ROOT/VOC2012`` and written with a leading ``/``. So ``--out``
becomes such a ROOT:

    OUT/VOC2012/JPEGImages               -> symlink to --images
    OUT/VOC2012/SegmentationClassPseudo  -> symlink to --pseudo
    OUT/VOC2012/SegmentationClassGT      -> symlink to --gt (only with --val-list)
    OUT/VOC2012/ImageSets/SegmentationAug/<split>.txt  ("/JPEGImages/<id>.jpg /SegmentationClassPseudo/<id>.png")
    OUT/VOC2012/ImageSets/SegmentationAug/val.txt      (with --val-list: GT labels, for evaluation)
    OUT/labels.txt                       class names (deeplab-pytorch's LABELS file format: "<index>\\t<name>")
    OUT/deeplab_config.yaml              the DATASET block to put into deeplab-pytorch's configs/voc12.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data.classes import IGNORE_INDEX, read_class_names  # noqa: E402
from sp_cam.io import atomic_write_text  # noqa: E402

# deeplab-pytorch (libs/datasets/voc.py, class VOCAug) accepts only these split names
DEEPLAB_SPLITS = ("train", "train_aug", "trainval", "trainval_aug", "val")
DEEPLAB_YEAR_DIR = "VOC2012"  # VOCAug joins ROOT with "VOC{year}", year 2012 by default
LIST_DIR = Path("ImageSets") / "SegmentationAug"
PSEUDO_LINK = "SegmentationClassPseudo"
GT_LINK = "SegmentationClassGT"
IMAGE_LINK = "JPEGImages"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("P", "L")


class HandoffError(ValueError):
    """A problem with the inputs, reported as one line."""


def read_ids(list_file: Path) -> list[str]:
    """Ids of a split list: VOC style (one id per line) or SegmentationAug style (``/JPEGImages/<id>.jpg ...``)."""
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    ids = [Path(line.split()[0]).stem for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise HandoffError(f"{list_file}: the list is empty")
    return ids


def find_image(images: Path, image_id: str) -> Path:
    for ext in IMAGE_EXTS:
        p = images / f"{image_id}{ext}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"image not found for id {image_id!r}: {images / image_id}.jpg")


def check_label(path: Path, image_path: Path, n_classes: int) -> None:
    """Raise a one-line error unless ``path`` is a P/L PNG of values < n_classes or 255, of the image's size."""
    if not path.is_file():
        raise FileNotFoundError(f"pseudo label missing: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode, fmt = img.mode, img.format
            values = np.asarray(img)
    except OSError as e:
        raise HandoffError(f"{path}: cannot read the PNG ({e})") from None
    if fmt != "PNG":
        raise HandoffError(f"{path}: a {fmt} file, expected a PNG")
    if mode not in LABEL_MODES:
        raise HandoffError(f"{path}: mode {mode}, expected a palette (P) or grey (L) PNG of class indices, not colours")
    bad = (values >= n_classes) & (values != IGNORE_INDEX)
    if bad.any():
        raise HandoffError(f"{path}: value {int(values[bad].max())} outside 0..{n_classes - 1} (or {IGNORE_INDEX})")
    with Image.open(image_path) as im:
        w, h = im.size
    if values.shape != (h, w):
        raise HandoffError(f"{path}: size {values.shape[1]}x{values.shape[0]} differs from {image_path} ({w}x{h})")


def _link(link: Path, target: Path) -> None:
    """Create or update the symlink ``link`` -> ``target`` (never replaces a real folder)."""
    target = target.resolve()
    if link.is_symlink():
        if link.resolve() == target:
            return
        link.unlink()
    elif link.exists():
        raise HandoffError(f"{link} exists and is not a symlink; choose another --out")
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link, target_is_directory=True)


def _list_lines(ids: Sequence[str], images: Path, label_dir: str) -> str:
    return "".join(f"/{IMAGE_LINK}/{find_image(images, i).name} /{label_dir}/{i}.png\n" for i in ids)


def config_snippet(root: Path, labels_file: Path, n_classes: int, split: str, val: bool) -> str:
    return (
        "# DATASET block for kazuto1011/deeplab-pytorch (configs/voc12.yaml); generated by tools/deeplab_handoff.py\n"
        "DATASET:\n"
        "    NAME: vocaug\n"
        f"    ROOT: {root}\n"
        f"    LABELS: {labels_file}\n"
        f"    N_CLASSES: {n_classes}\n"
        f"    IGNORE_LABEL: {IGNORE_INDEX}\n"
        "    SCALES: [0.5, 0.75, 1.0, 1.25, 1.5]\n"
        "    SPLIT:\n"
        f"        TRAIN: {split}\n"
        f"        VAL: {'val' if val else 'val  # no --val-list given: provide VOC2012/ImageSets/SegmentationAug/val.txt'}\n"
        "        TEST: test\n"
        f"# pseudo labels: {root / DEEPLAB_YEAR_DIR / PSEUDO_LINK}\n"
    )


def handoff(
    pseudo: Path,
    images: Path,
    out: Path,
    list_file: Path | None = None,
    split: str = "train_aug",
    class_names: Sequence[str] | None = None,
    gt: Path | None = None,
    val_list: Path | None = None,
) -> dict[str, Path | int]:
    """Check the pseudo labels and write the deeplab-pytorch layout under ``out``; returns what was written."""
    if split not in DEEPLAB_SPLITS:
        raise HandoffError(f"--split {split!r}: deeplab-pytorch's vocaug accepts only {', '.join(DEEPLAB_SPLITS)}")
    if split == "val":
        raise HandoffError("--split val is reserved for the GT evaluation list; use train_aug or trainval_aug")
    for what, folder in (("pseudo-label folder", pseudo), ("image folder", images)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} not found: {folder}")
    if (gt is None) != (val_list is None):
        raise HandoffError("--gt and --val-list go together (GT masks for the validation list)")
    names = tuple(class_names) if class_names is not None else read_class_names(images.parent / "labels.txt")
    n_classes = len(names)
    ids = read_ids(list_file) if list_file is not None else sorted(p.stem for p in pseudo.glob("*.png"))
    if not ids:
        raise HandoffError(f"{pseudo}: no PNG files")
    for image_id in ids:
        check_label(pseudo / f"{image_id}.png", find_image(images, image_id), n_classes)
    base = out / DEEPLAB_YEAR_DIR
    _link(base / IMAGE_LINK, images)
    _link(base / PSEUDO_LINK, pseudo)
    train_list = base / LIST_DIR / f"{split}.txt"
    atomic_write_text(train_list, _list_lines(ids, images, PSEUDO_LINK))
    written: dict[str, Path | int] = {"train_list": train_list, "num_images": len(ids), "n_classes": n_classes}
    if gt is not None and val_list is not None:
        if not gt.is_dir():
            raise FileNotFoundError(f"GT folder not found: {gt}")
        val_ids = read_ids(val_list)
        for image_id in val_ids:
            if not (gt / f"{image_id}.png").is_file():
                raise FileNotFoundError(f"GT mask missing: {gt / image_id}.png (id listed in {val_list})")
        _link(base / GT_LINK, gt)
        written["val_list"] = base / LIST_DIR / "val.txt"
        atomic_write_text(written["val_list"], _list_lines(val_ids, images, GT_LINK))
    labels_file = out / "labels.txt"
    atomic_write_text(labels_file, "".join(f"{i}\t{n}\n" for i, n in enumerate(names)))
    written["config"] = out / "deeplab_config.yaml"
    atomic_write_text(
        written["config"], config_snippet(out.resolve(), labels_file.resolve(), n_classes, split, gt is not None)
    )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pseudo", type=Path, required=True, help="folder of <id>.png pseudo labels")
    parser.add_argument("--images", type=Path, required=True, help="folder of <id>.jpg images (VOC JPEGImages)")
    parser.add_argument("--list", type=Path, default=None, help="ids to hand off (default: every PNG of --pseudo)")
    parser.add_argument("--out", type=Path, required=True, help="deeplab-pytorch DATASET.ROOT to create")
    parser.add_argument("--split", type=str, default="train_aug", help="split name of the list (default train_aug)")
    parser.add_argument("--classes", type=Path, default=None, help="labels.txt, background first (default: VOC)")
    parser.add_argument("--gt", type=Path, default=None, help="GT mask folder, for the validation list")
    parser.add_argument("--val-list", type=Path, default=None, help="validation ids (needs --gt)")
    args = parser.parse_args(argv)
    try:
        names = read_class_names(args.classes) if args.classes is not None else None
        if args.classes is not None and not args.classes.is_file():
            raise FileNotFoundError(f"class list not found: {args.classes}")
        written = handoff(args.pseudo, args.images, args.out, args.list, args.split, names, args.gt, args.val_list)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"checked {written['num_images']} pseudo labels ({written['n_classes']} classes): OK")
    for key in ("train_list", "val_list", "config"):
        if key in written:
            print(f"{key}: {written[key]}")
    print(f"then, in deeplab-pytorch: python main.py train --config-path {written['config']} (after merging the block)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
