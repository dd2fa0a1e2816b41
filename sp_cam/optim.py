"""SGD with the reference's per-group learning rates and poly decay, from stock PyTorch parts (docs/method.md §3.5).

The reference ``PolyOptimizer`` (inherited from PuzzleCAM / IRN) calls ``SGD(params, lr, weight_decay)``
positionally, so its weight decay lands in SGD's *momentum* slot: the effective momentum is 4e-5 (docs/decisions.md D1). Here the
choice is explicit: ``momentum: reference`` reproduces that (momentum = the weight-decay value), ``momentum:
intended`` uses 0.9. Weight decay is set per group (biases none), as in the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

INTENDED_MOMENTUM = 0.9  # what the PolyOptimizer authors meant (it became the poly power instead)
MOMENTUM_MODES = ("reference", "intended")


def resolve_momentum(ccfg: Any, section: str) -> float:
    """The SGD momentum for ``ccfg.momentum``: "reference" -> ``ccfg.weight_decay`` (4e-5 by default, docs/decisions.md D1),
    "intended" -> 0.9.

    Raises:
        ValueError: unknown mode, naming ``<section>.momentum``.
    """
    if ccfg.momentum == "reference":
        # docs/decisions.md D1: PolyOptimizer passes weight decay positionally into SGD's momentum; reproduce that on purpose.
        return float(ccfg.weight_decay)
    if ccfg.momentum == "intended":
        return INTENDED_MOMENTUM
    raise ValueError(
        f"{section}.momentum: unknown value {ccfg.momentum!r}; expected one of {', '.join(MOMENTUM_MODES)}"
    )


def poly_lambda(total_steps: int, power: float):
    """``step -> (1 - step / total_steps) ** power`` (0 from ``total_steps`` on), the reference's poly factor, applied
    before each step (step 0 trains at the base lr)."""

    def factor(step: int) -> float:
        return max(0.0, 1.0 - min(step, total_steps) / total_steps) ** power

    return factor


def sgd_poly(
    groups: list[dict[str, Any]],
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    total_steps: int,
    power: float,
    section: str,
) -> tuple[torch.optim.SGD, LambdaLR]:
    """SGD over a network's parameter groups with per-group lr and weight decay, plus a poly ``LambdaLR``.

    Args:
        groups: ``[{"name", "params", "lr_mult", "weight_decay": bool}]`` as the networks' ``param_groups`` give them.
        lr, momentum, weight_decay, nesterov, power: the base values (each group's lr is ``lr * lr_mult``; its weight
            decay ``weight_decay`` or 0).
        total_steps: optimizer steps of the whole run (the poly schedule reaches 0 there); call ``scheduler.step()``
            after every ``optimizer.step()``.
        section: the config section, for messages.
    Returns:
        (optimizer, scheduler). Each group keeps its ``name`` and ``lr_mult`` keys.
    Raises:
        ValueError: non-positive total_steps, nesterov without momentum, no trainable parameter.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps} (check {section}.epochs and batch_size)")
    if nesterov and momentum <= 0:
        raise ValueError(f"{section}.nesterov=true needs momentum > 0 (got {momentum})")
    sgd_groups = [
        {
            "params": g["params"],
            "lr": lr * g["lr_mult"],
            "weight_decay": weight_decay if g["weight_decay"] else 0.0,
            "name": g["name"],
            "lr_mult": g["lr_mult"],
        }
        for g in groups
        if g["params"]
    ]
    if not sgd_groups:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.SGD(sgd_groups, lr=lr, momentum=momentum, weight_decay=0.0, nesterov=nesterov)
    return optimizer, LambdaLR(optimizer, poly_lambda(total_steps, power))


def build_optimizer(model: nn.Module, ccfg: Any, total_steps: int) -> tuple[torch.optim.SGD, LambdaLR]:
    """The classifiers' optimizer: :func:`sgd_poly` over ``model.param_groups(...)`` with the momentum of
    ``ccfg.momentum`` (docs/decisions.md D1).

    Args:
        model: a ``CAMModel`` / ``SPCAMModel`` (or a DDP wrapper of one).
        ccfg: the model's ``ClassifierConfig`` (lr, weight_decay, momentum, nesterov, poly_power and the lr
            multipliers are read).
        total_steps: optimizer steps of the whole run.
    Raises:
        ValueError: bad momentum mode, non-positive total_steps, or nesterov without momentum.
    """
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    section = getattr(net, "model_type", "cam")
    momentum = resolve_momentum(ccfg, section)
    if ccfg.nesterov and momentum <= 0:
        raise ValueError(
            f"{section}.nesterov=true needs momentum > 0 ({section}.momentum={ccfg.momentum} gives {momentum})"
        )
    groups = net.param_groups(ccfg.classifier_lr_mult, ccfg.drm_encoder_lr_mult, ccfg.drm_head_lr_mult)
    return sgd_poly(groups, ccfg.lr, momentum, ccfg.weight_decay, ccfg.nesterov, total_steps, ccfg.poly_power, section)
