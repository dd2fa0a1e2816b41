"""The training engine of every training stage: stage 1 (superpixel FCN), stages A and 2 (classifiers), stage 4
(segmentation network).

A stage opens itself with :func:`open_stage`, builds its network, optimizer, scheduler and training set, and hands them
to :func:`fit` with a :class:`Task`: what is its own (the loss of one micro-batch, the evaluation, the final-weights
file). The engine owns the rest:

* the epoch loop; a seeded ``DistributedSampler`` (also with one process), so global step k of an epoch takes the
  images ``perm[k*B:(k+1)*B]`` of that epoch's permutation whatever the number of processes; ``batch`` is the global
  batch of one optimizer step, split over the processes and ``grad_accum`` micro-batches; one DataLoader for the
  whole run, its worker processes kept from epoch to epoch (the epoch travels with each index);
* DistributedDataParallel under torchrun (gradients all-reduced once per optimizer step), AMP (bf16 autocast, or fp16
  with loss scaling, CUDA only), the non-finite-loss stop (:class:`TrainingDivergedError`, nothing stepped);
* every epoch a full checkpoint ``last.pt`` (model, optimizer, scheduler, scaler, epoch, step, RNG states, config,
  selection state), written atomically by rank 0; a re-run resumes from it and ends with the weights of an
  uninterrupted run (exactly, on CPU): augmentations are a pure function of (seed, epoch, index) and the global RNGs
  are re-seeded from (seed, epoch, rank) at every epoch;
* a run of ``epochs`` passes, or of ``max_steps`` optimizer steps (the last epoch cut short);
* evaluation every ``eval_every`` epochs and after the last, or every ``eval_every_steps`` steps and after the last
  (the task's, collective over the processes);
* selection: ``select: gt`` keeps the weights of the best evaluation in ``best.pt`` and makes them the final weights;
  a later evaluation replaces the best only when its ``miou`` is strictly higher, so **a tie keeps the earlier
  epoch**; ``select: last`` keeps the last epoch;
* the stage's guards (:mod:`sp_cam.stage_guard`): the stage lock held by rank 0 for the whole run, ``--force``, the
  clean-up of temporary files a killed run left; ``DONE`` records the stage's inputs (config fields, split lists,
  upstream digests), a re-run for other inputs is refused with one line, and so is a resume from a ``last.pt`` of
  other inputs (unless ``run.allow_config_change``); ``config.yaml`` is written once these checks passed;
* rank-0 logging, JSON-lines records (``metrics.jsonl``: ``train`` every ``log_every`` steps, ``epoch``, ``eval``,
  ``resume``), an optional TensorBoard writer, a progress bar with the time left.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from data.voc_layout import VOCLayout
from sp_cam import distributed as dist_utils
from sp_cam.config import Config, ConfigError, config_to_dict, save_config
from sp_cam.guard import check_done, write_done
from sp_cam.io import append_jsonl, load_checkpoint, save_checkpoint
from sp_cam.open_data import open_dataset
from sp_cam.paths import RunPaths
from sp_cam.runtime import (
    configure_threads,
    derive_seed,
    restore_model_and_optimizer,
    rng_state,
    seed_everything,
    set_rng_state,
)
from sp_cam.stage_guard import claim

log = logging.getLogger(__name__)

PRECISION_NAMES = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped without touching the last good checkpoint."""


# --------------------------------------------------------------------------------------------------------------------
# Opening a stage


@dataclass(frozen=True)
class Stage:
    """An opened training stage of a run.

    Attributes:
        name: the stage folder and checkpoint tag (``cam``, ``spcam``, ``fcn``).
        label: the log prefix (``cam``, ``stage 1``, ...).
        section: the config section of the stage's hyper-parameters (``cam``, ``spcam``, ``fcn``).
        layout: the dataset of the run.
        inputs: what the stage's outputs are computed from (:mod:`sp_cam.stage_guard`): recorded in ``DONE`` and in
            every checkpoint, compared on resume.
    """

    cfg: Config
    name: str
    label: str
    section: str
    dir: Path
    info: dist_utils.DistInfo
    device: torch.device
    layout: VOCLayout
    inputs: dict[str, Any]

    @property
    def is_main(self) -> bool:
        return self.info.is_main


