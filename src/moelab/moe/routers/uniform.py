"""Uniform gating: every expert weighted 1/E (the plain ensemble baseline; no learned router).

    x (N, d) -> gates (N, E) = 1/E;   y = mean_i expert_i(x)

A custom ``gate`` is accepted and only evaluated to report ``logits`` for analysis.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.moe.routers.base import Router, Routing, check_finite, project, to_float, zero_long


class UniformRouter(Router):
    name = "uniform"
    loss_names: tuple[str, ...] = ()
    default_loss_weights: dict[str, float] = {}

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | None = None):
        super().__init__(dim, num_experts, gate=gate, default_gate=False)

    def route(self, x: Tensor) -> Routing:
        n, e = x.shape[0], self.num_experts
        logits = None
        if self.gate is not None:
            logits = to_float(project(self.gate, x))
            check_finite(logits, self.name)
        return Routing(
            "dense", gates=torch.full((n, e), 1.0 / e, device=x.device), logits=logits,
            expert_counts=torch.full((e,), n, dtype=torch.long, device=x.device), dropped=zero_long(x.device),
        )
