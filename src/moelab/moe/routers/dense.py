"""Dense softmax gating: every expert sees every token (Jacobs, Jordan, Nowlan & Hinton 1991,
"Adaptive Mixtures of Local Experts").

    x (N, d) -> logits (N, E) = gate(x) / temperature -> gates (N, E) = softmax(logits)
    y = sum_i gates[:, i] * expert_i(x)

``gate_values="raw"``: gates = gate(x) as they are, un-normalised (the CIFAR seed's "standard" gating:
a dense layer + ELU whose outputs weigh the experts' probabilities).

This is the per-sample soft mixture (Sun et al. 2026): per image a softmax over all experts, every expert
run, the weighted sum. (Not ``soft``: Soft MoE mixes the tokens of a group into expert slots.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.moe import losses as L
from moelab.moe.routers.base import Router, Routing, check_float, check_gate_values, zero_long


class DenseRouter(Router):
    name = "dense"
    loss_names = ("importance", "z", "entropy")
    default_loss_weights: dict[str, float] = {}

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | None = None,
                 temperature: float = 1.0, gate_values: str = "softmax", init: str = "default"):
        super().__init__(dim, num_experts, gate=gate, init=init)
        self.temperature = check_float(self.name, "temperature", temperature, 0.0, strict=True)
        self.gate_values = check_gate_values(self.name, gate_values)

    def route(self, x: Tensor) -> Routing:
        logits = self.logits(x)  # (N, E)
        gates = torch.softmax(logits / self.temperature, dim=-1) if self.gate_values == "softmax" else logits  # (N, E)
        n = x.shape[0]
        return Routing(
            "dense", gates=gates, logits=logits,
            expert_counts=torch.full((self.num_experts,), n, dtype=torch.long, device=x.device),
            dropped=zero_long(x.device),
            losses={"importance": L.importance_loss(gates), "z": L.router_z_loss(logits),
                    "entropy": L.gate_entropy(gates)},
        )