@contextlib.contextmanager
def open_stage(
    cfg: Config,
    name: str,
    label: str,
    inputs: Callable[[VOCLayout], dict[str, Any]],
    section: str | None = None,
    force: bool = False,
) -> Iterator[Stage | None]:
    """Open training stage ``name`` for the ``with`` block: ``with open_stage(...) as stage: ...``.

    Configures the threads, joins the process group (under torchrun), opens the dataset and computes the stage's
    ``inputs(layout)``; then rank 0 takes the stage lock (held to the end of the block), removes the stage folder's
    content with ``force`` and the temporary files a killed run left. Yields None (and logs a line) when ``DONE`` was
    written for the same inputs.

    Raises:
        StageLockedError: another run of the stage holds its folder.
        StaleOutputError: ``DONE`` was written for other inputs (one line naming the changed keys).
    """
    sdir = RunPaths.from_work_dir(cfg.run.work_dir).stage(name)
    configure_threads(cfg.run.num_threads)
    info, device = dist_utils.init_distributed(cfg.run.device)
    layout = dist_utils.main_first(lambda: open_dataset(cfg))  # a toy set is generated once, by rank 0
    expected = inputs(layout)
    with claim(cfg, sdir, label, owner=info.is_main, force=[sdir] if force else [], clean=[sdir], device=device):
        if check_done(RunPaths.done(sdir), expected, stage=name):
            log.info("%s: %s exists, stage already finished (%s)", label, RunPaths.done(sdir), RunPaths.model(sdir))
            yield None
            return
        if info.is_main:
            sdir.mkdir(parents=True, exist_ok=True)
        yield Stage(cfg, name, label, section or name, sdir, info, device, layout, expected)


# --------------------------------------------------------------------------------------------------------------------
# What a stage brings


@dataclass(frozen=True)
class Schedule:
    """How a stage trains (every field comes from the stage's config section).

    Attributes:
        epochs: passes over the training set (ignored when ``max_steps`` is set).
        batch_size: global batch of one optimizer step (split over processes and micro-batches).
        grad_accum: micro-batches per optimizer step.
        max_steps: train exactly this many optimizer steps (iterations) instead of ``epochs`` passes; 0 = epochs.
        eval_every: evaluate every N epochs and after the last; 0 = never.
        eval_every_steps: evaluate every N optimizer steps and after the last (``eval`` records); 0 = never.
        eval_initial: also evaluate the initial weights (recorded, never selected).
        select: ``gt`` (best evaluation, ties keep the earlier) or ``last``.
        amp: ``none``, ``bf16`` or ``fp16`` (CUDA only; float32 elsewhere, with a warning).
        shuffle: draw a new permutation every epoch (else the list order).
    """

    epochs: int
    batch_size: int
    grad_accum: int = 1
    max_steps: int = 0
    eval_every: int = 1
    eval_every_steps: int = 0
    eval_initial: bool = False
    select: str = "last"
    amp: str = "none"
    shuffle: bool = True
    log_every: int = 10
    tensorboard: bool = False


