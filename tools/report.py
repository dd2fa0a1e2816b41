"""A self-contained HTML report of a run: what each stage wrote, as plots and tables.

    python -m tools.report WORK_DIR [--out FILE] [--ids ID [ID ...]] [--height PX]
    python -m tools.report -c CONFIG [section.key=value ...] [--out FILE] ...     (the work dir of that config)

Reads, never recomputes (a section whose inputs are missing becomes a one-line note):

1. **Run**: ``config.yaml`` (``data.dataset``, ``data.root``, the whole file folded), the scalar keys of
   ``metrics.json`` and every stage folder's ``DONE`` line.
2. **Training curves**: ``<stage>/metrics.jsonl`` of ``cam`` (stage A), ``fcn`` (stage 1), ``spcam`` (stage 2), ``seg``
   (stage 4) and of any other folder holding one. Every numeric key of the ``"kind": "train"`` records against
   ``step`` (loss terms as separate lines on one axis, log-scaled when they span orders of magnitude; ``lr`` and the
   throughput on their own axes); the ``eval_*`` keys of the ``"epoch"`` and ``"eval"`` records against ``epoch`` (a
   dict-valued key such as ``eval_pairs`` gets its own axis, a line per entry). A ``"resume"`` record drops what the
   interrupted run logged past the resumed step and epoch, and is drawn as a dotted line.
3. **Sweep**: ``pseudo/sweep.json`` ``pairs: [{t, th, miou, fg_miou}]`` as heat maps, the selected pair
   (``metrics.json`` ``t``/``th``, else ``pseudo/selection.json``) outlined.
4. **Per-class IoU**: ``metrics.json["per_class"] = {"class_names": [...], "rows": {"cam": [...], "spcam": [...],
   "seg": [...], ...}}`` (percent, null allowed) as grouped bars; ``metrics.json["ablation"]`` as a table and bars.
5. **Examples**: ``tools.visualize.render`` for ``--ids`` (default: the first 4 ids of ``pseudo_labels/``), and every
   ``figures/*.png``.

Writes ``WORK_DIR/report.html`` (or ``--out``), plots embedded as base64 PNG with no external CSS or JS, and each plot
as a PNG in the folder beside it named after it (``WORK_DIR/report/<name>.png``). Exit codes: 0 written, 2 bad input (a
one-line ``error: ...``).
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib
import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from sp_cam.io import atomic_write, atomic_write_text
from sp_cam.paths import RunPaths

log = logging.getLogger("spcam.report")

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.jsonl"  # every training stage's JSON-lines log (sp_cam.train_cls / train_fcn)
SWEEP_FILE = "sweep.json"  # in pseudo/ (sp_cam.make_pseudo.SWEEP_FILE)
SELECTION_FILE = "selection.json"  # in pseudo/ (sp_cam.make_pseudo.SELECTION_FILE)
KNOWN_STAGES = {
    "cam": "stage A: CAM baseline",
    "fcn": "stage 1: superpixel FCN",
    "spcam": "stage 2: SP-CAM",
    "seg": "stage 4: segmentation network",
}
DEFAULT_NUM_IDS = 4  # rows of the example figure without --ids
DPI = 100
DONE_CHARS = 90  # of a DONE marker shown in the page
LOG_SPAN = 100.0  # loss terms whose largest values differ by more than this factor share a log axis
CLASSES_PER_PANEL = 21  # VOC fits one row of bars; COCO's 81 classes wrap onto four
TRAIN_AXES_KEYS = ("epoch", "step")
TRAIN_AUX_KEYS = {"lr": "learning rate", "images_per_s": "images / s", "seconds": "seconds"}
EVAL_BOOKKEEPING = ("eval_images", "eval_t", "eval_th")  # counts and the epoch's best pair, not metrics over epochs
PERCENT_KEYS = ("miou", "fg_miou", "map", "map_chance")
DISPLAY_NAMES = {
    "miou": "mIoU",
    "fg_miou": "fg mIoU",
    "map": "mAP",
    "map_chance": "mAP at chance",
    "pairs": "mIoU per (t, th)",
}
HEADLINE_NAMES = {
    "miou": "pseudo-label mIoU",
    "fg_miou": "pseudo-label fg mIoU",
    "cam_miou": "CAM mIoU (bilinear, best th)",
    "seg_miou": "segmentation mIoU",
    "gain": "pseudo-label - CAM mIoU",
}
ROW_STYLE = {"cam": ("CAM", "tab:blue"), "spcam": ("SP-CAM", "tab:orange"), "seg": ("segmentation", "tab:green")}
EXTRA_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
FINAL_COLOUR, BOUND_COLOUR, ROW_COLOUR = "tab:orange", "0.7", "tab:blue"
SELECTED_COLOUR = "red"
PAIR_NAME = re.compile(r"^t=([-+0-9.eE]+),th=([-+0-9.eE]+)$")  # keys of eval_pairs (sp_cam.train_cls.evaluate)
LINE_STYLES = ("-", "--", ":", "-.")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222;
       background: #fafafa; }
header, main, nav { max-width: 1200px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { margin: 0 0 4px 0; font-size: 1.6em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
h3 { margin-bottom: 6px; }
.sub { color: #555; margin: 0; }
nav { margin-top: 10px; font-size: 0.95em; }
nav a { margin-right: 16px; color: #0b5394; text-decoration: none; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 10px 16px; min-width: 130px; }
.card .v { font-size: 1.6em; font-weight: 600; }
.card .k { color: #555; font-size: 0.85em; }
table { border-collapse: collapse; background: white; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.final td { font-weight: 600; background: #fff4e5; }
figure { margin: 12px 0; }
figure img { max-width: 100%; border: 1px solid #eee; background: white; }
figcaption { color: #555; font-size: 0.85em; }
.note { color: #8a6d3b; background: #fcf8e3; border-left: 3px solid #e0c36c; padding: 4px 10px; }
pre { background: white; border: 1px solid #ddd; padding: 8px; font-size: 0.85em; overflow-x: auto; }
code { font-size: 0.95em; }
"""


