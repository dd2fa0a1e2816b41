"""Ablation report and final metrics of a run: pseudo labels on the pseudo split, the segmentation network on its
evaluation split.

    python -m sp_cam.ablation -c CONFIG [key=value ...]

Pseudo-label rows (mIoU in percent on the pseudo split's images with GT, docs/method.md §5.1; the classes averaged
follow ``eval.absent``):

    a  baseline CAM, bilinear upsampling, best th
    b  SP-CAM, PSAM upsampling, t = 0, best th
    c  SP-CAM + random walk at the selected t, PSAM upsampling, selected th (the final pseudo labels)
    c' the same labels with the (t, th) chosen with GT on ``pseudo.heldout_split`` instead (GT-free on the pseudo split)
    d  the same t with bilinear instead of PSAM upsampling, best th
    e  upper bound: every 16-px grid cell labelled by its GT majority
    f  upper bound: every FCN superpixel (PSAM argmax, scale 1) labelled by its GT majority

Segmentation rows (stage 4, ``seg.eval_split``), from ``seg/eval_<split>.json`` and ``seg_gt/eval_<split>.json``:

    g  DeepLab-V2 trained on the pseudo labels, single scale
    h  the same, multi-scale + flip
    i  the same, multi-scale + flip + dense CRF (when it ran)
    j  DeepLab-V2 trained on the GT masks (the fully supervised reference), single scale
    k  the same, multi-scale + flip

Nothing is recomputed here: :mod:`sp_cam.make_pseudo` stores every image's confusion matrices for all rows in the same
pass as the scores (``pseudo.ablation``, default on). A row whose matrices are absent (no CAM model, as in
``train_sp_cam.sh``; ``pseudo.ablation=false``; t = 0 not swept) is reported as null with a note.
Writes ``PSEUDO/ablation.json``, ``WORK_DIR/ablation.md`` and ``WORK_DIR/metrics.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data.voc_layout import VOCLayout
from sp_cam import cli
from sp_cam.config import Config, load_config
from sp_cam.guard import LOCK_FILE, check_done
from sp_cam.io import atomic_write_json, atomic_write_text
from sp_cam.metrics import iou_from_confusion
from sp_cam.open_data import open_dataset
from sp_cam.paths import RunPaths
from sp_cam.score_store import TH_DECIMALS, sum_confusions, t_values, th_values
from sp_cam.stage_guard import PSEUDO_RELABEL, claim, pseudo_inputs

log = logging.getLogger("spcam.ablation")

ABLATION_LOCK = f"{LOCK_FILE}-ablation"  # in the work dir, beside the files it writes


SEG_ROWS = (  # (key, stage folder, inference mode, name)
    ("g", "seg", "single", "DeepLab-V2 on the pseudo labels"),
    ("h", "seg", "ms_flip", "DeepLab-V2 on the pseudo labels"),
    ("i", "seg", "crf", "DeepLab-V2 on the pseudo labels"),
    ("j", "seg_gt", "single", "DeepLab-V2 on the GT masks (supervised reference)"),
    ("k", "seg_gt", "ms_flip", "DeepLab-V2 on the GT masks (supervised reference)"),
)
MODE_NAMES = {"single": "single scale", "ms_flip": "multi-scale + flip", "crf": "multi-scale + flip + CRF"}


@dataclass
class Row:
    key: str
    name: str
    upsample: str
    t: int | None
    th: float | None
    miou: float | None
    fg_miou: float | None
    images: int
    note: str = ""
    final: bool = False
    per_class: list[float | None] | None = None  # IoU per class in percent (background first)


def _per_class(res: Any) -> list[float | None]:
    return [None if np.isnan(v) else 100 * float(v) for v in res.iou]


def _best_th(conf: np.ndarray, ths: list[float], absent: str) -> tuple[float, Any]:
    """(TH, N, N) -> (best th, IoUResult)."""
    results = [iou_from_confusion(c, absent=absent) for c in conf]
    j = int(np.argmax([r.miou for r in results]))
    return ths[j], results[j]


def _row(key, name, upsample, t, th, res, images, note="", final=False) -> Row:
    if res is None:
        return Row(key, name, upsample, t, th, None, None, images, note, final)
    return Row(key, name, upsample, t, th, res.miou, res.fg_miou, images, note, final, _per_class(res))


def build_rows(
    cfg: Config, ids: list[str], selection: dict[str, Any], heldout: dict[str, Any] | None = None
) -> tuple[list[Row], int]:
    """The ablation rows from the stored matrices; returns (rows, number of images with GT)."""
    pcfg = cfg.pseudo
    absent = cfg.eval.absent
    ts, ths = t_values(pcfg), th_values(pcfg)
    t_sel, th_sel = int(selection["t"]), float(selection["th"])
    keys = ["conf_psam", "conf_bilinear", "conf_cam", "conf_grid_ub", "conf_sp_ub"]
    sums = sum_confusions(RunPaths.from_work_dir(cfg.run.work_dir), ids, keys, progress=True)
    num_gt = sums[f"conf_{pcfg.upsample}"][1]

    def note_for(key: str, reason: str) -> str:
        total, count = sums[key]
        if total is None:
            return reason
        return "" if count == num_gt else f"only {count} of {num_gt} images"

    no_extras = "not computed: run make_pseudo with pseudo.ablation=true"
    rows: list[Row] = []
    conf, n = sums["conf_cam"]
    if conf is None:
        has_cam = RunPaths.model(RunPaths.from_work_dir(cfg.run.work_dir).cam).is_file()
        reason = no_extras if has_cam else "no baseline CAM model (stage A skipped)"
        rows.append(_row("a", "baseline CAM", "bilinear", None, None, None, 0, reason))
    else:
        th, res = _best_th(conf, ths, absent)
        rows.append(_row("a", "baseline CAM", "bilinear", None, th, res, n, note_for("conf_cam", "")))
    psam, n_psam = sums["conf_psam"]
    if psam is not None and 0 in ts:
        th, res = _best_th(psam[ts.index(0)], ths, absent)
        rows.append(_row("b", "SP-CAM, no random walk", "psam", 0, th, res, n_psam, note_for("conf_psam", "")))
    else:
        reason = "t = 0 not in pseudo.t_list" if psam is not None else no_extras
        rows.append(_row("b", "SP-CAM, no random walk", "psam", 0, None, None, 0, reason))
    final_psam = pcfg.upsample == "psam"
    if psam is not None and t_sel in ts and th_sel in ths:
        res = iou_from_confusion(psam[ts.index(t_sel), ths.index(th_sel)], absent=absent)
        rows.append(_row("c", "SP-CAM + random walk", "psam", t_sel, th_sel, res, n_psam, "", final_psam))
    elif final_psam and selection.get("miou") is not None:  # a fixed th outside the sweep: scored by make_pseudo
        rows.append(Row("c", "SP-CAM + random walk", "psam", t_sel, th_sel, selection["miou"], selection.get("fg_miou"),
                        num_gt, "", True))  # fmt: skip
    else:
        rows.append(_row("c", "SP-CAM + random walk", "psam", t_sel, th_sel, None, 0, no_extras, final_psam))
    main_conf, n_main = sums[f"conf_{pcfg.upsample}"]
    if heldout is not None and main_conf is not None:  # the GT-free row: (t, th) chosen with GT on another split
        t_h, th_h = int(heldout["t"]), round(float(heldout["th"]), TH_DECIMALS)
        name = f"SP-CAM + random walk, (t, th) chosen on `{heldout['split']}`"
        if t_h in ts and th_h in ths:
            res = iou_from_confusion(main_conf[ts.index(t_h), ths.index(th_h)], absent=absent)
            rows.append(_row("c'", name, pcfg.upsample, t_h, th_h, res, n_main))
        else:
            rows.append(_row("c'", name, pcfg.upsample, t_h, th_h, None, 0, "pair outside pseudo.t_list x th_list"))
    bil, n_bil = sums["conf_bilinear"]
    if bil is not None and t_sel in ts:
        if final_psam:
            th, res = _best_th(bil[ts.index(t_sel)], ths, absent)
        else:  # bilinear is the main mode: its row holds the final labels at the selected pair
            th, res = th_sel, iou_from_confusion(bil[ts.index(t_sel), ths.index(th_sel)], absent=absent)
        note = note_for("conf_bilinear", "")
        rows.append(_row("d", "SP-CAM + random walk", "bilinear", t_sel, th, res, n_bil, note, not final_psam))
    else:
        rows.append(_row("d", "SP-CAM + random walk", "bilinear", t_sel, None, None, 0, no_extras, not final_psam))
    for key, conf_key, name in (
        ("e", "conf_grid_ub", "upper bound: 16-px grid cells, GT majority"),
        ("f", "conf_sp_ub", "upper bound: FCN superpixels, GT majority"),
    ):
        conf, n = sums[conf_key]
        res = None if conf is None else iou_from_confusion(conf, absent=absent)
        rows.append(_row(key, name, "-", None, None, res, n, note_for(conf_key, no_extras)))
    return rows, num_gt


def seg_rows(cfg: Config) -> list[Row]:
    """The stage-4 rows from the evaluation summaries (rows of a stage or mode that did not run are left out)."""
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    rows = []
    for key, stage, mode, name in SEG_ROWS:
        summary_path = RunPaths.seg_summary(paths.stage(stage), cfg.seg.eval_split)
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        result = summary["modes"].get(mode)
        if result is None:
            continue
        per_class = list(result["per_class"].values())
        rows.append(Row(key, name, MODE_NAMES[mode], None, None, result["miou"], result["fg_miou"],
                        summary["num_gt_images"], per_class=per_class))  # fmt: skip
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[Row], split: str, num_gt: int, seg: list[Row], seg_split: str, absent: str) -> str:
    """The ablation as markdown tables: pseudo labels, then the segmentation network."""
    scope = "classes present in GT or prediction" if absent == "present" else "all classes, absent ones as 0"
    lines = [
        f"Pseudo-label mIoU (%) on `{split}` ({num_gt} images with GT, over the {scope}); best th per row unless "
        "selected.",
        "",
        "| | method | upsampling | t | th | mIoU | note |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        name = f"**{r.name}** (final)" if r.final else r.name
        lines.append(
            f"| {r.key} | {name} | {r.upsample} | {_fmt(r.t, 'd')} | {_fmt(r.th, '.2f')} | {_fmt(r.miou, '.2f')} "
            f"| {r.note} |"
        )
    if seg:
        lines += [
            "",
            f"Segmentation mIoU (%) on `{seg_split}` ({seg[0].images} images with GT).",
            "",
            "| | network | inference | mIoU |",
            "|---|---|---|---:|",
        ]
        lines += [f"| {r.key} | {r.name} | {r.upsample} | {_fmt(r.miou, '.2f')} |" for r in seg]
    return "\n".join(lines) + "\n"


def write_metrics(
    cfg: Config,
    selection: dict[str, Any],
    rows: list[Row],
    num_images: int,
    num_gt: int,
    seg: list[Row],
    class_names: tuple[str, ...],
) -> dict[str, Any]:
    """Write ``WORK_DIR/metrics.json``: the run's headline numbers plus the ablation rows; returns the dict.

    Keys: ``miou`` (final pseudo labels, percent; null without GT), ``cam_miou`` (baseline CAM, bilinear, best th; null
    without a CAM model), ``t``, ``th``, ``select``, ``split``, ``num_images``, ``num_gt_images``, ``absent`` (the
    classes the means are over), ``ablation``; with stage 4 ``seg_miou``, ``seg_miou_ms``, ``seg_miou_crf`` (when the
    CRF ran), ``seg_gt_miou`` (when the reference was trained), ``seg_split``, ``seg_ablation``; ``per_class``:
    ``{"class_names", "rows": {"cam", "spcam", "seg", "seg_gt": IoU per class in percent}}``.
    """
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    by_key = {r.key: r for r in rows + seg}
    cam = by_key.get("a")
    metrics = {
        "miou": selection.get("miou"),
        "fg_miou": selection.get("fg_miou"),
        "cam_miou": None if cam is None else cam.miou,
        "cam_th": None if cam is None else cam.th,
        "t": selection["t"],
        "th": selection["th"],
        "select": selection["select"],
        "split": cfg.data.pseudo_split,
        "num_images": num_images,
        "num_gt_images": num_gt,
        "upsample": cfg.pseudo.upsample,
        "absent": cfg.eval.absent,
        "ablation": [asdict(r) for r in rows],
    }
    if cam is not None and cam.miou is None:
        metrics["cam_note"] = cam.note
    for name, key in (("seg_miou", "g"), ("seg_miou_ms", "h"), ("seg_miou_crf", "i"), ("seg_gt_miou", "j")):
        if key in by_key:
            metrics[name] = by_key[key].miou
    heldout = by_key.get("c'")
    if heldout is not None:
        metrics["heldout"] = {"split": cfg.pseudo.heldout_split, "t": heldout.t, "th": heldout.th, "miou": heldout.miou}
    if seg:
        metrics["seg_split"] = cfg.seg.eval_split
        metrics["seg_ablation"] = [asdict(r) for r in seg]
    final = next((r for r in rows if r.final), None)
    per_class = {"cam": by_key.get("a"), "spcam": final, "seg": by_key.get("h"), "seg_gt": by_key.get("k")}
    metrics["per_class"] = {
        "class_names": list(class_names),
        "rows": {k: r.per_class for k, r in per_class.items() if r is not None and r.per_class is not None},
    }
    atomic_write_json(paths.metrics, metrics)
    return metrics


def check_stage3(cfg: Config, layout: VOCLayout) -> None:
    """Stage 3 finished for this config: its DONE marker exists and was written for the current inputs.

    Raises:
        FileNotFoundError: no DONE marker (stage 3 unfinished).
        ValueError: it was made with other selection settings (re-run stage 3, which re-selects from the scores).
        StaleOutputError: it was made from other scores (other weights, dataset or score settings).
    """
    done = RunPaths.from_work_dir(cfg.run.work_dir).pseudo_outputs.done
    if not done.is_file():
        raise FileNotFoundError(f"stage 3 not finished: {done} not found (run python -m sp_cam.make_pseudo first)")
    if not check_done(done, pseudo_inputs(cfg, layout), stage="pseudo", recompute=PSEUDO_RELABEL):
        raise ValueError(
            f"{done}: the pseudo labels were selected with other settings; run python -m sp_cam.make_pseudo first "
            "(it re-selects from the stored scores)"
        )


def run(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Build the ablation from the stored matrices; write ``ablation.json``, ``ablation.md`` and ``metrics.json``.

    Args:
        force: remove those three files first (they are rewritten on every run anyway).
    Returns:
        The ``metrics.json`` content.
    """
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    sel_path = paths.selection
    if not sel_path.is_file():
        raise FileNotFoundError(
            f"pseudo-label selection not found: {sel_path} (run python -m sp_cam.make_pseudo first)"
        )
    selection = json.loads(sel_path.read_text())
    if selection.get("split") != cfg.data.pseudo_split:
        raise ValueError(
            f"{sel_path}: made for split {selection.get('split')!r}, but data.pseudo_split={cfg.data.pseudo_split!r}"
        )
    layout = open_dataset(cfg)
    ids = layout.ids(cfg.data.pseudo_split)
    check_stage3(cfg, layout)
    outputs = [paths.ablation, paths.ablation_table, paths.metrics]
    with claim(
        cfg, paths.root, "evaluation", lock_name=ABLATION_LOCK, force=outputs if force else [], clean=[paths.root]
    ):
        return _write(cfg, paths, layout, ids, selection)


