"""Multi-process training glue: torchrun environment, process group, rank-0 helpers, SyncBN, sharding.

Launch with ``torchrun --nproc_per_node N -m sp_cam.train_cls ...`` (or ``-m sp_cam.train_fcn ...``); torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without them everything here degrades to a
single process. NCCL is used on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sp_cam.config import ConfigError
from sp_cam.runtime import place_model, resolve_device

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rank 0 evaluates alone after each epoch while the other ranks wait in a barrier; NCCL's default 10-minute watchdog
# would kill a long VOC evaluation, so the group gets a generous timeout.
PROCESS_GROUP_TIMEOUT_S = 2 * 60 * 60
# BN layers that normalise with batch statistics in training; the backbones' frozen-statistics BN layers are
# subclasses (net.frozen_bn) and are not counted
BATCH_STATISTICS_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from the torchrun environment (single process when unset)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group if torchrun started several processes, and pick this process's device.

    Idempotent: a second call (e.g. ``run()`` after ``main()``) reuses the existing group.

    Returns:
        (info, device); on CUDA each process takes ``cuda:LOCAL_RANK`` unless ``device_name`` names a device.
    """
    info = env_info()
    device = resolve_device(device_name, local_rank=info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.distributed and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S),
            **kwargs,
        )
        log.info("process group: backend %s, world size %d", backend, info.world_size)
    return info, device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the other ranks after a barrier: rank 0 creates what they reuse (a toy dataset)."""
    result = fn() if is_main() else None
    barrier()
    return result if is_main() else fn()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (a new tensor; ``t`` is not modified)."""
    out = t.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (a new tensor)."""
    return all_reduce_sum(t) / get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (every rank gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, in place; no-op in a single process.

    DDP broadcasts the buffers at the start of each forward only, so after a training step every rank holds the
    statistics of its own batch; call this before the ranks evaluate together what rank 0 saves.
    """
    if is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def cleanup() -> None:
    """Leave the process group (no-op in a single process)."""
    if is_initialized():
        dist.destroy_process_group()


def wrap_ddp(net: nn.Module, device: torch.device) -> nn.Module:
    """Wrap a model for DDP; on CUDA its trainable-statistics BN becomes SyncBatchNorm first.

    The model's own ``convert_sync_batchnorm()`` does the conversion (a classifier converts its DRM encoder only, and
    leaves the backbone's frozen-statistics BN alone; SpixelNet converts all its BN). On CPU (gloo) SyncBatchNorm is
    unsupported, so those BN layers keep per-process statistics (as the reference's DataParallel did, docs/decisions.md D15).
    Parameters keep their identity, so an optimizer built before stays valid.
    """
    if not is_initialized():
        return net
    if device.type == "cuda":
        convert = getattr(net, "convert_sync_batchnorm", None)
        if convert is not None:
            convert()
            place_model(net, device)
        return nn.parallel.DistributedDataParallel(net, device_ids=[device.index])
    n_bn = sum(type(m) in BATCH_STATISTICS_BN for m in net.modules())
    if n_bn:
        log.info(
            "gloo on CPU: no SyncBatchNorm, the %d BN layers of %s keep per-process batch statistics",
            n_bn,
            type(net).__name__,
        )
    return nn.parallel.DistributedDataParallel(net)


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int, section: str) -> int:
    """Images per forward on one process: ``batch_size / (world_size * grad_accum)``, which must be whole.

    ``batch_size`` is ``section.batch_size``, the global batch of one optimizer step.
    """
    parts = world_size * grad_accum
    if batch_size % parts:
        if grad_accum > 1:
            by = f"processes x grad_accum = {world_size} x {grad_accum} = {parts}"
        else:
            by = f"the number of processes ({world_size})"
        raise ConfigError(
            f"{section}.batch_size={batch_size} is the global batch of one optimizer step and must be divisible by {by}"
        )
    return batch_size // parts


def shard(items: list, rank: int, world_size: int) -> list:
    """The slice ``items[rank::world_size]``: shards partition the items, in order, whatever their number."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard {rank}/{world_size}: expected 0 <= i < n")
    return items[rank::world_size]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``--shard i/n`` (0-based i)."""
    i, sep, n = text.partition("/")
    try:
        rank, world = int(i), int(n)
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n with integers, e.g. 0/4") from None
    if not sep or world < 1 or not 0 <= rank < world:
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n")
    return rank, world
