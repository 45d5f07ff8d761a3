"""Switch routing: top-1 with expert capacity and token dropping (Fedus, Zoph & Shazeer 2021,
"Switch Transformers").

    x (N, d) -> logits (N, E) -> probs = softmax(logits);  indices (N, 1) = argmax
    weights (N, 1) = probs[indices]              (not renormalised: the gate value scales the expert)
    capacity C = ceil(capacity_factor * N / E);  tokens past C in an expert (token order) are dropped:
    mask (N, 1) False, output zero, counted in ``dropped``
Losses: balance E * sum_i f_i P_i (f from the argmax before dropping; default weight 0.01), z-loss, entropy.
Recipe options as :class:`~moelab.moe.routers.topk.TopKRouter`'s (``init``, ``train_noise``, ``balance``): the
argmax is taken on ``logits + expert_bias + noise``, the weight is the chosen expert's softmax probability.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab import kernels
from moelab.moe.routers.base import Router, Routing, check_capacity_factor, check_float
from moelab.moe.routers.topk import fused_sparse_routing, sparse_routing


class SwitchRouter(Router):
    name = "switch"
    loss_names = ("balance", "z", "importance", "entropy")
    default_loss_weights = {"balance": 0.01}

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | None = None,
                 capacity_factor: float = 1.25, jitter: float = 0.0, init: str = "default", train_noise: str = "none",
                 noise_scale: float = 1.0, balance: str = "aux", bias_rate: float = 1e-3):
        super().__init__(dim, num_experts, gate=gate, init=init)
        self.setup_selection(train_noise, noise_scale, balance, bias_rate)
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor, allow_none=False)
        self.jitter = check_float(self.name, "jitter", jitter, 0.0, below=1.0)

    def route(self, x: Tensor) -> Routing:
        if self.training and self.jitter > 0:  # multiplicative input jitter (the paper's eps = 1e-2)
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = self.logits(x)  # (N, E)
        sel = self.selection_scores(logits)  # (N, E) or None: choose on the logits
        if sel is None and kernels.enabled(logits):  # weights = the top-1 softmax probability (not renormalised)
            return fused_sparse_routing(logits, 1, False, self.capacity_factor)
        probs = torch.softmax(logits, dim=-1)
        if sel is None:
            weights, indices = probs.max(dim=-1, keepdim=True)  # (N, 1)
        else:
            indices = sel.argmax(dim=-1, keepdim=True)  # (N, 1)
            weights = probs.gather(1, indices)
            self.record_load(indices)
        return sparse_routing(logits, probs, indices, weights, self.capacity_factor)
