"""The guards of :mod:`sp_cam.guard` as the stages use them: what each stage's outputs are computed from (the
``inputs`` its DONE marker records and a re-run compares), and the start of a stage (its lock, ``--force``, stale
temporary files) on the one process that owns the folder.

Every stage's inputs have three parts:

    config    the config fields its outputs depend on, by section (how a stage logs, its loader workers, the device
              and the work dir are left out: they change no number)
    data      each split it reads (:func:`sp_cam.guard.list_digest`: the dataset folder, written relative to the work
              dir when inside it so that a moved run keeps its markers, and the sha256 of the list file)
    upstream  the sha256 of every weights file it reads (``model.pt`` of earlier stages, ``fcn.weights``, and
              ``fcn.init``, ``cam.pretrained``, ``spcam.pretrained``, ``seg.init`` when they are local files), and the
              DONE fingerprint of each stage whose files it reads (stage 1: step B's CAMs; stage 4: stage 3's labels)

Who owns a folder: the single process, rank 0 under torchrun (the other ranks wait for it), or every shard launched
by hand with ``--shard i/n`` (each with its own lock file, and without the clean-up of temporary files, which could
be another shard's file being written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from data.voc_layout import VOCLayout
from sp_cam import distributed as dist_utils
from sp_cam.config import Config
from sp_cam.guard import (
    LOCK_FILE,
    StageLock,
    done_fingerprint,
    file_digest,
    list_digest,
    remove_outputs,
    shard_lock_name,
)
from sp_cam.io import remove_stale_temporaries
from sp_cam.models import GT_LABELS, RANDOM_INIT, fcn_weights_path
from sp_cam.paths import LabelOutputs, RunPaths
from sp_cam.score_store import t_values, th_values

log = logging.getLogger(__name__)

WORK_DIR = "WORK_DIR"  # how a dataset folder inside the work dir is recorded
REPORTING = ("log_every", "tensorboard")  # how a stage reports, not what it computes
TRAIN_DATA = ("dataset", "saliency_dir", "train_split", "eval_split", "crop_size", "resize_long_min", "resize_long_max")
# seg fields only the evaluation (sp_cam.eval_seg) reads, and the pipeline's switches
SEG_EVAL = ("test_scales", "test_flip", "max_side", "crf", "crf_iterations", "crf_pos_w", "crf_pos_xy_std",
            "crf_bi_w", "crf_bi_xy_std", "crf_bi_rgb_std")  # fmt: skip
SEG_SWITCHES = ("enabled", "gt_reference", "train_split")
# stage 3: what a re-run brings up to date from the stored scores (re-selection, relabelling) instead of refusing
PSEUDO_RELABEL = ("config.labels",)
PSEUDO_FOLLOWS = ("config.labels", "config.scores")  # the seg.train_split pass follows the (t, th) of the first


class StageStoppedError(ValueError):
    """Rank 0 could not start the stage (its own error says why); the other ranks stop with this."""


# --------------------------------------------------------------------------------------------------------------------
# Parts


def _section(cfg: Config, name: str, keys: Sequence[str] | None = None, drop: Sequence[str] = ()) -> dict[str, Any]:
    values = dataclasses.asdict(getattr(cfg, name))
    return {k: v for k, v in values.items() if (keys is None or k in keys) and k not in drop}


def _common(cfg: Config, trains: bool = True) -> dict[str, Any]:
    """The toy settings (the toy set is generated from them); for a training stage also the seed and the evaluation
    convention of its in-training evaluation."""
    part: dict[str, Any] = {"run": {"seed": cfg.run.seed}, "eval": _section(cfg, "eval")} if trains else {}
    if cfg.data.dataset == "toy":
        part["toy"] = _section(cfg, "toy")
    return part


def split_identity(cfg: Config, layout: VOCLayout, split: str) -> dict[str, str]:
    """:func:`sp_cam.guard.list_digest` of ``split``, the root written as ``WORK_DIR/...`` when inside the work dir.

    The list is read first (:meth:`VOCLayout.ids`): an unsafe id stops the stage here, before it locks or writes.
    """
    layout.ids(split)
    digest = list_digest(layout, split)
    root, work = Path(digest["root"]), Path(cfg.run.work_dir).resolve()
    if root == work or work in root.parents:
        digest["root"] = str(Path(WORK_DIR) / root.relative_to(work))
    return digest


def local_file_digest(value: str) -> str | None:
    """sha256 of the local weights file a config value names (``fcn.init``, ``seg.init``, ``*.pretrained``); None
    for random initialisation, a named source, or a missing file (which the stage reports when it loads it)."""
    if value in RANDOM_INIT:
        return None
    path = Path(value).expanduser()
    return file_digest(path) if path.is_file() else None


def label_files_digest(folder: Path, ids: Sequence[str]) -> str:
    """sha256 over ``id:sha256`` of the label PNG of every id (``seg.labels=<folder>``; a missing file counts as
    empty: stage 4 names it when it checks the labels)."""
    h = hashlib.sha256()
    for image_id in ids:
        path = folder / f"{image_id}.png"
        h.update(f"{image_id}:{file_digest(path) if path.is_file() else ''}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# The inputs of each stage


def classifier_inputs(cfg: Config, model_type: str, layout: VOCLayout) -> dict[str, Any]:
    """Stage A (``cam``) or stage 2 (``spcam``): its section, the training data settings, the train (and eval) list;
    stage 2 also the superpixel FCN weights."""
    ccfg = getattr(cfg, model_type)
    data = {"train": split_identity(cfg, layout, cfg.data.train_split)}
    if ccfg.eval_every:
        data["eval"] = split_identity(cfg, layout, cfg.data.eval_split)
    upstream = {"pretrained": local_file_digest(ccfg.pretrained)}
    if model_type == "spcam":
        upstream["fcn"] = file_digest(fcn_weights_path(cfg))
    config = {
        model_type: _section(cfg, model_type, drop=REPORTING),
        "data": _section(cfg, "data", TRAIN_DATA),
        "fcn": _section(cfg, "fcn", ("cell_size",)),
        **_common(cfg),
    }
    return {"config": config, "data": data, "upstream": upstream}


def fcn_inputs(cfg: Config, layout: VOCLayout) -> dict[str, Any]:
    """Stage 1: its section, the training data settings, the train and eval lists, ``fcn.init`` and (when the
    affinity terms can switch on) the DONE fingerprint of step B's CAMs (None for CAMs made another way)."""
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    reads_cams = cfg.fcn.affinity_warmup < 1
    return {
        "config": {
            "fcn": _section(cfg, "fcn", drop=(*REPORTING, "weights")),
            "data": _section(cfg, "data", TRAIN_DATA),
            **_common(cfg),
        },
        "data": {
            "train": split_identity(cfg, layout, cfg.data.train_split),
            "eval": split_identity(cfg, layout, cfg.data.eval_split),
        },
        "upstream": {
            "init": local_file_digest(cfg.fcn.init),
            "cams": done_fingerprint(RunPaths.done(paths.cams)) if reads_cams else None,
        },
    }


