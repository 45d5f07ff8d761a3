"""Optimiser and learning-rate schedule factories.

:func:`make_optimizer` and :func:`make_schedule` serve the MLP families (jacobs, sparse_mlp);
:func:`onecycle_or_plateau` the seed-1 CIFAR pipeline (torch's ``OneCycleLR``, stepped per batch, or
``ReduceLROnPlateau`` on the validation accuracy, stepped per epoch).

``t`` is the family's ``train`` config section, an :class:`Optim` (the MLP families' train sections
extend it): ``optimizer``, ``lr``, ``weight_decay``, ``momentum``; ``schedule`` and ``warmup_frac``.
Schedules are :class:`torch.optim.lr_scheduler.LambdaLR` multipliers stepped once per optimiser step,
so a checkpointed scheduler resumes exactly.

:func:`param_groups` puts the routing parameters (:func:`routing_parameters`) in their own group at
``lr * scale`` (Chen et al. 2022 train the router 100x slower than the experts); the LambdaLR schedules
multiply each group's own lr and :func:`onecycle_or_plateau` peaks each group at its own, so the ratio holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn

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


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that route: every router's (:class:`moelab.moe.routers.Router`: its gate, a noisy
    router's noise gate) and each :class:`moelab.moe.CondConv2d`'s routing function; each once."""
    from moelab.moe import CondConv2d
    from moelab.moe.routers import Router

    out: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, CondConv2d | Router):
            out.update((id(p), p) for p in (m.routing_fn if isinstance(m, CondConv2d) else m).parameters())
    return list(out.values())


def param_groups(model: nn.Module, lr: float, routing_lr_scale: float = 1.0) -> list[dict]:
    """The trainable parameters as optimiser groups: one at ``lr`` when the scale is 1 (the layout of
    ``model.parameters()``), else ``"weights"`` at ``lr`` and ``"routing"`` (:func:`routing_parameters`) at
    ``lr * routing_lr_scale``; each group records its ``lr_scale`` (for :func:`onecycle_or_plateau`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if routing_lr_scale == 1.0:
        return [{"params": params, "lr": lr, "lr_scale": 1.0, "name": "weights"}]
    routing = {id(p) for p in routing_parameters(model)}
    groups = [{"params": [p for p in params if id(p) not in routing], "lr": lr, "lr_scale": 1.0, "name": "weights"},
              {"params": [p for p in params if id(p) in routing], "lr": lr * routing_lr_scale,
               "lr_scale": routing_lr_scale, "name": "routing"}]
    return [g for g in groups if g["params"]]


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
    ``epochs * steps`` steps (25% warm-up, from lr / 10 down to lr / 1000), each group at ``lr`` times its
    ``lr_scale`` (:func:`param_groups`; 1 without); anything else:
    :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` on a maximised metric."""
    if kind == "onecycle":
        max_lr = [lr * g.get("lr_scale", 1.0) for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=max(1, epochs * steps),
                                                   pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=factor, patience=patience,
                                                      min_lr=min_lr)
