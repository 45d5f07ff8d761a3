"""The CIFAR seed's combine rules as moelab routers: its gates (a dense layer + ELU per head) weigh the experts
*as they are*, un-normalised ("raw" gate values), where the library's routers take a softmax of the logits.

Each is a subclass of the library router it follows, changing only how the gate's outputs become combine
weights (the hook of that router); losses, shapes and the execution by :class:`moelab.MoE` are the library's:

    RawDenseRouter       gates = gate(x)                                          (subclass of ``dense``)
    RawTopKRouter        the k largest gate outputs through ReLU, the others 0    (subclass of ``topk``)
    RawMultiGateRouter   G heads, gates_g = gate_g(x), summed or max-combined     (subclass of ``multi_gate``)

``SEED_ROUTERS`` names the seed's four gating variants (:func:`make_seed_router`); the gate kinds of
:mod:`moelab.reproductions.gating` map onto them. Give a built router to ``MoE(router=...)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe.routers import DenseRouter, MultiGateRouter, Router, TopKRouter, make_router

__all__ = ["RawDenseRouter", "RawTopKRouter", "RawMultiGateRouter", "SEED_ROUTERS", "make_seed_router"]


class RawDenseRouter(DenseRouter):
    """The seed's "standard" gating (``gating_multiplier``): ``sum_e g[:, e] * expert_e(x)``, g = gate(x)."""

    name = "raw_dense"

    def gates_from(self, logits: Tensor) -> Tensor:
        return logits


class RawTopKRouter(TopKRouter):
    """The seed's ``sparseGating``: the k largest gate outputs kept, the others set to -inf, then ReLU (so masked
    experts and kept-but-negative values weigh 0). ``normalize`` has no effect; k = 1 does not warn (the weight
    is the gate's output, not a softmax over one logit)."""

    name = "raw_topk"
    softmax_weights = False

    def weights_from(self, top: Tensor, probs: Tensor, indices: Tensor) -> Tensor:
        return torch.relu(top)


class RawMultiGateRouter(MultiGateRouter):
    """The seed's two-gate models: ``G`` heads whose outputs weigh the experts as they are; mode "sum" (the
    heads' weights summed, ``merge_two_gates``) or "max" (one mixture per head, element-wise max, ``reduce_max``)."""

    name = "raw_multi_gate"

    def gates_from(self, logits: Tensor) -> Tensor:
        return logits


#: the seed's gating variants -> (router class, preset options)
SEED_ROUTERS: dict[str, tuple[type[Router], dict[str, Any]]] = {
    "seed_standard": (RawDenseRouter, {}),
    "seed_sparse": (RawTopKRouter, {"k": 2}),
    "seed_two_gates": (RawMultiGateRouter, {"num_gates": 2, "mode": "sum"}),
    "seed_two_gates_max": (RawMultiGateRouter, {"num_gates": 2, "mode": "max"}),
}


def make_seed_router(name: str, num_experts: int, *, gate: nn.Module | None = None, dim: int | None = None,
                     **options: Any) -> Router:
    """The seed's router ``name`` (``SEED_ROUTERS``) over ``num_experts`` experts; ``options`` override its
    presets and are validated by the router (:func:`moelab.moe.routers.make_router`)."""
    if name not in SEED_ROUTERS:
        raise MoelabError(f"unknown seed router {name!r}; valid: {', '.join(SEED_ROUTERS)}")
    cls, preset = SEED_ROUTERS[name]
    return make_router(cls, dim, num_experts, gate=gate, **{**preset, **options})