def seg_train_split(cfg: Config) -> str:
    """The split stage 4 trains on: ``seg.train_split``, by default ``data.pseudo_split``."""
    return cfg.seg.train_split or cfg.data.pseudo_split


def seg_label_pass(cfg: Config) -> LabelOutputs:
    """The stage-3 pass whose labels stage 4 trains on (``seg.labels=""``): that of ``data.pseudo_split``, or the one
    of ``seg.train_split`` when it is another split."""
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    return paths.pseudo_outputs if seg_train_split(cfg) == cfg.data.pseudo_split else paths.seg_label_outputs


def seg_inputs(cfg: Config, layout: VOCLayout) -> dict[str, Any]:
    """Stage 4 training: its section (less what only the evaluation reads), the train and eval lists, ``seg.init`` and
    the labels: stage 3's DONE fingerprint, the digest of a label folder, or nothing for the GT masks."""
    split = seg_train_split(cfg)
    if cfg.seg.labels == GT_LABELS:
        labels = None
    elif cfg.seg.labels:
        labels = label_files_digest(Path(cfg.seg.labels).expanduser(), layout.ids(split))
    else:
        labels = done_fingerprint(seg_label_pass(cfg).done)
    eval_only = [k for k in SEG_EVAL if not (k == "max_side" and cfg.seg.select == "gt")]  # it picks the weights
    return {
        "config": {
            "seg": _section(cfg, "seg", drop=(*REPORTING, *eval_only, *SEG_SWITCHES)),
            "data": _section(cfg, "data", ("dataset",)),
            **_common(cfg),
        },
        "data": {"train": split_identity(cfg, layout, split), "eval": split_identity(cfg, layout, cfg.seg.eval_split)},
        "upstream": {"init": local_file_digest(cfg.seg.init), "labels": labels},
    }


def export_inputs(cfg: Config, layout: VOCLayout, weights: Path) -> dict[str, Any]:
    """Step B: the export settings, the train list and the baseline weights ``weights``."""
    return {
        "config": {
            "export": _section(cfg, "export"),
            "fcn": _section(cfg, "fcn", ("cell_size",)),
            "data": _section(cfg, "data", ("dataset",)),
            **_common(cfg, trains=False),
        },
        "data": {"train": split_identity(cfg, layout, cfg.data.train_split)},
        "upstream": {"cam": file_digest(weights)},
    }


def pseudo_weights(cfg: Config) -> dict[str, str | None]:
    """sha256 of the weights stage 3 reads: SP-CAM, the superpixel FCN and (with the ablation) the baseline CAM when
    it was trained."""
    paths = RunPaths.from_work_dir(cfg.run.work_dir)
    spcam, cam = RunPaths.model(paths.spcam), RunPaths.model(paths.cam)
    if not spcam.is_file():
        raise FileNotFoundError(f"SP-CAM weights not found: {spcam} (train stage 2 first: sp_cam.train_cls spcam)")
    return {
        "spcam": file_digest(spcam),
        "fcn": file_digest(fcn_weights_path(cfg)),
        "cam": file_digest(cam) if cfg.pseudo.ablation and cam.is_file() else None,
    }


