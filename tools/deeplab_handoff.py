"""Check a pseudo-label folder and prepare it for DeepLab-V2 training with kazuto1011/deeplab-pytorch.

    python -m tools.deeplab_handoff --pseudo WORK_DIR/pseudo_labels --images VOC2012/JPEGImages \\
        [--list VOC2012/ImageSets/Segmentation/train_aug.txt] [--gt VOC2012/SegmentationClass \\
        --val-list VOC2012/ImageSets/Segmentation/val.txt] [--deeplab-config DEEPLAB/configs/voc12.yaml] \\
        [--exp-id ID] [--relative] --out handoff/

Checks every listed id (default: every PNG of ``--pseudo``), and with ``--val-list`` every GT mask the same way: the
label PNG exists, is an 8-bit palette (P) or grey (L) image of class indices 0..N_CLASSES-1 or 255, and has the size
of its image. Ids are used as file names: an id with ``/``, ``\\``, ``..``, a NUL, white space or an absolute path
is refused. The first problem stops the run with a one-line error, before anything is written.

deeplab-pytorch's ``vocaug`` dataset reads ``ROOT/VOC2012/ImageSets/SegmentationAug/<split>.txt``, whose lines are
``<image path> <label path>`` (split on one space), each path relative to ``ROOT/VOC2012`` and written with a
leading ``/``; it opens the image with OpenCV and the label with PIL. So ``--out`` becomes such a ROOT:

    OUT/VOC2012/JPEGImages               -> symlink to --images
    OUT/VOC2012/SegmentationClassPseudo  -> symlink to --pseudo
    OUT/VOC2012/SegmentationClassGT      -> symlink to --gt (only with --val-list)
    OUT/VOC2012/ImageSets/SegmentationAug/<split>.txt  ("/JPEGImages/<id>.jpg /SegmentationClassPseudo/<id>.png")
    OUT/VOC2012/ImageSets/SegmentationAug/val.txt      (with --val-list: GT labels, for `main.py test`)
    OUT/labels.txt                       class names, "<index>\\t<name>" (deeplab-pytorch's format; also read by
                                         data.classes.read_class_names)
    OUT/deeplab_config.yaml              EXP.ID and the DATASET block, to merge into deeplab-pytorch's
                                         configs/voc12.yaml (it is not a whole config: IMAGE, MODEL, SOLVER ... are
                                         missing)
    OUT/deeplab_<EXP.ID>.yaml            with --deeplab-config: that config with EXP.ID and DATASET replaced, ready
                                         for `python main.py train --config-path`

The YAML is written by a YAML library, so any path parses. ``EXP.ID`` (deeplab-pytorch's checkpoint, log and score
folders are ``<OUTPUT_DIR>/{models,logs,scores}/<EXP.ID>/...``) defaults to ``spcam_<name of the folder holding
--pseudo>`` (the work dir), so a pseudo-label run never overwrites a supervised ``voc12`` run. The DATASET block names
``SPLIT.VAL`` only when ``--val-list`` is given. Paths are absolute unless ``--relative``: then the symlinks point to
relative targets and ``DATASET.ROOT`` / ``DATASET.LABELS`` are written relative to ``--out`` (``.`` and
``labels.txt``), for a folder that is moved or mounted elsewhere; deeplab-pytorch resolves relative paths from its
own folder, so prefix them with where ``--out`` lives as it sees it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from data.classes import IGNORE_INDEX, read_class_names
from data.ids import check_id
from data.label_png import read_label_png
from sp_cam.io import atomic_write_text

# deeplab-pytorch (libs/datasets/voc.py, class VOCAug) accepts only these split names
DEEPLAB_SPLITS = ("train", "train_aug", "trainval", "trainval_aug", "val")
DEEPLAB_YEAR_DIR = "VOC2012"  # VOCAug joins ROOT with "VOC{year}", year 2012 by default
DEEPLAB_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5]  # deeplab-pytorch configs/voc12.yaml: DATASET.SCALES (train-time)
DEEPLAB_MODEL_DIR = "deeplabv2_resnet101_msc"  # main.py: MODEL.NAME.lower(), in the checkpoint folder
DEEPLAB_OUTPUT_DIR = "data"  # configs/voc12.yaml: EXP.OUTPUT_DIR
LIST_DIR = Path("ImageSets") / "SegmentationAug"
PSEUDO_LINK = "SegmentationClassPseudo"
GT_LINK = "SegmentationClassGT"
IMAGE_LINK = "JPEGImages"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
CONFIG_NAME = "deeplab_config.yaml"
LABELS_NAME = "labels.txt"
EXP_ID_PREFIX = "spcam_"
_EXP_ID_OK = re.compile(r"^[A-Za-z0-9_.-]+$")  # a folder name in deeplab-pytorch's output tree


class HandoffError(ValueError):
    """A problem with the inputs, reported as one line."""


def _aug_line_id(tokens: list[str]) -> str | None:
    """The id of a SegmentationAug line (``/JPEGImages/<id>.jpg /<dir>/<id>.png``), or None for another form."""
    if len(tokens) != 2 or not all(t.startswith("/") for t in tokens):
        return None
    name = tokens[0].rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def read_ids(list_file: Path) -> list[str]:
    """Ids of a split list: VOC style (one id per line) or SegmentationAug style (``/JPEGImages/<id>.jpg ...``)."""
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    ids = []
    for no, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        tokens = line.split()
        image_id = _aug_line_id(tokens)
        if image_id is None:
            if len(tokens) != 1:
                raise HandoffError(
                    f"{list_file}:{no}: expected an id or '/JPEGImages/<id>.jpg /<labels>/<id>.png', got {line!r}"
                )
            image_id = tokens[0]
        ids.append(check_id(image_id, list_file, no))
    if not ids:
        raise HandoffError(f"{list_file}: the list is empty")
    return ids


def find_image(images: Path, image_id: str) -> Path:
    for ext in IMAGE_EXTS:
        p = images / f"{image_id}{ext}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"image not found for id {image_id!r}: {images / image_id}.jpg")


def check_label(path: Path, image_path: Path, n_classes: int, what: str = "pseudo label") -> None:
    """Raise a one-line error unless ``path`` is a P/L PNG of values < n_classes or 255, of the image's size."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} missing: {path}")
    values = read_label_png(path)
    bad = (values >= n_classes) & (values != IGNORE_INDEX)
    if bad.any():
        raise HandoffError(f"{path}: value {int(values[bad].max())} outside 0..{n_classes - 1} (or {IGNORE_INDEX})")
    try:
        with Image.open(image_path) as im:
            w, h = im.size
    except OSError as e:
        raise HandoffError(f"{image_path}: cannot read the image ({e})") from None
    if values.shape != (h, w):
        raise HandoffError(f"{path}: size {values.shape[1]}x{values.shape[0]} differs from {image_path} ({w}x{h})")