@dataclass
class StepContext:
    """Passed to :meth:`Task.loss`: where the step is and how to run the forward."""

    epoch: int  # 0-based epoch of the step
    step: int  # 0-based global optimizer step being computed
    device: torch.device
    amp_dtype: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward of the trained network (a no-op in float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


class Task:
    """The stage's own part of a training run; subclass and override :meth:`loss` and :meth:`final_payload`."""

    def loss(
        self, model: nn.Module, batch: dict[str, Any], ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch (a scalar to back-propagate) and detached scalar terms to log."""
        raise NotImplementedError

    def step_record(self, step: int) -> dict[str, Any]:
        """Extra fields of the ``train`` record of 0-based global step ``step``."""
        return {}

    def evaluate(self, net: nn.Module) -> dict[str, Any] | None:
        """Evaluate the unwrapped network on every process (collective); None when there is nothing to score.

        For ``select: gt`` the result must hold ``miou``. Scalar values are recorded and kept with the selection.
        """
        return None

    def describe(self, result: dict[str, Any]) -> str:
        """The evaluation part of the epoch log line."""
        return f"eval mIoU {result['miou']:.2f}" if "miou" in result else ""

    def checkpoint_tag(self) -> dict[str, Any]:
        """Extra entries of every training checkpoint (e.g. the model type)."""
        return {}

    def final_payload(self, weights: dict[str, torch.Tensor], selection: Selection) -> dict[str, Any]:
        """The content of the final-weights file ``model.pt``."""
        raise NotImplementedError


@dataclass
class Selection:
    """The outcome of training: the rule, the selected epoch's metrics and the run's first evaluation."""

    rule: str  # gt | last
    metrics: dict[str, Any]  # epoch plus the scalar evaluation results of that epoch (if it was evaluated)
    initial: dict[str, Any] = field(default_factory=dict)  # evaluation of the initial weights (eval_initial)


# --------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class _State:
    """What the loop mutates and the checkpoint holds; ``model`` (what the task's loss calls) is ``net`` or a module
    around it (a training view, a DDP wrapper); ``net`` is what is evaluated and saved."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best: dict[str, Any] = field(default_factory=dict)  # metrics of the best evaluated epoch
    last_eval: dict[str, Any] = field(default_factory=dict)  # metrics of the latest evaluation
    initial: dict[str, Any] = field(default_factory=dict)  # evaluation of the initial weights


def amp_settings(amp: str, device: torch.device, section: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler) of ``<section>.amp``."""
    if amp == "none":
        return None, False
    if device.type != "cuda":
        log.warning("%s.amp=%s is for CUDA only: training in float32 on %s", section, amp, device)
        return None, False
    if amp == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def format_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}


class _EpochSampler(DistributedSampler):
    """``(epoch, index)`` pairs of the ``DistributedSampler`` order of the epoch last set by ``set_epoch``."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in super().__iter__())


class _EpochItems(Dataset):
    """``(epoch, index) -> dataset[index]`` of that epoch: the epoch travels with the index to the loader's
    long-lived worker processes, whose copies of the dataset never see the main process's ``set_epoch``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


class _Trainer:
    def __init__(
        self,
        stage: Stage,
        state: _State,
        train_set: Dataset,
        task: Task,
        schedule: Schedule,
        amp_dtype: torch.dtype | None,
    ) -> None:
        self.stage = stage
        self.state = state
        self.train_set = train_set
        self.task = task
        self.schedule = schedule
        cfg, info = stage.cfg, stage.info
        self.micro_batch = dist_utils.micro_batch_size(
            schedule.batch_size, info.world_size, schedule.grad_accum, stage.section
        )
        self.steps_per_epoch = len(train_set) // schedule.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"split {cfg.data.train_split!r} has {len(train_set)} images, fewer than "
                f"{stage.section}.batch_size={schedule.batch_size}"
            )
        if schedule.max_steps:
            self.total_steps = schedule.max_steps
            self.epochs = -(-schedule.max_steps // self.steps_per_epoch)
        else:
            self.total_steps = schedule.epochs * self.steps_per_epoch
            self.epochs = schedule.epochs
        self.amp_dtype = amp_dtype
        self.metrics_path = RunPaths.metrics_log(stage.dir)
        self.writer = self._open_writer() if stage.is_main else None

    # ------------------------------------------------------------------------------------------------ data

    def _loader(self) -> DataLoader:
        """The training loader of the whole run, its worker processes kept from epoch to epoch: a fork per epoch makes
        the first step of every epoch copy the training process's memory page by page (measured: 4.4 s instead of
        1.0 s for the toy stage A on 2 CPU cores). Items carry their epoch (:class:`_EpochItems`)."""
        info = self.stage.info
        sampler = _EpochSampler(
            self.train_set,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=self.schedule.shuffle,
            seed=self.stage.cfg.run.seed,
            drop_last=True,
        )
        workers = self.stage.cfg.data.num_workers
        return DataLoader(
            _EpochItems(self.train_set),
            batch_size=self.micro_batch,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.stage.cfg.run.seed),  # the global RNGs stay the training's
            drop_last=True,
            pin_memory=self.stage.device.type == "cuda",
        )

    # --------------------------------------------------------------------------------------------- records

    def _open_writer(self) -> Any:
        if not self.schedule.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard=true but the tensorboard package is not installed: logging to metrics.jsonl only")
            return None
        return SummaryWriter(log_dir=str(RunPaths.tensorboard(self.stage.dir)))

    def _record(self, record: dict[str, Any], prefix: str = "") -> None:
        """Append a metrics record (rank 0) and mirror its numbers to TensorBoard."""
        if not self.stage.is_main:
            return
        append_jsonl(self.metrics_path, record)
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}{key}", value, record["step"])

    # ------------------------------------------------------------------------------------------ checkpoints

    def _checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "stage": self.stage.name,
            **self.task.checkpoint_tag(),
            "model": s.net.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict() if s.scheduler is not None else None,
            "scaler": s.scaler.state_dict() if s.scaler is not None else None,
            "epoch": s.epoch,
            "step": s.step,
            "rng": rng_state(),
            "config": config_to_dict(self.stage.cfg),
            "inputs": self.stage.inputs,
            "best": dict(s.best),
            "last_eval": dict(s.last_eval),
            "initial": dict(s.initial),
        }

    def resume(self, path: Path) -> None:
        """Restore the full training state from ``last.pt``."""
        s, stage = self.state, self.stage
        ckpt = load_checkpoint(path)
        found = ckpt.get("stage")
        if found != stage.name:
            what = (
                "not a training checkpoint (no 'stage' entry)" if found is None else f"a checkpoint of stage {found!r}"
            )
            raise ValueError(
                f"{path}: {what}, not of {stage.name!r} (remove it, or --force {stage.name}, to start afresh)"
            )
        restore_model_and_optimizer(
            ckpt, path, stage.inputs, s.net, s.optimizer, stage.name, stage.cfg.run.allow_config_change
        )
        if s.scheduler is not None and ckpt.get("scheduler"):
            s.scheduler.load_state_dict(ckpt["scheduler"])
        if s.scaler is not None and ckpt.get("scaler"):
            s.scaler.load_state_dict(ckpt["scaler"])
        s.epoch, s.step = int(ckpt["epoch"]), int(ckpt["step"])
        s.best = dict(ckpt.get("best") or {})
        s.last_eval = dict(ckpt.get("last_eval") or {})
        s.initial = dict(ckpt.get("initial") or {})
        set_rng_state(ckpt["rng"])
        log.info("%s: resumed from %s after epoch %d (step %d)", stage.label, path, s.epoch, s.step)
        self._record({"kind": "resume", "epoch": s.epoch, "step": s.step})

    # ------------------------------------------------------------------------------------------- evaluation

    def _evaluate(self) -> dict[str, Any] | None:
        dist_utils.broadcast_buffers(self.state.net)  # every rank evaluates the weights rank 0 saves
        return self.task.evaluate(self.state.net)

    def _update_best(self, result: dict[str, Any]) -> None:
        """Record an evaluation; on a new best ``miou`` also write its weights to ``best.pt`` (select=gt)."""
        s = self.state
        s.last_eval = {"epoch": s.epoch, **_scalars(result)}
        if "miou" not in result:
            return
        if s.best and not result["miou"] > s.best.get("miou", -float("inf")):
            return  # a tie keeps the earlier evaluation
        s.best = dict(s.last_eval)
        if self.stage.is_main and self.schedule.select == "gt":
            # before last.pt: a crash in between redoes the epoch and rewrites the same file
            save_checkpoint(RunPaths.best_checkpoint(self.stage.dir), {"model": s.net.state_dict(), "metrics": s.best})

    # ---------------------------------------------------------------------------------------------- training

    def _check_finite(self, step_loss: torch.Tensor, epoch: int, step_in_epoch: int) -> None:
        bad = not bool(torch.isfinite(step_loss).all())
        if dist_utils.any_rank(bad, self.stage.device):
            raise TrainingDivergedError(
                f"{self.stage.label}: non-finite loss ({float(step_loss):.4g} on this process) at epoch {epoch + 1}, "
                f"step {step_in_epoch}/{self.steps_per_epoch} (global step {self.state.step + 1}); training stopped "
                f"before the update, the last good checkpoint (after epoch {epoch}) is kept. Lower the learning rate, "
                f"or use amp=none/bf16"
            )

    def train_one_epoch(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        """``steps_per_epoch`` optimizer steps (fewer in a last epoch cut by ``max_steps``) of ``grad_accum``
        micro-batches each; ``state.step`` advances."""
        s, stage, schedule = self.state, self.stage, self.schedule
        accum, epoch = schedule.grad_accum, s.epoch
        steps = min(self.steps_per_epoch, self.total_steps - s.step)
        device = stage.device
        s.model.train()
        s.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        step_loss = torch.zeros((), device=device)
        step_parts: dict[str, torch.Tensor] = {}
        done = 0
        start = time.time()
        desc = f"{stage.label} epoch {epoch + 1}/{self.epochs}"
        bar = tqdm(total=steps, desc=desc, unit="step", disable=not stage.is_main, dynamic_ncols=True, leave=False)
        try:
            for micro in range(steps * accum):
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"the training loader ended after {micro} of {steps * accum} micro-batches")
                last_micro = micro % accum == accum - 1
                sync = contextlib.nullcontext()
                if not last_micro and isinstance(s.model, DistributedDataParallel):
                    sync = s.model.no_sync()  # all-reduce the gradients once per optimizer step
                ctx = StepContext(epoch, s.step, device, self.amp_dtype)
                with sync:
                    loss, parts = self.task.loss(s.model, batch, ctx)
                    scaled = loss / accum
                    (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
                step_loss += loss.detach() / accum
                for key, value in parts.items():
                    step_parts[key] = step_parts.get(key, torch.zeros((), device=device)) + value.detach() / accum
                if not last_micro:
                    continue
                self._check_finite(step_loss, epoch, micro // accum + 1)
                if s.scaler is not None:
                    s.scaler.step(s.optimizer)
                    s.scaler.update()
                else:
                    s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
                group = s.optimizer.param_groups[0]
                lr = group["lr"] / group.get("lr_mult", 1.0)
                if s.scheduler is not None:
                    s.scheduler.step()
                s.step += 1
                done += 1
                names = ["loss", *step_parts]
                values = dist_utils.all_reduce_mean(torch.stack([step_loss, *step_parts.values()])).tolist()
                logged = dict(zip(names, values, strict=True))
                step_loss.zero_()
                step_parts = {}
                for key, v in logged.items():
                    sums[key] = sums.get(key, 0.0) + v
                elapsed = time.time() - start
                ips = done * schedule.batch_size / max(elapsed, 1e-9)
                eta = elapsed / done * (self.total_steps - s.step)  # training time left in the run (no evaluation)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}", eta=format_time(eta))
                bar.update(1)
                if s.step % schedule.log_every == 0 or done == steps:
                    record = {"kind": "train", "epoch": epoch + 1, "step": s.step, **logged, "lr": lr}
                    record.update(images_per_s=ips, **self.task.step_record(s.step - 1))
                    self._record(record, prefix="train/")
                every = schedule.eval_every_steps
                if every and (s.step % every == 0 or s.step == self.total_steps):
                    self._evaluate_at_step(epoch)
        finally:
            bar.close()
        elapsed = time.time() - start
        stats = {k: v / max(done, 1) for k, v in sums.items()}
        stats.update(images_per_s=done * schedule.batch_size / max(elapsed, 1e-9), seconds=elapsed)
        return stats

    def _evaluate_at_step(self, epoch: int) -> None:
        """An evaluation in the middle of an epoch (``eval_every_steps``): an ``eval`` record and the selection."""
        s = self.state
        result = self._evaluate()
        s.model.train()
        if result is None:
            return
        self._update_best(result)
        self._record(
            {"kind": "eval", "epoch": epoch + 1, "step": s.step, **{f"eval_{k}": v for k, v in result.items()}}
        )
        if self.stage.is_main:
            log.info("%s step %d/%d: %s", self.stage.label, s.step, self.total_steps, self.task.describe(result))

    def _epoch_line(self, record: dict[str, Any], result: dict[str, Any] | None) -> str:
        parts = ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in record.items() if k.startswith("loss_"))
        line = f"{self.stage.label} epoch {record['epoch']}/{self.epochs}: loss {record['loss']:.4f}"
        line += f" ({parts})" if parts else ""
        line += f", {record['images_per_s']:.1f} img/s"
        if result is not None:
            line += f"; {self.task.describe(result)}"
        return line

    def run(self) -> None:
        s, stage, schedule = self.state, self.stage, self.schedule
        info = stage.info
        log.info(
            "%s: %d images, %d steps/epoch x %d epochs, batch %d = %d process(es) x %d micro-batch(es) x %d, "
            "device %s, precision %s",
            stage.label,
            len(self.train_set),
            self.steps_per_epoch,
            self.epochs,
            schedule.batch_size,
            info.world_size,
            schedule.grad_accum,
            self.micro_batch,
            stage.device,
            PRECISION_NAMES[self.amp_dtype],
        )
        if schedule.eval_initial and s.epoch == 0 and not s.initial:
            result = self.task.evaluate(s.net)
            if result is not None:
                s.initial = _scalars(result)
                self._record({"kind": "eval", "epoch": 0, "step": 0, **{f"eval_{k}": v for k, v in s.initial.items()}})
                log.info("%s: initial weights: %s", stage.label, self.task.describe(result))
        loader = self._loader()
        while s.step < self.total_steps:
            epoch = s.epoch
            seed_everything(derive_seed(stage.cfg.run.seed, epoch, info.rank))
            loader.sampler.set_epoch(epoch)  # the epoch of the items too (_EpochItems)
            stats = self.train_one_epoch(iter(loader))
            s.epoch += 1
            record: dict[str, Any] = {"kind": "epoch", "epoch": s.epoch, "step": s.step, **stats}
            due = schedule.eval_every and (s.epoch % schedule.eval_every == 0 or s.step == self.total_steps)
            result = self._evaluate() if due else None
            if result is not None:
                record.update({f"eval_{k}": v for k, v in result.items()})
                self._update_best(result)
            if stage.is_main:
                self._record(record, prefix="epoch/")
                log.info("%s", self._epoch_line(record, result))
                save_checkpoint(RunPaths.last_checkpoint(stage.dir), self._checkpoint())
            dist_utils.barrier()
        if stage.is_main:
            self._write_final()
        dist_utils.barrier()

    def _write_final(self) -> None:
        s, stage = self.state, self.stage
        if self.schedule.select == "gt" and s.best:
            best = load_checkpoint(RunPaths.best_checkpoint(stage.dir))
            weights, metrics = best["model"], dict(best["metrics"])
            log.info("%s: selected epoch %d by GT mIoU %.2f", stage.label, metrics["epoch"], metrics["miou"])
            rule = "gt"
        else:
            weights, metrics = s.net.state_dict(), {"epoch": s.epoch}
            if s.last_eval.get("epoch") == s.epoch:
                metrics.update(s.last_eval)
            rule = "last"
        payload = self.task.final_payload(weights, Selection(rule, metrics, dict(s.initial)))
        save_checkpoint(RunPaths.model(stage.dir), payload)
        write_done(RunPaths.done(stage.dir), stage.inputs, {"epochs": s.epoch, "steps": s.step, "selection": metrics})
        log.info("%s: final weights %s", stage.label, RunPaths.model(stage.dir))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fit(
    stage: Stage,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    train_set: Dataset,
    task: Task,
    schedule: Schedule,
    train_module: nn.Module | None = None,
) -> Path:
    """Train ``net`` to the end of ``schedule`` (resuming from ``last.pt``) and write ``model.pt`` and ``DONE``.

    Args:
        stage: from :func:`open_stage`.
        net: the trained network on ``stage.device`` (wrapped for DDP here, after a resume).
        train_set: a dataset with ``set_epoch(epoch)`` whose items are a pure function of (seed, epoch, index).
        train_module: what the task's loss calls, holding ``net`` (e.g. a multi-scale-input view); default ``net``.
    Returns:
        The final weights' path.
    """
    amp_dtype, use_scaler = amp_settings(schedule.amp, stage.device, stage.section)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    module = net if train_module is None else train_module
    state = _State(model=module, net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    trainer = _Trainer(stage, state, train_set, task, schedule, amp_dtype)
    try:
        last = RunPaths.last_checkpoint(stage.dir)
        if last.is_file():
            trainer.resume(last)
        if stage.is_main:  # only now: a run refused above leaves the config of the run that wrote last.pt
            save_config(stage.cfg, RunPaths.stage_config(stage.dir))
        if stage.info.distributed:
            state.model = dist_utils.wrap_ddp(module, stage.device)
        trainer.run()
    finally:
        trainer.close()
    return RunPaths.model(stage.dir)
