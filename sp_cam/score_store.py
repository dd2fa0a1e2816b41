"""Stage-3 per-image score files (``WORK_DIR/pseudo/scores/<id>.npz``): the one owner of their format.

Written by :mod:`sp_cam.make_pseudo`, read by it, by :mod:`sp_cam.ablation` and by the tools. No pickle. Keys:

    classes     (n,) int16       present foreground classes 1..K, ascending
    size        (2,) int32       (H0, W0) of the image
    t_list      (T,) int32       walk steps, ascending
    th_list     (TH,) float32    background thresholds, ascending, rounded to ``TH_DECIMALS``
    upsample    str              the upsampling mode of ``scores`` (psam | bilinear)
    signature   str              the settings and weights the file was computed with (JSON); another one = stale
    scores      (T, n, H0, W0) float16 in [0, 1]: fused scores of the present classes for every t

and where the image has GT, the confusion matrices ((K+1) x (K+1) int64, rows GT) of the labels made from the
float16 scores:

    conf_<mode>   (T, TH, K+1, K+1) for each upsampling mode computed (the main one; the other with the ablation)
    conf_cam      (TH, K+1, K+1)    baseline CAM, bilinear (ablation)
    conf_grid_ub  (K+1, K+1)        every 16-px cell labelled by its GT majority (ablation)
    conf_sp_ub    (K+1, K+1)        every FCN superpixel labelled by its GT majority (ablation)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sp_cam.config import PseudoConfig
from sp_cam.io import NPZ_ERRORS, atomic_write, read_npz
from sp_cam.paths import RunPaths

TH_DECIMALS = 6  # th values are rounded for use as keys (np.arange-style float noise, docs/method.md §4)


def t_values(pcfg: PseudoConfig) -> list[int]:
    """The swept walk steps, unique and sorted (the ``t_list`` of a scores file)."""
    return sorted(set(int(t) for t in pcfg.t_list))


def th_values(pcfg: PseudoConfig) -> list[float]:
    """The swept thresholds, rounded and sorted (the ``th_list`` of a scores file)."""
    return sorted(set(round(float(th), TH_DECIMALS) for th in pcfg.th_list))


def save_scores(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic ``np.savez_compressed`` of one image's entries."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def load_scores(path: Path) -> dict[str, np.ndarray]:
    """Every entry of a scores file.

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: an empty, truncated or damaged file (one line naming it).
    """
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path} (run the score phase of sp_cam.make_pseudo)")
    return read_npz(path, what="scores file")


def has_signature(path: Path, signature: str) -> bool:
    """A finished scores file made with the settings ``signature``.

    False for a missing, empty, truncated or damaged file as for one of other settings: the stage recomputes it.
    (Only the signature entry is decompressed; truncation is caught as the archive's directory sits at its end.)
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["signature"]) == signature
    except (*NPZ_ERRORS, TypeError):  # TypeError: a bare .npy array, which is no context manager
        return False


def fused_at(arrays: dict[str, np.ndarray], t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (n,) int64, fused (n, H0, W0) float32) of a loaded scores file at walk step ``t``."""
    ts = arrays["t_list"].tolist()
    if t not in ts:
        raise ValueError(f"t={t} is not among the stored walk steps {ts}")
    fused = torch.from_numpy(arrays["scores"][ts.index(t)].astype(np.float32))
    return torch.from_numpy(arrays["classes"].astype(np.int64)), fused


def sum_confusions(
    paths: RunPaths, ids: Sequence[str], keys: Sequence[str], progress: bool = False
) -> dict[str, tuple[np.ndarray | None, int]]:
    """Sum the stored per-image matrices of each key over ``ids`` in one pass over the files.

    Returns:
        {key: (sum, or None when no image has the key; number of images that have it)}.
    Raises:
        FileNotFoundError: a scores file is missing.
        DamagedFileError: a scores file is damaged (one line naming it).
    """
    totals: dict[str, tuple[np.ndarray | None, int]] = {k: (None, 0) for k in keys}
    for image_id in tqdm(ids, desc="confusion matrices", unit="img", disable=not progress):
        path = paths.scores_file(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"scores file not found: {path} (run sp_cam.make_pseudo first)")
        for key, value in read_npz(path, keys, what="scores file", required=False).items():
            c = value.astype(np.int64)
            total, count = totals[key]
            totals[key] = (c if total is None else total + c, count + 1)
    return totals