# --------------------------------------------------------------------------------------------------------------------
# Building blocks


@dataclass
class Plot:
    """One PNG: written to ``<report folder>/<name>.png`` and embedded in the HTML."""

    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[str | Plot] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.blocks.append(note(text))

    @property
    def plots(self) -> list[Plot]:
        return [b for b in self.blocks if isinstance(b, Plot)]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def display(key: str) -> str:
    key = key.removeprefix("eval_")
    return DISPLAY_NAMES.get(key, key)


def figure_png(fig: Figure) -> bytes:
    """Render a matplotlib figure with the Agg canvas; ``bbox_inches="tight"`` keeps outside legends in the picture."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def array_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def done_line(path: Path) -> str:
    """What a ``DONE`` marker says, cut to ``DONE_CHARS``: when it finished and its counts (the JSON markers of
    sp_cam.guard), or the first line of an older plain-text marker."""
    text = path.read_text().strip()
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and "finished" in record:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(record["finished"])))
        extra = record.get("extra") or {}
        counts = ", ".join(f"{k} {v}" for k, v in extra.items() if isinstance(v, (int, float, str)))
        line = f"finished {when}" + (f" ({counts})" if counts else "")
    else:
        lines = text.splitlines()
        line = lines[0] if lines else "done"
    return line if len(line) <= DONE_CHARS else line[: DONE_CHARS - 3] + "..."


def read_json(path: Path) -> tuple[Any, str]:
    """(content, "") or (None, the one-line reason it cannot be used)."""
    if not path.is_file():
        return None, f"{path.name} not found ({path})"
    try:
        return json.loads(path.read_text()), ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path}: not readable JSON ({str(e).splitlines()[0]})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool], classes=()) -> str:
    """An HTML table of already escaped cells; ``classes`` optionally gives each row a CSS class."""
    head = f"<thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead>" if any(header) else ""
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if n else f"<td>{c}</td>" for c, n in zip(row, numeric, strict=True)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


# --------------------------------------------------------------------------------------------------------------------
# Stage logs


@dataclass
class StageLog:
    """What one ``metrics.jsonl`` says once resumes are applied.

    ``train``: the train records by increasing step (one per step, the last one written); ``evals``: epoch -> the
    ``eval_*`` values of its epoch/eval records; ``resumes``: the resume records in file order.
    """

    train: list[dict[str, Any]]
    evals: dict[int, dict[str, Any]]
    resumes: list[dict[str, Any]]
    bad_lines: int


def read_stage_log(path: Path) -> StageLog:
    """Parse a stage's JSON-lines log.

    A resume at (epoch E, step S) discards the records the interrupted run wrote after that point (its unfinished
    epoch): the resumed run writes them again. Unreadable lines (a crash mid-write) are counted and skipped.
    """
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    resumes: list[dict[str, Any]] = []
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(record, dict):
            bad += 1
            continue
        kind = record.get("kind")
        if kind == "resume":
            if is_number(record.get("step")):
                train = {s: r for s, r in train.items() if s <= record["step"]}
            if is_number(record.get("epoch")):
                evals = {e: v for e, v in evals.items() if e <= record["epoch"]}
            resumes.append(record)
        elif kind == "train" and is_number(record.get("step")):
            train[int(record["step"])] = record
        elif kind in ("epoch", "eval") and is_number(record.get("epoch")):
            values = {k: v for k, v in record.items() if k.startswith("eval_")}
            if values:
                evals.setdefault(int(record["epoch"]), {}).update(values)
    return StageLog([train[s] for s in sorted(train)], dict(sorted(evals.items())), resumes, bad)


def stage_names(root: Path) -> list[str]:
    """The known stages in pipeline order, then any other folder with a ``metrics.jsonl``, by name."""
    found = sorted(p.parent.name for p in root.glob(f"*/{METRICS_FILE}") if p.is_file())
    return list(KNOWN_STAGES) + [s for s in found if s not in KNOWN_STAGES]


def _numeric_keys(records: Sequence[dict[str, Any]], skip: Sequence[str]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in skip and k != "kind" and is_number(v):
                keys[k] = None
    return list(keys)


def _series(records: Sequence[dict[str, Any]], x_key: str, key: str) -> tuple[list[float], list[float]]:
    pts = [(r[x_key], r[key]) for r in records if is_number(r.get(key)) and is_number(r.get(x_key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mark_resumes(ax, positions: Sequence[float], label: bool) -> None:
    for i, x in enumerate(positions):
        ax.axvline(x, color="0.4", linestyle=":", linewidth=1.2, label="resumed" if label and i == 0 else None)


def _legend(ax) -> None:
    """A legend outside the axes, on the right: it never hides a curve."""
    handles = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  ncol=1 + len(handles) // 16)  # fmt: skip


def _flag_spans(records: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """Step ranges over which the boolean ``key`` of the train records is true.

    Each record stands for the steps since the previous one.
    """
    spans, start, prev = [], None, 0.0
    for r in records:
        on = r.get(key) is True
        if on and start is None:
            start = prev
        if not on and start is not None:
            spans.append((start, prev))
            start = None
        prev = r["step"]
    if start is not None:
        spans.append((start, prev))
    return spans


def train_plot(stage: str, title: str, slog: StageLog) -> Plot | None:
    """Loss terms against step on one axis, then one axis per auxiliary key (lr, throughput).

    Boolean keys (stage 1's ``affinity``) shade the steps where they are true.
    """
    keys = _numeric_keys(slog.train, TRAIN_AXES_KEYS)
    if not keys:
        return None
    aux = [k for k in keys if k in TRAIN_AUX_KEYS]
    terms = [k for k in keys if k not in TRAIN_AUX_KEYS]
    flags = list({k: None for r in slog.train for k, v in r.items() if isinstance(v, bool)})
    panels = ([terms] if terms else []) + [[k] for k in aux]
    ratios = ([2.6] if terms else []) + [1.0] * len(aux)
    fig = Figure(figsize=(2.8 * sum(ratios) + 1.6, 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), width_ratios=ratios, squeeze=False)[0]
    resume_steps = [r["step"] for r in slog.resumes if is_number(r.get("step"))]
    for ax, panel in zip(axes, panels, strict=True):
        is_terms = panel is terms
        peaks, lows = [], []
        for k in panel:
            xs, ys = _series(slog.train, "step", k)
            if not xs:
                continue
            flat = all(y == 0 for y in ys)
            peaks.append(max(abs(y) for y in ys))
            lows.append(min(ys))
            label = k + (" (0 throughout)" if flat else "")
            ax.plot(xs, ys, linewidth=1.4, marker="." if len(xs) < 30 else None, label=label)
        positive = [p for p in peaks if p > 0]
        if is_terms and len(positive) > 1 and min(lows) >= 0 and max(positive) / min(positive) > LOG_SPAN:
            ax.set_yscale("log", nonpositive="mask")
            ax.set_ylabel("value (log scale; zeros not drawn)")
        else:
            ax.set_ylabel("value" if is_terms else TRAIN_AUX_KEYS[panel[0]])
        for i, flag in enumerate(flags):
            for j, (a, b) in enumerate(_flag_spans(slog.train, flag)):
                ax.axvspan(a, b, color=EXTRA_COLOURS[i % len(EXTRA_COLOURS)], alpha=0.1, linewidth=0,
                           label=f"{flag} on" if is_terms and j == 0 else None)  # fmt: skip
        _mark_resumes(ax, resume_steps, label=is_terms)
        ax.set_xlabel("step")
        ax.set_title("loss terms" if is_terms else panel[0], fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if is_terms:
            _legend(ax)
    fig.suptitle(f"{title}: training ({stage}/{METRICS_FILE}, train records)", fontsize=11)
    return Plot(f"{stage}_train", figure_png(fig), f"{title}: every numeric key of the train records against step.")


def _entry_styles(entries: list[str]) -> dict[str, tuple[Any, str]]:
    """A (colour, line style) per entry of a dict-valued eval key.

    Entries named like ``eval_pairs``' ``t=5,th=0.4`` get their colour from th and their line style from t, so the
    pairs of one t read as a family; any other names get colours along viridis.
    """
    cmap = matplotlib.colormaps["viridis"]
    parsed = [PAIR_NAME.match(e) for e in entries]
    if not all(parsed):
        return {e: (cmap(i / max(len(entries) - 1, 1)), "-") for i, e in enumerate(entries)}
    ts = sorted({m.group(1) for m in parsed}, key=float)
    ths = sorted({m.group(2) for m in parsed}, key=float)
    return {
        e: (cmap(ths.index(m.group(2)) / max(len(ths) - 1, 1)), LINE_STYLES[ts.index(m.group(1)) % len(LINE_STYLES)])
        for e, m in zip(entries, parsed, strict=True)
    }


def eval_plot(stage: str, title: str, slog: StageLog) -> Plot | None:
    """Scalar eval metrics against epoch; each dict-valued eval key on its own axis, one line per entry."""
    records = [{"epoch": e, **v} for e, v in slog.evals.items()]
    scalars = _numeric_keys(records, ("epoch", *EVAL_BOOKKEEPING))
    dicts: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if isinstance(v, dict) and any(is_number(x) for x in v.values()):
                dicts[k] = None
    panels: list[tuple[str, list[str]]] = ([("metrics", scalars)] if scalars else []) + [(k, [k]) for k in dicts]
    if not panels:
        return None
    fig = Figure(figsize=(5.6 * len(panels) + 1.2, 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    resume_epochs = [r["epoch"] for r in slog.resumes if is_number(r.get("epoch"))]
    for ax, (name, keys) in zip(axes, panels, strict=True):
        if name == "metrics":
            for k in keys:
                xs, ys = _series(records, "epoch", k)
                chance = k.endswith("_chance")
                ax.plot(xs, ys, linestyle="--" if chance else "-", color="0.5" if chance else None,
                        marker=None if chance else "o", markersize=3.5, label=display(k))  # fmt: skip
            percent = all(k.removeprefix("eval_") in PERCENT_KEYS for k in keys)
            ax.set_ylabel("%" if percent else "value")
            ax.set_title("evaluation", fontsize=10)
        else:
            entries: dict[str, None] = {}
            for r in records:
                for e, v in (r.get(name) or {}).items():
                    if is_number(v):
                        entries[e] = None
            for e, (colour, style) in _entry_styles(list(entries)).items():
                pts = [(r["epoch"], r[name][e]) for r in records if isinstance(r.get(name), dict)
                       and is_number(r[name].get(e))]  # fmt: skip
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=2.5, linewidth=1.1,
                        color=colour, linestyle=style, label=e)  # fmt: skip
            ax.set_ylabel("%" if name.removeprefix("eval_") == "pairs" else "value")
            ax.set_title(f"{display(name)} ({name})", fontsize=10)
        _mark_resumes(ax, resume_epochs, label=True)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(ax)
    fig.suptitle(f"{title}: evaluation ({stage}/{METRICS_FILE}, epoch and eval records)", fontsize=11)
    caption = f"{title}: the eval_* keys of the epoch and eval records against epoch."
    return Plot(f"{stage}_eval", figure_png(fig), caption)


def curves_section(paths: RunPaths) -> Section:
    section = Section("curves", "Training curves")
    for stage in stage_names(paths.root):
        title = KNOWN_STAGES.get(stage, f"stage {stage}")
        path = paths.root / stage / METRICS_FILE
        section.blocks.append(f"<h3>{esc(title)} <small>(<code>{esc(stage)}/</code>)</small></h3>")
        if not path.is_file():
            section.note(f"{title}: skipped, no {stage}/{METRICS_FILE}")
            continue
        slog = read_stage_log(path)
        done = RunPaths.done(paths.root / stage)
        facts = [f"{len(slog.train)} train records", f"{len(slog.evals)} evaluated epochs"]
        if slog.train:
            facts.append(f"last step {slog.train[-1]['step']}")
        if slog.resumes:
            facts.append(f"resumed {len(slog.resumes)}x")
        facts.append(esc(done_line(done)) if done.is_file() else "not finished (no DONE)")
        section.blocks.append(f'<p class="sub">{esc(", ".join(facts[:-1]))}; {facts[-1]}</p>')
        if slog.bad_lines:
            section.note(f"{stage}/{METRICS_FILE}: skipped {slog.bad_lines} unreadable line(s)")
        plot = train_plot(stage, title, slog)
        section.blocks.append(plot or note(f"{title}: no numeric train records"))
        plot = eval_plot(stage, title, slog)
        section.blocks.append(plot or note(f"{title}: no eval_* values in the epoch/eval records"))
    return section


# --------------------------------------------------------------------------------------------------------------------
# Run header


def header_section(paths: RunPaths, metrics: Any, metrics_note: str) -> tuple[Section, str]:
    """The run section, and the one-line subtitle (dataset, work dir) for the page header."""
    section = Section("run", "Run")
    dataset = "unknown dataset"
    if paths.config.is_file():
        text = paths.config.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raw = {}
            section.note(f"config.yaml: not valid YAML ({str(e).splitlines()[0]})")
        data = raw.get("data", {}) if isinstance(raw, dict) else {}
        if isinstance(data, dict) and data.get("dataset"):
            dataset = str(data["dataset"]) + (f" ({data['root']})" if data.get("root") else "")
        facts = [("dataset", esc(dataset)), ("work dir", f"<code>{esc(paths.root.resolve())}</code>"),
                 ("config", f"<code>{esc(paths.config.resolve())}</code>")]  # fmt: skip
    else:
        facts = [("work dir", f"<code>{esc(paths.root.resolve())}</code>")]
        text = ""
    section.blocks.append(table(["", ""], facts, [False, False]))
    if text:
        section.blocks.append(f"<details><summary>config.yaml</summary><pre>{esc(text)}</pre></details>")
    else:
        section.note(f"config: skipped, no config.yaml ({paths.config})")

    if isinstance(metrics, dict):
        cards = [(k, v) for k, v in metrics.items() if k.endswith("miou") and is_number(v)]
        if is_number(metrics.get("miou")) and is_number(metrics.get("cam_miou")):
            cards.append(("gain", metrics["miou"] - metrics["cam_miou"]))
        if is_number(metrics.get("t")) and is_number(metrics.get("th")):
            cards.append(("selected (t, th)", f"({metrics['t']}, {metrics['th']:g})"))
        html_cards = "".join(
            f'<div class="card"><div class="v">{esc(fmt(v))}</div><div class="k">{esc(HEADLINE_NAMES.get(k, k))}</div>'
            "</div>"
            for k, v in cards
        )
        section.blocks.append(f'<div class="cards">{html_cards}</div>')
        scalars = [(k, v) for k, v in metrics.items() if v is None or isinstance(v, str | int | float | bool)]
        section.blocks.append("<h3>metrics.json</h3>")
        section.blocks.append(
            table(["key", "value"], [(f"<code>{esc(k)}</code>", esc(fmt(v))) for k, v in scalars], [False, False])
        )
    else:
        section.note(f"headline numbers: skipped, {metrics_note or 'metrics.json is not a JSON object'}")

    stages = [p.parent for p in sorted(paths.root.glob("*/DONE"))]
    if stages:
        rows = [(f"<code>{esc(s.name)}/</code>", esc(done_line(RunPaths.done(s)))) for s in stages]
        section.blocks.append("<h3>Finished steps</h3>")
        section.blocks.append(table(["folder", "DONE"], rows, [False, False]))
    else:
        section.note("finished steps: none (no */DONE markers)")
    return section, f"{dataset} · {paths.root.resolve()}"


# --------------------------------------------------------------------------------------------------------------------
# Sweep


def selected_pair(paths: RunPaths, metrics: Any) -> tuple[float, float] | None:
    for source in (metrics, read_json(paths.pseudo / SELECTION_FILE)[0]):
        if isinstance(source, dict) and is_number(source.get("t")) and is_number(source.get("th")):
            return source["t"], source["th"]
    return None


def sweep_section(paths: RunPaths, metrics: Any) -> Section:
    section = Section("sweep", "Pseudo-label sweep over (t, th)")
    sweep, why = read_json(paths.pseudo / SWEEP_FILE)
    pairs = sweep.get("pairs") if isinstance(sweep, dict) else None
    if not isinstance(pairs, list):
        section.note(f"sweep: skipped, {why or f'{SWEEP_FILE} has no pairs list'}")
        return section
    pairs = [p for p in pairs if isinstance(p, dict) and is_number(p.get("t")) and is_number(p.get("th"))]
    ts, ths = sorted({p["t"] for p in pairs}), sorted({p["th"] for p in pairs})
    grids = {}
    for key in ("miou", "fg_miou"):
        grid = np.full((len(ts), len(ths)), np.nan)
        for p in pairs:
            if is_number(p.get(key)):
                grid[ts.index(p["t"]), ths.index(p["th"])] = p[key]
        if np.isfinite(grid).any():
            grids[key] = grid
    if not grids:
        section.note("sweep: skipped, no scored pairs (no GT on the pseudo split?)")
        return section
    sel = selected_pair(paths, metrics)
    cell = (ts.index(sel[0]), ths.index(sel[1])) if sel and sel[0] in ts and sel[1] in ths else None

    fig = Figure(figsize=(len(grids) * (0.95 * len(ths) + 2.2), 0.55 * len(ts) + 1.9), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    for ax, (key, grid) in zip(axes, grids.items(), strict=True):
        lo, hi = np.nanmin(grid), np.nanmax(grid)
        im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, aspect="auto")
        for i in range(len(ts)):
            for j in range(len(ths)):
                v = grid[i, j]
                if not np.isfinite(v):
                    continue
                light = hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis is light at the top of its range
                bold = cell == (i, j)
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=9, color="black" if light else "white",
                        fontweight="bold" if bold else "normal")  # fmt: skip
        if cell is not None:
            ax.add_patch(Rectangle((cell[1] - 0.5, cell[0] - 0.5), 1, 1, fill=False, edgecolor=SELECTED_COLOUR,
                                   linewidth=2.5))  # fmt: skip
        ax.set_xticks(range(len(ths)), [f"{th:g}" for th in ths])
        ax.set_yticks(range(len(ts)), [str(t) for t in ts])
        ax.set_xlabel("th (background threshold)")
        ax.set_ylabel("t (random-walk steps)")
        ax.set_title(f"{display(key)} (%)", fontsize=10)
        fig.colorbar(im, ax=ax, label=f"{display(key)} (%)", shrink=0.9)
    where = f"selected t={sel[0]}, th={sel[1]:g} (red box)" if cell else "selected pair unknown"
    if sel and cell is None:
        where = f"selected t={sel[0]}, th={sel[1]:g} lies outside the sweep"
    split = sweep.get("split", "?")
    fig.suptitle(f"pseudo labels on '{split}' ({sweep.get('num_gt_images', '?')} GT images): {where}", fontsize=11)
    caption = f"pseudo/{SWEEP_FILE}: mIoU of the pseudo labels for every (t, th) pair; {where}."
    section.blocks.append(Plot("sweep", figure_png(fig), caption))
    return section


# --------------------------------------------------------------------------------------------------------------------
# Per-class IoU and ablation


def _per_class_rows(per_class: Any) -> tuple[list[str], dict[str, list[float | None]], str]:
    """Validated (class names, rows in display order, "") or ([], {}, the reason)."""
    if not isinstance(per_class, dict):
        return [], {}, "metrics.json per_class is not an object"
    names, rows = per_class.get("class_names"), per_class.get("rows")
    if not isinstance(names, list) or not names or not isinstance(rows, dict) or not rows:
        return [], {}, "metrics.json per_class needs class_names (a list) and rows (an object)"
    out: dict[str, list[float | None]] = {}
    for key in [k for k in ROW_STYLE if k in rows] + [k for k in rows if k not in ROW_STYLE]:
        values = rows[key]
        if not isinstance(values, list) or len(values) != len(names):
            n = len(values) if isinstance(values, list) else "no"
            return [], {}, f"metrics.json per_class.rows.{key} has {n} values for {len(names)} classes"
        out[key] = [v if is_number(v) else None for v in values]
    return [str(n) for n in names], out, ""


def per_class_plot(names: list[str], rows: dict[str, list[float | None]]) -> Plot:
    chunks = [range(i, min(i + CLASSES_PER_PANEL, len(names))) for i in range(0, len(names), CLASSES_PER_PANEL)]
    width = max(6.0, 0.5 * len(chunks[0]) * max(1.0, len(rows) / 3) + 1.5)
    fig = Figure(figsize=(width, 3.3 * len(chunks) + 0.4), layout="constrained")
    axes = fig.subplots(len(chunks), 1, squeeze=False)[:, 0]
    bar = 0.8 / len(rows)
    extras = [k for k in rows if k not in ROW_STYLE]
    style = {k: ROW_STYLE.get(k) or (k, EXTRA_COLOURS[extras.index(k) % len(EXTRA_COLOURS)]) for k in rows}
    for ax, chunk in zip(axes, chunks, strict=True):
        x = np.arange(len(chunk))
        for r, (key, values) in enumerate(rows.items()):
            label, colour = style[key]
            present = [v for v in values if v is not None]
            mean = f"mean {sum(present) / len(present):.1f}" if present else "no values"
            heights = [np.nan if values[c] is None else values[c] for c in chunk]
            offsets = x + (r - (len(rows) - 1) / 2) * bar
            ax.bar(offsets, heights, bar, color=colour, label=f"{label} ({mean})")
            for xo, h in zip(offsets, heights, strict=True):
                if not np.isfinite(h):
                    ax.text(xo, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
        ax.set_xticks(x, [names[c] for c in chunk], rotation=40, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(chunk) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("IoU (%)")
        ax.grid(True, axis="y", alpha=0.3)
    ncol = max(1, min(len(rows), int(width // 3)))  # a legend wider than the axes would squeeze them
    axes[0].legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.02), ncol=ncol, frameon=False)
    fig.suptitle("per-class IoU (metrics.json per_class)", fontsize=11)
    return Plot("per_class", figure_png(fig), "IoU of every class, one bar per row of metrics.json per_class.")


def ablation_plot(rows: list[dict[str, Any]]) -> Plot:
    labels, values, colours = [], [], []
    for r in rows:
        up = r.get("upsample")
        label = f"{r.get('key', '')}  {r.get('name', '')}" + (f" ({up})" if up and up != "-" else "")
        if is_number(r.get("t")):
            label += f", t={r['t']}"
        labels.append(label)
        values.append(r["miou"] if is_number(r.get("miou")) else None)
        name = str(r.get("name", ""))
        colours.append(
            FINAL_COLOUR if r.get("final") else BOUND_COLOUR if name.startswith("upper bound") else ROW_COLOUR
        )
    present = [v for v in values if v is not None]
    top = max(present) if present else 1.0
    fig = Figure(figsize=(9.0, 0.42 * len(rows) + 1.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, [0 if v is None else v for v in values], color=colours, height=0.65)
    for i, v in enumerate(values):
        text = f"{v:.1f}" if v is not None else "n/a: " + (str(rows[i].get("note") or "no value"))
        ax.text((v or 0) + top * 0.01, i, text, va="center", fontsize=8, color="black" if v is not None else "0.4")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel("mIoU (%)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("ablation (metrics.json ablation; orange: the final pseudo labels, grey: upper bounds)", fontsize=10)
    return Plot("ablation", figure_png(fig), "Pseudo-label mIoU of each ablation row (best th unless selected).")


def ablation_table(rows: list[dict[str, Any]]) -> str:
    cols = [("key", False, "s"), ("name", False, "s"), ("upsample", False, "s"), ("t", True, "d"),
            ("th", True, ".2f"), ("miou", True, ".2f"), ("fg_miou", True, ".2f"), ("images", True, "d"),
            ("note", False, "s")]  # fmt: skip
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    cells = []
    for r in rows:
        row = []
        for key, _, spec in cols:
            v = r.get(key)
            text = fmt(v, spec) if isinstance(v, float) else fmt(v)
            if key == "name" and r.get("final"):
                text += " (final)"
            row.append(esc(text))
        cells.append(row)
    header = [{"miou": "mIoU", "fg_miou": "fg mIoU", "upsample": "upsampling", "name": "method"}.get(c[0], c[0])
              for c in cols]  # fmt: skip
    return table(header, cells, [c[1] for c in cols], ["final" if r.get("final") else "" for r in rows])


def classes_section(metrics: Any, metrics_note: str) -> Section:
    section = Section("classes", "Per-class IoU and ablation")
    if not isinstance(metrics, dict):
        section.note(f"per-class IoU and ablation: skipped, {metrics_note or 'metrics.json is not a JSON object'}")
        return section
    section.blocks.append("<h3>Per-class IoU</h3>")
    if "per_class" not in metrics:
        section.note("per-class IoU: skipped, metrics.json has no per_class key")
    else:
        names, rows, why = _per_class_rows(metrics["per_class"])
        if why:
            section.note(f"per-class IoU: skipped, {why}")
        else:
            section.blocks.append(per_class_plot(names, rows))
            header = ["class"] + [esc(ROW_STYLE.get(k, (k,))[0]) for k in rows]
            cells = [[esc(n)] + [esc(fmt(rows[k][i], ".1f")) for k in rows] for i, n in enumerate(names)]
            section.blocks.append(
                "<details><summary>per-class values (%)</summary>"
                + table(header, cells, [False] + [True] * len(rows))
                + "</details>"
            )
    section.blocks.append("<h3>Ablation</h3>")
    rows = metrics.get("ablation")
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    if not rows:
        section.note("ablation: skipped, metrics.json has no ablation rows")
    else:
        section.blocks.append(ablation_table(rows))
        section.blocks.append(ablation_plot(rows))
    return section


# --------------------------------------------------------------------------------------------------------------------
# Examples


def default_ids(paths: RunPaths, n: int = DEFAULT_NUM_IDS) -> list[str]:
    """The first ``n`` pseudo-label ids (PNG names under ``pseudo_labels/``, sorted)."""
    if not paths.pseudo_labels.is_dir():
        return []
    return sorted(p.stem for p in paths.pseudo_labels.glob("*.png"))[:n]


def render_examples(paths: RunPaths, ids: Sequence[str], height: int) -> np.ndarray:
    """``tools.visualize.render`` on the run's own config, with the work dir pointed at where the run is now."""
    from sp_cam.config import load_config

    visualize = importlib.import_module("tools.visualize")
    cfg = load_config(paths.config, [f"run.work_dir={paths.root}", "run.device=cpu"])
    return visualize.render(cfg, list(ids), height)


def examples_section(paths: RunPaths, ids: Sequence[str] | None, height: int) -> Section:
    section = Section("examples", "Examples")
    ids = list(ids) if ids else default_ids(paths)
    if not paths.config.is_file():
        section.note(f"example figure: skipped, no config.yaml ({paths.config})")
    elif not ids:
        section.note("example figure: skipped, no ids (no pseudo_labels/*.png; pass --ids)")
    else:
        try:
            figure = render_examples(paths, ids, height)
        except Exception as e:  # noqa: BLE001 - whatever stops the figure (a missing model...) must not stop the report
            log.debug("example figure failed", exc_info=True)
            reason = str(e).splitlines()[0] if str(e) else ""
            section.note(f"example figure: skipped, {type(e).__name__}: {reason}")
        else:
            caption = f"image / superpixels / CAM / SP-CAM / pseudo label / GT for {', '.join(ids)}."
            section.blocks.append(Plot("examples", array_png(figure), caption))
    figures = sorted((paths.root / "figures").glob("*.png"))
    if not figures:
        section.note("figures: none (no figures/*.png)")
    for path in figures:
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        caption = f"<figcaption>figures/{esc(path.name)}</figcaption>"
        section.blocks.append(f'<figure><img src="{uri}" alt="{esc(path.name)}">{caption}</figure>')
    return section


# --------------------------------------------------------------------------------------------------------------------
# Page


def render_block(block: str | Plot, png_dir: Path) -> str:
    if isinstance(block, str):
        return block
    uri = "data:image/png;base64," + base64.b64encode(block.png).decode("ascii")
    return (
        f'<figure id="plot-{esc(block.name)}"><img src="{uri}" alt="{esc(block.name)}">'
        f"<figcaption>{esc(block.caption)} <code>{esc(png_dir.name)}/{esc(block.name)}.png</code></figcaption></figure>"
    )


def build_sections(root: Path, ids: Sequence[str] | None = None, height: int = 160) -> tuple[list[Section], str]:
    """Every section of the report of the run in ``root``, and the page subtitle."""
    paths = RunPaths.from_work_dir(root)
    metrics, metrics_note = read_json(paths.metrics)
    header, subtitle = header_section(paths, metrics, metrics_note)
    sections = [
        header,
        curves_section(paths),
        sweep_section(paths, metrics),
        classes_section(metrics, metrics_note),
        examples_section(paths, ids, height),
    ]
    return sections, subtitle


def page(sections: Sequence[Section], subtitle: str, png_dir: Path) -> str:
    nav = "".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.anchor}"><h2>{esc(s.title)}</h2>\n'
        + "\n".join(render_block(b, png_dir) for b in s.blocks)
        + "\n</section>"
        for s in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>SP-CAM run report: {esc(subtitle)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<header><h1>SP-CAM run report</h1><p class="sub">{esc(subtitle)}</p></header>\n'
        f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_report(root: Path, out: Path, ids: Sequence[str] | None = None, height: int = 160) -> list[Path]:
    """Write the HTML report of the run in ``root`` to ``out`` and its plots beside it; returns the PNG paths."""
    sections, subtitle = build_sections(root, ids, height)
    png_dir = out.parent / out.stem
    written = []
    for section in sections:
        for plot in section.plots:
            path = png_dir / f"{plot.name}.png"
            atomic_write(path, lambda tmp, data=plot.png: tmp.write_bytes(data))
            written.append(path)
    atomic_write_text(out, page(sections, subtitle, png_dir))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="*", type=str, help="WORK_DIR, or with -c the section.key=value overrides")
    parser.add_argument("-c", "--config", type=str, default=None, help="the run's config file (its run.work_dir)")
    parser.add_argument("--out", type=Path, default=None, help=f"HTML file to write (default WORK_DIR/{REPORT_FILE})")
    parser.add_argument("--ids", type=str, nargs="+", default=None, help="ids of the example figure (default: the "
                        f"first {DEFAULT_NUM_IDS} pseudo labels)")  # fmt: skip
    parser.add_argument("--height", type=int, default=160, help="panel height of the example figure, in pixels")
    args = parser.parse_intermixed_args(argv)
    if args.config is not None:
        from sp_cam.config import ConfigError, load_config

        try:
            args.work_dir = Path(load_config(args.config, args.target).run.work_dir)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif len(args.target) == 1:
        args.work_dir = Path(args.target[0])
    else:
        parser.error("give WORK_DIR, or -c CONFIG [section.key=value ...]")
    if not args.work_dir.is_dir():
        print(f"error: work directory not found: {args.work_dir}", file=sys.stderr)
        return 2
    out = args.out or args.work_dir / REPORT_FILE
    try:
        pngs = write_report(args.work_dir, out, args.ids, args.height)
    except OSError as e:
        print(f"error: cannot write the report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {len(pngs)} plot(s) in {out.parent / out.stem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
