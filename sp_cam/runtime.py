"""Process-level helpers shared by the stages: device choice, seeding, logging, RNG state for checkpoints."""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sp_cam.guard import changed_keys
from sp_cam.io import cannot_write, describe_load_error

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """Turn ``run.device`` into a device.

    Args:
        name: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: the GPU index used by ``auto``/``cuda`` under torchrun (one process per GPU).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"run.device={name!r} but CUDA is not available; use run.device=cpu or auto")
        if name == "cuda":
            return torch.device("cuda", local_rank)
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"run.device={name!r}: expected auto, cpu, cuda or cuda:N") from None
        if index >= torch.cuda.device_count():
            raise ValueError(f"run.device={name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise ValueError(f"run.device={name!r}: expected auto, cpu, cuda or cuda:N")


def weight_layout(device: torch.device | str) -> torch.memory_format:
    """The memory layout of the networks' 4-D weights, and so of their activations, on ``device``.

    ``channels_last`` on the CPU, where oneDNN runs convolutions (the backbones' depthwise ones above all) faster in
    it: 1.2-1.6x per toy training step, 1.4x per stage-3 image (``python -m tools.benchmark --sections layout``).
    PyTorch's default layout on other devices. A layout changes the order of floating-point sums, not the maths.
    """
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def place_model(module: nn.Module, device: torch.device | str, layout: torch.memory_format | None = None) -> nn.Module:
    """``module`` moved to ``device`` in ``layout``, by default that device's :func:`weight_layout` (in place);
    returns it."""
    return module.to(device=device, memory_format=weight_layout(device) if layout is None else layout)


def configure_threads(num_threads: int) -> None:
    """Set torch's intra-op CPU threads (``run.num_threads``); 0 keeps torch's default."""
    if num_threads < 0:
        raise ValueError(f"run.num_threads must be >= 0, got {num_threads}")
    if num_threads:
        torch.set_num_threads(num_threads)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (e.g. run seed, epoch, rank), independent streams for each tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(level: str = "INFO", log_file: str | Path | None = None, rank: int | None = None) -> None:
    """Configure the root logger once per process.

    Ranks other than 0 (``RANK`` from torchrun when ``rank`` is None) log warnings and errors only, so a multi-GPU run
    prints one stream. ``log_file`` (rank 0 only) receives the same records.

    Raises:
        CannotWriteError: the log file cannot be created (read-only work dir, no permission, a file in the way).
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"run.log_level={level!r}: expected DEBUG, INFO, WARNING or ERROR")
    if rank != 0:
        numeric = max(numeric, logging.WARNING)
    fmt = LOG_FORMAT if rank == 0 else f"[rank {rank}] {LOG_FORMAT}"
    root = logging.getLogger()
    root.setLevel(numeric)
    formatter = logging.Formatter(fmt, LOG_DATE_FORMAT)
    if not any(getattr(h, "_spcam", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._spcam = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for h in root.handlers:
        if getattr(h, "_spcam", False):
            h.setFormatter(formatter)
    if log_file is not None and rank == 0:
        log_file = Path(log_file).resolve()
        if not any(getattr(h, "baseFilename", None) == str(log_file) for h in root.handlers):
            try:
                log_file.parent.mkdir(parents=True, exist_ok=True)
                fh = logging.FileHandler(log_file)
            except OSError as e:  # a read-only or full work dir: one line, before any stage work
                raise cannot_write(log_file, e) from None
            fh.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
            root.addHandler(fh)


def remove_file_logging(log_file: str | Path) -> None:
    """Detach and close the handler that :func:`setup_logging` added for ``log_file``."""
    root = logging.getLogger()
    target = str(Path(log_file).resolve())
    for h in list(root.handlers):
        if getattr(h, "baseFilename", None) == target:
            root.removeHandler(h)
            h.close()


def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors and plain numbers (savable with ``torch.save``, loadable weights-only)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    missing = {"torch", "cuda", "numpy", "python"} - set(state)
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}")
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        else:
            logging.getLogger(__name__).warning(
                "checkpoint holds CUDA RNG states for %d devices, %d visible: CUDA RNG not restored",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))


def restore_model_and_optimizer(
    ckpt: dict[str, Any],
    path: Path,
    inputs: Mapping[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stage: str,
    allow_change: bool = False,
) -> None:
    """Load ``ckpt["model"]`` and ``ckpt["optimizer"]`` for a resumed run, refusing one whose inputs changed.

    Args:
        inputs: what the stage computes from now (:mod:`sp_cam.stage_guard`), compared with ``ckpt["inputs"]``; for a
            checkpoint of an older version, without them, ``inputs["config"]`` is compared with ``ckpt["config"]``.
        stage: the stage's name, for the message.
        allow_change: ``run.allow_config_change``: resume anyway, with a warning.
    Raises:
        ValueError naming ``path``: the inputs changed (``"<path>: resuming <stage> with other inputs than it was
        started with (key: old -> new; ...); set run.allow_config_change=true to resume anyway, or start afresh with a
        new run.work_dir or --force <stage>"``), or the weights or optimizer state do not fit.
    """
    saved = ckpt.get("inputs")
    if isinstance(saved, Mapping):
        changed = changed_keys(saved, inputs)
    else:
        now = inputs.get("config", {})
        old = ckpt.get("config", {})
        saved_config = {s: {k: old.get(s, {}).get(k) for k in keys} for s, keys in now.items()}
        changed = [f"config.{c}" for c in changed_keys(saved_config, now)]
    if changed and not allow_change:
        raise ValueError(
            f"{path}: resuming {stage} with other inputs than it was started with ({'; '.join(changed)}); set "
            f"run.allow_config_change=true to resume anyway, or start afresh with a new run.work_dir or --force {stage}"
        )
    if changed:
        logging.getLogger(__name__).warning(
            "%s: resuming with other inputs than the checkpoint's (run.allow_config_change=true): %s",
            path, "; ".join(changed),
        )  # fmt: skip
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: does not fit this model/config ({describe_load_error(e)})") from None