def _write(cfg: Config, paths: RunPaths, layout: VOCLayout, ids: list[str], selection: dict[str, Any]) -> dict:
    heldout = None
    if paths.heldout_outputs.selection.is_file():
        heldout = json.loads(paths.heldout_outputs.selection.read_text())
        if heldout.get("split") != cfg.pseudo.heldout_split:
            heldout = None
    rows, num_gt = build_rows(cfg, ids, selection, heldout)
    seg = seg_rows(cfg)
    atomic_write_json(
        paths.ablation,
        {
            "split": cfg.data.pseudo_split,
            "num_gt_images": num_gt,
            "selection": selection,
            "rows": [asdict(r) for r in rows],
            "seg_split": cfg.seg.eval_split,
            "seg_rows": [asdict(r) for r in seg],
        },
    )
    table = markdown_table(rows, cfg.data.pseudo_split, num_gt, seg, cfg.seg.eval_split, cfg.eval.absent)
    atomic_write_text(paths.ablation_table, table)
    metrics = write_metrics(cfg, selection, rows, len(ids), num_gt, seg, layout.class_names)
    log.info("ablation: %s; metrics: %s", paths.ablation_table, paths.metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser(__doc__, config_required=True)
    parser.add_argument("--force", action="store_true", help="remove the ablation and metrics files first")
    args = cli.parse_args(parser, argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        run(cfg, force=args.force)
        print(RunPaths.from_work_dir(cfg.run.work_dir).ablation_table.read_text())

    return cli.run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
