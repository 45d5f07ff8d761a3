"""Optimiser and learning-rate schedule factories for the MLP experiment families (jacobs, sparse_mlp).

``t`` is the family's ``train`` config section (its RULES have checked every value): ``optimizer``
("adamw" | "sgd"), ``weight_decay``, ``momentum``; ``schedule`` ("onecycle" | "cosine" | "constant")
and ``warmup_frac``. Schedules are :class:`torch.optim.lr_scheduler.LambdaLR` multipliers stepped once
per optimiser step, so a checkpointed scheduler resumes exactly.
"""

from __future__ import annotations

import math

import torch


def make_optimizer(t: dict, params, lr: float) -> torch.optim.Optimizer:
    """AdamW (fused) or SGD with Nesterov momentum (when momentum > 0)."""
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=t["weight_decay"], fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=t["momentum"], nesterov=t["momentum"] > 0,
                           weight_decay=t["weight_decay"], foreach=True)


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


def make_schedule(t: dict, opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_multiplier(t["schedule"], step, total_steps, t["warmup_frac"]))
