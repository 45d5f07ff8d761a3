"""Dense softmax gating: every expert sees every token (Jacobs, Jordan, Nowlan & Hinton 1991,
"Adaptive Mixtures of Local Experts").

    x (N, d) -> logits (N, E) = gate(x) / temperature -> gates (N, E) = softmax(logits)
    y = sum_i gates[:, i] * expert_i(x)

A subclass changes how logits become gates by overriding :meth:`DenseRouter.gates_from` (the CIFAR seed's
un-normalised gates: :mod:`moelab.reproductions.routers`).

This is the per-sample soft mixture (Sun et al. 2026): per image a softmax over all experts, every expert
run, the weighted sum. (Not ``soft``: Soft MoE mixes the tokens of a group into expert slots.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.moe import losses as L
from moelab.moe.routers.base import Router, Routing, check_float, zero_long


class DenseRouter(Router):
    name = "dense"
    loss_names = ("importance", "z", "entropy")
    default_loss_weights: dict[str, float] = {}

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | None = None,
                 temperature: float = 1.0, init: str = "default"):
        super().__init__(dim, num_experts, gate=gate, init=init)
        self.temperature = check_float(self.name, "temperature", temperature, 0.0, strict=True)

    def gates_from(self, logits: Tensor) -> Tensor:
        """(N, E) logits -> (N, E) combine weights: softmax(logits / temperature)."""
        return torch.softmax(logits / self.temperature, dim=-1)

    def route(self, x: Tensor) -> Routing:
        logits = self.logits(x)  # (N, E)
        gates = self.gates_from(logits)  # (N, E)
        n = x.shape[0]
        return Routing(
            "dense", gates=gates, logits=logits,
            expert_counts=torch.full((self.num_experts,), n, dtype=torch.long, device=x.device),
            dropped=zero_long(x.device),
            losses={"importance": L.importance_loss(gates), "z": L.router_z_loss(logits),
                    "entropy": L.gate_entropy(gates)},
        )