def _link(link: Path, target: Path, relative: bool) -> None:
    """Create or update the symlink ``link`` -> ``target`` (never replaces a real folder)."""
    target = target.resolve()
    want = os.path.relpath(target, link.parent.resolve()) if relative else str(target)
    if link.is_symlink():
        if os.readlink(link) == want:
            return
        link.unlink()
    elif link.exists():
        raise HandoffError(f"{link} exists and is not a symlink; choose another --out")
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(want, link, target_is_directory=True)


def _list_lines(ids: Sequence[str], images: Path, label_dir: str) -> str:
    return "".join(f"/{IMAGE_LINK}/{find_image(images, i).name} /{label_dir}/{i}.png\n" for i in ids)


def default_exp_id(pseudo: Path) -> str:
    """``spcam_<work dir name>``: the folder holding the pseudo-label folder, made safe as a folder name."""
    name = pseudo.resolve().parent.name or "run"
    return EXP_ID_PREFIX + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run")


def dataset_block(root: str, labels: str, n_classes: int, split: str, val: bool) -> dict[str, Any]:
    """deeplab-pytorch's DATASET block: every key its main.py reads for ``vocaug``."""
    splits: dict[str, str] = {"TRAIN": split}
    if val:
        splits["VAL"] = "val"
    return {
        "NAME": "vocaug",
        "ROOT": root,
        "LABELS": labels,
        "N_CLASSES": n_classes,
        "IGNORE_LABEL": IGNORE_INDEX,
        "SCALES": list(DEEPLAB_SCALES),
        "SPLIT": splits,
    }


