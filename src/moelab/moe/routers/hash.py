"""Hash / random routing: a fixed, unlearned assignment (ablation baseline; cf. Roller et al. 2021,
"Hash Layers For Large Sparse Models").

    mode "hash":   scores (N, E) = x @ R, R (d, E) a fixed random projection (buffer, seeded), or
                   gate(x) without gradient: a deterministic function of the token's content
    mode "random": scores (N, E) ~ U(0, 1), fresh every call
    indices (N, k) = topk(scores);  weights (N, k) = 1/k

No gradient reaches the router; no auxiliary losses. The projection runs in float32 with autocast off,
so a token's experts do not change with the compute precision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe.routers.base import (
    Router,
    Routing,
    autocast_off,
    check_finite,
    check_int,
    check_k,
    counts_of,
    project,
    to_float,
    zero_long,
)


class HashRouter(Router):
    name = "hash"
    loss_names: tuple[str, ...] = ()
    default_loss_weights: dict[str, float] = {}
    takes_k = True

    def __init__(self, dim: int | None, num_experts: int, k: int = 1, *, gate: nn.Module | None = None,
                 mode: str = "hash", seed: int = 0):
        if mode not in ("hash", "random"):
            raise MoelabError(f"router 'hash': mode must be 'hash' or 'random', got {mode!r}")
        super().__init__(dim, num_experts, gate=gate, default_gate=False)
        self.mode = mode
        self.k = check_k(self.name, k, num_experts)
        check_int(self.name, "seed", seed, 0)
        if mode == "hash" and gate is None:
            if dim is None:
                raise MoelabError("router 'hash': give dim (for the fixed random projection) or gate=")
            gen = torch.Generator().manual_seed(seed)  # drawn on the CPU, then put on the default device
            proj = torch.randn(dim, num_experts, generator=gen, device="cpu")
            self.register_buffer("projection", proj.to(torch.empty(0).device))

    def route(self, x: Tensor) -> Routing:
        n, e = x.shape[0], self.num_experts
        with torch.no_grad():
            if self.mode == "random":
                scores = torch.rand(n, e, device=x.device)
            elif self.gate is not None:
                scores = to_float(project(self.gate, x))
            else:
                with autocast_off(x.device):  # float32 whatever the autocast state
                    scores = x.float() @ self.projection.float()  # (N, E)
            check_finite(scores, self.name)
            indices = scores.topk(self.k, dim=-1).indices  # (N, k)
        weights = torch.full((n, self.k), 1.0 / self.k, device=x.device)
        return Routing(
            "sparse", gates=None, indices=indices, weights=weights,
            expert_counts=counts_of(indices, e), dropped=zero_long(x.device),
        )
