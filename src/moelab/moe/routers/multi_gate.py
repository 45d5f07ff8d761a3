"""Multi-gate mixtures: G gating heads over one set of experts (the CIFAR seed's two-gate models).

    logits (G, N, E);  gates_g = softmax(logits_g)                         (G, N, E)
    mixture_g (N, out) = sum_i gates_g[:, i] * expert_i(x)
    mode "sum": y = sum_g mixture_g  (= experts mixed by the summed gate weights; seed "two-gates")
    mode "max": y = max_g mixture_g  element-wise (seed "two-gates-max")

``gate`` may be one module mapping x -> (N, G*E) or a list of G modules each mapping x -> (N, E).
A subclass changes how logits become gates by overriding :meth:`MultiGateRouter.gates_from` (the CIFAR seed's
un-normalised gate heads: :mod:`moelab.reproductions.routers`).
Reported gates (N, E): the summed weights (mode "sum") or their mean (mode "max").
Losses: importance CV^2 of the reported gates, z-loss and entropy averaged over heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe import losses as L
from moelab.moe.routers.base import Router, Routing, check_int, zero_long


class _ConcatGates(nn.Module):
    def __init__(self, gates: Sequence[nn.Module]):
        super().__init__()
        self.gates = nn.ModuleList(gates)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([g(x) for g in self.gates], dim=-1)


class MultiGateRouter(Router):
    name = "multi_gate"
    loss_names = ("importance", "z", "entropy")
    default_loss_weights: dict[str, float] = {}

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | Sequence[nn.Module] | None = None,
                 num_gates: int = 2, mode: str = "sum", init: str = "default"):
        if mode not in ("sum", "max"):
            raise MoelabError(f"router 'multi_gate': mode must be 'sum' or 'max', got {mode!r}")
        check_int(self.name, "num_gates", num_gates, 1)
        if isinstance(gate, Sequence) and not isinstance(gate, nn.Module) or isinstance(gate, nn.ModuleList):
            gate = list(gate)
            num_gates = len(gate)
            gate = _ConcatGates(gate)
        super().__init__(dim, num_experts, gate=gate, num_logits=num_experts * num_gates, init=init)
        self.num_gates, self.mode = num_gates, mode

    def gates_from(self, logits: Tensor) -> Tensor:
        """(G, N, E) logits -> (G, N, E) combine weights: a softmax per head."""
        return torch.softmax(logits, dim=-1)

    def route(self, x: Tensor) -> Routing:
        n, e, g = x.shape[0], self.num_experts, self.num_gates
        logits = self.logits(x).view(n, g, e).transpose(0, 1)  # (G, N, E)
        gates = self.gates_from(logits)  # (G, N, E)
        view = gates.sum(0) if self.mode == "sum" else gates.mean(0)  # (N, E)
        return Routing(
            "multi", gates=view, logits=logits.transpose(0, 1).reshape(n, g * e), multi_gates=gates,
            multi_mode=self.mode,
            expert_counts=torch.full((e,), n, dtype=torch.long, device=x.device), dropped=zero_long(x.device),
            losses={"importance": L.importance_loss(view),
                    "z": torch.stack([L.router_z_loss(lg) for lg in logits]).mean(),  # mean over G >= 1 heads
                    "entropy": L.gate_entropy(gates.reshape(g * n, e))},
        )