def config_snippet(exp_id: str, dataset: dict[str, Any]) -> str:
    """The YAML of EXP.ID plus the DATASET block (to merge into configs/voc12.yaml), written with ``yaml.safe_dump``."""
    header = (
        "# kazuto1011/deeplab-pytorch: merge into configs/voc12.yaml (generated by tools/deeplab_handoff.py).\n"
        "# Replace EXP.ID with the value below and the whole DATASET block with the one below; keep EXP.OUTPUT_DIR\n"
        "# and the DATALOADER, IMAGE, MODEL, SOLVER and CRF blocks of voc12.yaml.\n"
    )
    return header + yaml.safe_dump({"EXP": {"ID": exp_id}, "DATASET": dataset}, sort_keys=False)


def merged_config(base: Path, exp_id: str, dataset: dict[str, Any]) -> dict[str, Any]:
    """deeplab-pytorch's ``base`` config (configs/voc12.yaml) with EXP.ID and the whole DATASET block replaced."""
    if not base.is_file():
        raise FileNotFoundError(f"deeplab-pytorch config not found: {base}")
    try:
        cfg = yaml.safe_load(base.read_text())
    except yaml.YAMLError as e:
        raise HandoffError(f"{base}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "DATASET" not in cfg or "MODEL" not in cfg:
        raise HandoffError(
            f"{base}: not a deeplab-pytorch config (expected the DATASET and MODEL blocks of voc12.yaml)"
        )
    exp = dict(cfg.get("EXP") or {})
    exp["ID"] = exp_id
    exp.setdefault("OUTPUT_DIR", DEEPLAB_OUTPUT_DIR)
    out = {"EXP": exp, **{k: v for k, v in cfg.items() if k != "EXP"}}
    out["DATASET"] = dataset
    return out


def _no_interpolation(value: str, what: str) -> None:
    if "${" in value:
        raise HandoffError(f"{what} {value!r} contains '${{', which deeplab-pytorch's OmegaConf reads as interpolation")


def handoff(
    pseudo: Path,
    images: Path,
    out: Path,
    list_file: Path | None = None,
    split: str = "train_aug",
    class_names: Sequence[str] | None = None,
    gt: Path | None = None,
    val_list: Path | None = None,
    exp_id: str | None = None,
    relative: bool = False,
    deeplab_config: Path | None = None,
) -> dict[str, Any]:
    """Check the labels and write the deeplab-pytorch layout under ``out``; returns what was written."""
    if split not in DEEPLAB_SPLITS:
        raise HandoffError(f"--split {split!r}: deeplab-pytorch's vocaug accepts only {', '.join(DEEPLAB_SPLITS)}")
    if split == "val":
        raise HandoffError("--split val is reserved for the GT evaluation list; use train_aug or trainval_aug")
    for what, folder in (("pseudo-label folder", pseudo), ("image folder", images)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} not found: {folder}")
    if (gt is None) != (val_list is None):
        raise HandoffError("--gt and --val-list go together (GT masks for the validation list)")
    if gt is not None and not gt.is_dir():
        raise FileNotFoundError(f"GT folder not found: {gt}")
    exp_id = exp_id if exp_id is not None else default_exp_id(pseudo)
    if not _EXP_ID_OK.match(exp_id):
        raise HandoffError(f"--exp-id {exp_id!r}: use letters, digits, '_', '.' and '-' only (a folder name)")
    names = tuple(class_names) if class_names is not None else read_class_names(images.parent / LABELS_NAME)
    n_classes = len(names)
    if list_file is not None:
        ids = read_ids(list_file)
    else:
        ids = [check_id(p.stem, pseudo) for p in sorted(pseudo.glob("*.png"))]
    if not ids:
        raise HandoffError(f"{pseudo}: no PNG files")
    for image_id in ids:
        check_label(pseudo / f"{image_id}.png", find_image(images, image_id), n_classes, "pseudo label")
    val_ids: list[str] = []
    if gt is not None and val_list is not None:
        val_ids = read_ids(val_list)
        for image_id in val_ids:
            check_label(gt / f"{image_id}.png", find_image(images, image_id), n_classes, "GT mask")
    root_abs, labels_file = out.resolve(), out.resolve() / LABELS_NAME
    root_str, labels_str = (".", LABELS_NAME) if relative else (str(root_abs), str(labels_file))
    _no_interpolation(root_str, "--out")
    dataset = dataset_block(root_str, labels_str, n_classes, split, bool(val_ids))
    full = merged_config(deeplab_config, exp_id, dataset) if deeplab_config is not None else None

    base = out / DEEPLAB_YEAR_DIR
    _link(base / IMAGE_LINK, images, relative)
    _link(base / PSEUDO_LINK, pseudo, relative)
    train_list = base / LIST_DIR / f"{split}.txt"
    atomic_write_text(train_list, _list_lines(ids, images, PSEUDO_LINK))
    written: dict[str, Any] = {"train_list": train_list, "num_images": len(ids), "n_classes": n_classes}
    if val_ids and gt is not None:
        _link(base / GT_LINK, gt, relative)
        written["val_list"] = base / LIST_DIR / "val.txt"
        written["num_val"] = len(val_ids)
        atomic_write_text(written["val_list"], _list_lines(val_ids, images, GT_LINK))
    atomic_write_text(out / LABELS_NAME, "".join(f"{i}\t{n}\n" for i, n in enumerate(names)))
    written["config"] = out / CONFIG_NAME
    atomic_write_text(written["config"], config_snippet(exp_id, dataset))
    written["exp_id"] = exp_id
    written["output_dir"] = DEEPLAB_OUTPUT_DIR
    if full is not None:
        written["full_config"] = out / f"deeplab_{exp_id}.yaml"
        written["output_dir"] = str(full["EXP"]["OUTPUT_DIR"])
        atomic_write_text(written["full_config"], yaml.safe_dump(full, sort_keys=False))
    return written


def next_steps(written: dict[str, Any], split: str, relative: bool, deeplab_config: Path | None) -> list[str]:
    """The commands to run in deeplab-pytorch next, as lines to print."""
    exp_id = written["exp_id"]
    model = f"{written['output_dir']}/models/{exp_id}/{DEEPLAB_MODEL_DIR}/{split}/checkpoint_final.pth"
    lines = ["next, in your kazuto1011/deeplab-pytorch checkout:"]
    if "full_config" in written:
        cfg = str(Path(written["full_config"]).resolve())
        if deeplab_config is not None and deeplab_config.resolve().parent.name == "configs":
            lines.append(f"  cd {deeplab_config.resolve().parent.parent}")
    else:
        cfg = f"configs/{exp_id}.yaml"
        lines += [
            f"  cp configs/voc12.yaml {cfg}",
            f"  edit {cfg}: set EXP.ID to {exp_id} and replace its whole DATASET block with the DATASET block of "
            f"{written['config']} (keep EXP.OUTPUT_DIR and the DATALOADER, IMAGE, MODEL, SOLVER and CRF blocks); "
            "or re-run this tool with --deeplab-config <deeplab-pytorch>/configs/voc12.yaml to get the merged file",
        ]
    if relative:
        lines.append(
            "  DATASET.ROOT and DATASET.LABELS are relative to --out: prefix them with where --out lives as "
            "deeplab-pytorch sees it (it resolves relative paths from its own folder)"
        )
    lines.append(f"  python main.py train --config-path {cfg}")
    if "val_list" in written:
        lines.append(f"  python main.py test --config-path {cfg} --model-path {model}")
        lines.append(f"  python main.py crf --config-path {cfg}")
    else:
        lines.append("  (no --val-list: the config has no DATASET.SPLIT.VAL, so `main.py test` and `crf` need one)")
    return lines


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
    parser.add_argument("--exp-id", type=str, default=None, help="deeplab-pytorch EXP.ID (default spcam_<work dir>)")
    parser.add_argument(
        "--deeplab-config",
        type=Path,
        default=None,
        help="deeplab-pytorch's configs/voc12.yaml: also write it merged with EXP.ID and DATASET, ready to train",
    )
    parser.add_argument(
        "--relative", action="store_true", help="relative symlinks, and ROOT/LABELS relative to --out in the YAML"
    )
    args = parser.parse_args(argv)
    try:
        names = None
        if args.classes is not None:
            if not args.classes.is_file():
                raise FileNotFoundError(f"class list not found: {args.classes}")
            names = read_class_names(args.classes)
        written = handoff(
            args.pseudo,
            args.images,
            args.out,
            args.list,
            args.split,
            names,
            args.gt,
            args.val_list,
            exp_id=args.exp_id,
            relative=args.relative,
            deeplab_config=args.deeplab_config,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checked = f"checked {written['num_images']} pseudo labels"
    if "num_val" in written:
        checked += f" and {written['num_val']} GT masks"
    print(f"{checked} ({written['n_classes']} classes): OK")
    for key in ("train_list", "val_list", "config", "full_config"):
        if key in written:
            print(f"{key}: {written[key]}")
    print(f"EXP.ID: {written['exp_id']}")
    print("\n".join(next_steps(written, args.split, args.relative, args.deeplab_config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
