"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eqs. 3-5, 8-10).

    clean (N, E) = gate(x);  std (N, E) = softplus(noise_gate(x)) + noise_epsilon
    noisy (N, E) = clean + eps * std,  eps ~ N(0, 1)  (training only; eval uses clean)
    indices (N, k) = topk(noisy);  weights (N, k) = softmax(noisy[indices])
    load P(n, i) = Phi((clean_ni - kth_excluding(noisy_n, k, i)) / std_ni)   (N, E)

The load estimator is the probability that expert i stays in the top k when only its own noise is
resampled; thresholds, clean logits and the noise std are all on the same raw-logit scale.
Losses: importance CV^2 and load CV^2 (the paper's pair), plus balance, z-loss and entropy.
k defaults to 2 (at most the number of experts); k = 1 warns: the softmax over one chosen logit is always 1,
so the gate learns only from the auxiliary losses (use ``router="switch"``). Both projections (gate and
noise) run in float32 under autocast, like every default gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe import losses as L
from moelab.moe.routers.base import (
    Router,
    Routing,
    check_capacity_factor,
    check_finite,
    check_float,
    check_k,
    default_k,
    project,
    to_float,
    topk,
    warn_top1_softmax,
)
from moelab.moe.routers.topk import sparse_routing


def noisy_topk_load(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """P(expert i in the top k of row n), (N, E) each -> (N, E). All ones when k >= E."""
    e = clean.shape[-1]
    if k >= e:
        return torch.ones_like(clean)
    top = noisy.topk(k + 1, dim=-1).values  # (N, k+1)
    thr_in = top[:, k : k + 1]  # k-th largest of the others if i is currently in the top k
    thr_out = top[:, k - 1 : k]  # k-th largest of the others if i is currently out
    is_in = noisy > thr_in
    z = (clean - torch.where(is_in, thr_in, thr_out)) / noise_std
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


class NoisyTopKRouter(Router):
    name = "noisy_topk"
    loss_names = ("importance", "load", "balance", "z", "entropy")
    default_loss_weights = {"importance": 0.1, "load": 0.1}
    takes_k = True
    extra_gates = ("noise_gate",)

    def __init__(self, dim: int | None, num_experts: int, k: int | None = None, *, gate: nn.Module | None = None,
                 noise_gate: nn.Module | None = None, noise_epsilon: float = 1e-2,
                 capacity_factor: float | None = None, init: str = "default"):
        super().__init__(dim, num_experts, gate=gate, init=init)
        self.k = check_k(self.name, default_k(k, num_experts), num_experts)
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor)
        self.noise_epsilon = check_float(self.name, "noise_epsilon", noise_epsilon, 0.0)
        warn_top1_softmax(self.name, self.k, num_experts)
        if noise_gate is None:
            if dim is None:
                raise MoelabError(f"router {self.name!r}: with a custom gate and no dim, also pass noise_gate=")
            noise_gate = nn.Linear(dim, num_experts, bias=False)
            nn.init.zeros_(noise_gate.weight)  # as in the paper: start with std = softplus(0) + eps
        self.noise_gate = noise_gate

    def route(self, x: Tensor, eps: Tensor | None = None) -> Routing:
        """eps: optional (N, E) standard-normal sample (for reproducible tests); drawn when training."""
        clean = self.logits(x)  # (N, E)
        raw = to_float(project(self.noise_gate, x))
        check_finite(raw, self.name)
        std = F.softplus(raw) + self.noise_epsilon  # (N, E)
        if eps is None and self.training:
            eps = torch.randn_like(clean)
        noisy = clean if eps is None else clean + eps * std  # (N, E)
        top, indices = topk(noisy, self.k)  # (N, k)
        weights = torch.softmax(top, dim=-1)
        load = noisy_topk_load(clean, noisy, std, self.k)  # (N, E)
        probs = torch.softmax(noisy, dim=-1)
        r = sparse_routing(noisy, probs, indices, weights, self.capacity_factor,
                           {"load": L.load_loss(load)})
        r.losses["z"] = L.router_z_loss(clean)
        return r
