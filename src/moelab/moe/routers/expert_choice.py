"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Each expert picks its top-C tokens instead of tokens picking experts:

    x (N, d) -> logits (N, E) -> S = softmax(logits, over experts)          (N, E)
    C = min(N, ceil(capacity_factor * N / E))       (capacity_factor = c, avg experts per token)
    expert_weights, expert_tokens = topk(S^T, C)                            (E, C), (E, C)
    y[n] = sum_{(e, c): expert_tokens[e, c] = n} expert_weights[e, c] * expert_e(x[n])

Every expert is filled exactly to C; tokens no expert picked get zero output (``dropped``).
Losses: z-loss and entropy only (balance holds by construction).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.moe import losses as L
from moelab.moe.routers.base import Router, Routing, check_capacity_factor


class ExpertChoiceRouter(Router):
    name = "expert_choice"
    loss_names = ("z", "entropy")
    default_loss_weights: dict[str, float] = {}

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | None = None,
                 capacity_factor: float = 2.0, init: str = "default"):
        super().__init__(dim, num_experts, gate=gate, init=init)
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor, allow_none=False)

    def capacity(self, n: int) -> int:
        """C = min(N, ceil(capacity_factor * N / E)), at least 1 (0 for an empty batch)."""
        return min(n, max(1, int(-(-self.capacity_factor * n // self.num_experts))))

    def route(self, x: Tensor) -> Routing:
        logits = self.logits(x)  # (N, E)
        probs = torch.softmax(logits, dim=-1)  # (N, E)
        n, e = probs.shape
        c = self.capacity(n)
        w, tok = probs.t().topk(c, dim=-1)  # (E, C) each
        gates = probs.new_zeros(e, n).scatter(1, tok, w).t()  # (N, E)
        chosen = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill(0, tok.reshape(-1), True)
        return Routing(
            "expert_choice", gates=gates, logits=logits, expert_tokens=tok, expert_weights=w,
            expert_counts=torch.full((e,), c, dtype=torch.long, device=x.device),
            dropped=(~chosen).sum(),
            losses={"z": L.router_z_loss(logits), "entropy": L.gate_entropy(probs)},
        )