def pseudo_inputs(cfg: Config, layout: VOCLayout, weights: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Stage 3 on ``data.pseudo_split``. ``config.scores``: what the stored scores depend on (with the dataset folder
    and the weights: the per-file signature); ``config.labels``: what only the selection and the PNGs depend on."""
    p = cfg.pseudo
    scores = {
        "scales": [float(s) for s in p.scales],
        "flip": p.flip,
        "t_list": t_values(p),
        "th_list": th_values(p),
        "upsample": p.upsample,
        "renormalize_asam": p.renormalize_asam,
        "ablation": p.ablation,
        "max_side": p.max_side,
        "cell_size": cfg.fcn.cell_size,
    }
    labels = {"select": p.select, "t": p.t, "th": p.th, "ignore_band": p.ignore_band, "save_scores": p.save_scores,
              "absent": cfg.eval.absent}  # fmt: skip
    return {
        "config": {
            "scores": scores,
            "labels": labels,
            "data": _section(cfg, "data", ("dataset",)),
            **_common(cfg, trains=False),
        },
        "data": {"pseudo": split_identity(cfg, layout, cfg.data.pseudo_split)},
        "upstream": pseudo_weights(cfg) if weights is None else dict(weights),
    }


def seg_eval_inputs(cfg: Config, layout: VOCLayout, split: str, weights: Path, modes: Sequence[str]) -> dict[str, Any]:
    """Stage 4 evaluation of ``split``: the inference settings, the modes that run, the list and the weights."""
    return {
        "config": {
            "seg": _section(cfg, "seg", SEG_EVAL),
            "modes": list(modes),
            "data": _section(cfg, "data", ("dataset",)),
            "eval": _section(cfg, "eval"),
            **_common(cfg, trains=False),
        },
        "data": {split: split_identity(cfg, layout, split)},
        "upstream": {"model": file_digest(weights)},
    }


# --------------------------------------------------------------------------------------------------------------------
# Starting a stage


@contextlib.contextmanager
def claim(
    cfg: Config,
    folder: Path,
    label: str,
    owner: bool = True,
    lock_name: str = LOCK_FILE,
    force: Sequence[Path] = (),
    clean: Sequence[Path] = (),
    device: torch.device | None = None,
) -> Iterator[None]:
    """Hold the lock of ``folder`` for the ``with`` block; on entering, remove the ``--force`` outputs ``force`` and
    the stale temporary files of the folders ``clean``.

    Args:
        owner: whether this process owns the folder (see the module docstring); the others neither lock nor remove.
        device: this process's device, under torchrun: every rank waits for rank 0, and stops when it failed.
    Raises:
        StageLockedError: another run holds the lock (one line naming it).
        StageStoppedError: on the other ranks, when rank 0 could not start.
    """
    with contextlib.ExitStack() as held:
        failure: ValueError | OSError | None = None
        if owner:
            try:
                held.enter_context(StageLock(folder, label, lock_name=lock_name))
                for path in remove_outputs(cfg.run.work_dir, force):
                    log.info("%s: --force: removed %s", label, path)
                for path in (p for f in clean for p in remove_stale_temporaries(f)):
                    log.info("%s: removed %s, left by a process killed while writing it", label, path)
            except (ValueError, OSError) as e:  # the lock is taken, or a file cannot go: re-raised below
                failure = e
        if device is not None and dist_utils.is_initialized():
            stopped = dist_utils.any_rank(failure is not None, device)
            if stopped and failure is None:
                raise StageStoppedError(f"{label}: rank 0 could not start the stage (its error says why)")
        if failure is not None:
            raise failure
        yield


def owns_folder(is_main: bool, shard: tuple[int, int] | None) -> bool:
    """Whether this process owns the folder of a command that also runs as shards launched by hand."""
    return is_main or shard is not None


def claim_shard(
    cfg: Config,
    folder: Path,
    label: str,
    shard: tuple[int, int] | None,
    is_main: bool,
    outputs: Sequence[Path],
    force: bool,
    device: torch.device,
    clean: Sequence[Path] | None = None,
) -> contextlib.AbstractContextManager[None]:
    """:func:`claim` for a command that also runs as shards launched by hand (``--shard i/n``, see the module
    docstring): without ``shard`` rank 0 owns ``folder`` and removes the stale temporary files of ``clean`` (default
    ``outputs``); with it, every shard owns it under its own lock file and cleans nothing (another shard's temporary
    file may be one being written). ``force`` removes ``outputs`` (the command refuses it with ``shard``
    beforehand)."""
    removed = outputs if force else []
    if shard is None:
        return claim(cfg, folder, label, is_main, LOCK_FILE, removed, outputs if clean is None else clean, device)
    return claim(cfg, folder, label, owns_folder(is_main, shard), shard_lock_name(shard), removed, [], device)
