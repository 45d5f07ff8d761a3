"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Tokens are grouped: x (B, m, d) = B examples of m tokens/patches (a 2-D input is m = 1).
Each expert owns p slots, S = E * p:

    logits (B, m, S) = gate(x)                       (default: x Phi, Phi (d, S))
    dispatch D = softmax(logits, dim=m)              each slot is a convex mix of the tokens
    combine  C = softmax(logits, dim=S)              each token is a convex mix of the slots
    slots  X~ (B, S, d) = D^T x;   Y~[:, e*p:(e+1)*p] = expert_e(X~[:, e*p:(e+1)*p])
    y (B, m, out) = C Y~

``normalize=True`` uses the paper's l2-normalised x and Phi with a learned scale (sec. 2.3).
No token is dropped. Gates (N, E) report the combine weight summed over each expert's slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe import losses as L
from moelab.moe.routers.base import Router, Routing, check_bool, check_int


class NormalizedSlots(nn.Module):
    """logits = scale * l2norm(x) @ l2norm(Phi, over d): (..., d) -> (..., S)."""

    def __init__(self, dim: int, num_slots: int):
        super().__init__()
        self.phi = nn.Parameter(torch.randn(dim, num_slots) / dim**0.5)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.phi, dim=0)


class SoftMoERouter(Router):
    name = "soft"
    loss_names = ("z",)
    default_loss_weights: dict[str, float] = {}

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | None = None,
                 slots_per_expert: int = 1, normalize: bool = False, init: str = "default"):
        check_int(self.name, "slots_per_expert", slots_per_expert, 1)
        check_bool(self.name, "normalize", normalize)
        if gate is None and normalize and dim is not None:
            gate = NormalizedSlots(dim, num_experts * slots_per_expert)
        super().__init__(dim, num_experts, gate=gate, num_logits=num_experts * slots_per_expert, init=init)
        self.slots_per_expert = slots_per_expert

    def route(self, x: Tensor) -> Routing:
        """x (B, m, d) -> Routing with dispatch/combine (B, m, S)."""
        if x.dim() != 3:
            raise MoelabError(f"router 'soft' expects grouped tokens (B, m, d), got shape {tuple(x.shape)}")
        b, m, _ = x.shape
        e, p = self.num_experts, self.slots_per_expert
        logits = self.logits(x)  # (B, m, S)
        dispatch = torch.softmax(logits, dim=1)  # over tokens
        combine = torch.softmax(logits, dim=2)  # over slots
        gates = combine.view(b * m, e, p).sum(-1)  # (N, E)
        return Routing(
            "soft", gates=gates, logits=logits.view(b * m, e * p), dispatch=dispatch, combine=combine,
            expert_counts=torch.full((e,), b * p, dtype=torch.long, device=x.device),
            dropped=torch.zeros((), dtype=torch.long, device=x.device),
            losses={"z": L.router_z_loss(logits.view(b * m, e * p))},
        )
