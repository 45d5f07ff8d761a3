"""Optimiser and learning-rate schedule factories.

:func:`make_optimizer` and :func:`make_schedule` serve the MLP families (jacobs, sparse_mlp);
:func:`onecycle_or_plateau` the seed-1 CIFAR pipeline (torch's ``OneCycleLR``, stepped per batch, or
``ReduceLROnPlateau`` on the validation accuracy, stepped per epoch).

``t`` is the family's ``train`` config section, an :class:`Optim` (the MLP families' train sections
extend it): ``optimizer``, ``lr``, ``weight_decay``, ``momentum``; ``schedule`` and ``warmup_frac``.
Schedules are :class:`torch.optim.lr_scheduler.LambdaLR` multipliers stepped once per optimiser step,
so a checkpointed scheduler resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from moelab.config import Float


@dataclass(frozen=True)
class Optim:
    """The optimiser and schedule keys of a typed ``train`` section (:mod:`moelab.schema`)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"  # "sgd": Nesterov momentum when momentum > 0
    lr: Annotated[float, Float(gt=0)] = 3e-3
    weight_decay: Annotated[float, Float(ge=0)] = 0.0
    momentum: Annotated[float, Float(ge=0, lt=1)] = 0.9
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"  # onecycle: linear warm-up, cosine decay
    warmup_frac: Annotated[float, Float(ge=0, lt=1)] = 0.15


def make_optimizer(t: Optim, params, lr: float) -> torch.optim.Optimizer:
    """AdamW (fused) or SGD with Nesterov momentum (when momentum > 0), at ``lr``."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=t.momentum, nesterov=t.momentum > 0,
                           weight_decay=t.weight_decay, foreach=True)


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_frac: float) -> float:
    """The schedule's learning-rate factor at ``step`` (0-based) of ``total_steps``.

    "onecycle": linear warm-up over ``warmup_frac`` of the steps to the peak, then a cosine to 0;
    "cosine": a cosine from the peak to 0; "constant": 1."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
    warm = max(1, int(round(warmup_frac * total_steps)))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))


def make_schedule(t: Optim, opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_multiplier(t.schedule, step, total_steps, t.warmup_frac))


def onecycle_or_plateau(kind: str, opt: torch.optim.Optimizer, lr: float, epochs: int, steps: int,
                        patience: int = 4, factor: float = 0.5, min_lr: float = 1e-6):
    """``"onecycle"``: :class:`~torch.optim.lr_scheduler.OneCycleLR` peaking at ``lr`` over
    ``epochs * steps`` steps (25% warm-up, from lr / 10 down to lr / 1000); anything else:
    :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` on a maximised metric."""
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps),
                                                   pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=factor, patience=patience,
                                                      min_lr=min_lr)
