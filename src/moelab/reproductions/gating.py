"""Gate networks of seed experiment 1 (frozen CNN experts on CIFAR-10 class pairs), and its gate kinds as
moelab routers.

Notation: ``probs`` are the experts' softmax outputs, shape ``(E, N, K)``; a gate output ``g`` is
``(N, E)``, un-normalised (dense + ELU in the seed). Every combine rule returns the mixture's
*logits* ``(N, K)``: the seed applies a softmax on top, so training uses ``cross_entropy(logits, y)``
and the mixture's class probabilities are ``softmax(logits)``.

The rules are moelab routers whose gate outputs weigh the experts as they are (:mod:`moelab.reproductions.routers`),
mixed by :func:`moelab.moe.layer.mix` (``GATE_ROUTERS``, :class:`SeedCombine`):

* ``standard``: ``sum_e g[:, e] * probs[e]`` (the seed's ``gating_multiplier``): router ``seed_standard``.
* ``sparse``: the two largest gate values kept, the others set to -inf, then ReLU (so masked experts
  and kept-but-negative values weigh 0), then the standard sum (the seed's ``sparseGating``): ``seed_sparse``.
* ``two-gates``: two gate heads; their weights are summed, then the standard sum (``merge_two_gates``):
  ``seed_two_gates``.
* ``two-gates-max``: two standard mixtures, one per gate head, element-wise max (``reduce_max``):
  ``seed_two_gates_max``.
* ``expert-aware`` (not in the seed): the standard sum, but the gate head also sees the frozen
  experts' outputs (log-probabilities) and pooled trunk features, so choosing experts no longer
  rests on the gate's own trunk alone.
* ``hierarchical`` (not in the seed; :func:`moelab.reproductions.hierarchical.combine_hierarchical`): a two-level
  hierarchical mixture (Jordan & Jacobs 1994) whose top-level gate is a 10-way CNN classifier (the
  generalist). No gate is trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.models.cifar_cnn import IMAGE_SIZE, seed1_trunk
from moelab.moe.layer import MoE, mix
from moelab.moe.routers import Router
from moelab.reproductions.routers import make_seed_router

GATE_KINDS = ("standard", "sparse", "two-gates", "two-gates-max", "expert-aware")
HIERARCHICAL = "hierarchical"  # no trained gate network: see moelab.reproductions.hierarchical
# The seed's Adam learning rates per gating variant (expert-aware: like standard).
SEED_LR = {"standard": 1e-3, "sparse": 1e-4, "two-gates": 5e-4, "two-gates-max": 5e-4, "expert-aware": 1e-3}
#: gate kind -> the router (moelab.reproductions.routers.SEED_ROUTERS) that combines like the seed
GATE_ROUTERS = {"standard": "seed_standard", "expert-aware": "seed_standard", "sparse": "seed_sparse",
                "two-gates": "seed_two_gates", "two-gates-max": "seed_two_gates_max"}


def check_kind(kind: str) -> str:
    if kind not in GATE_KINDS:
        raise MoelabError(f"gate.kind must be one of {', '.join(GATE_KINDS)}; got {kind!r}")
    return kind


def num_heads(kind: str) -> int:
    return 2 if check_kind(kind) in ("two-gates", "two-gates-max") else 1


def gate_router(kind: str, num_experts: int, top_k: int = 2, gate: nn.Module | None = None) -> Router:
    """The router of gate kind ``kind``; without ``gate`` it routes gate outputs it is given, ``(N, heads * E)``."""
    opts = {"k": min(top_k, num_experts)} if check_kind(kind) == "sparse" else {}
    return make_seed_router(GATE_ROUTERS[kind], num_experts, gate=gate or nn.Identity(), **opts)


class SeedCombine:
    """``(gate head outputs [(N, E)] * heads, expert probs (E, N, K)) -> (logits (N, K), weights (N, E))``:
    the kind's router on the concatenated gate outputs, then :func:`moelab.moe.layer.mix`. ``weights`` is
    the routing's dense view (two heads: their sum, or their mean for ``two-gates-max``), for statistics."""

    def __init__(self, kind: str, num_experts: int, top_k: int = 2):
        self.kind, self.heads = kind, num_heads(kind)
        self.router = gate_router(kind, num_experts, top_k)

    def __call__(self, gates: Sequence[torch.Tensor], probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(gates) != self.heads:
            raise MoelabError(f"gate kind {self.kind!r} takes {self.heads} gate output(s), got {len(gates)}")
        if probs.dim() != 3 or any(g.shape != probs.shape[:2][::-1] for g in gates):
            raise MoelabError(f"combine: gates must be (N, E) and probs (E, N, K); got "
                              f"{[tuple(g.shape) for g in gates]}, {tuple(probs.shape)}")
        r = self.router(torch.cat(list(gates), dim=1) if self.heads > 1 else gates[0])
        return mix(r, probs), r.dense_gates()


class ConcatHeads(nn.Module):
    """A :class:`GateNet` as a router's gate: x -> its head outputs side by side, ``(N, heads * E)``."""

    def __init__(self, gate: GateNet):
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.gate(x)
        return torch.cat(heads, dim=1) if len(heads) > 1 else heads[0]


def seed_moe(experts: nn.Module, gate: GateNet, kind: str, top_k: int = 2) -> MoE:
    """The seed-1 mixture as a :class:`moelab.MoE`: ``experts`` maps images (N, 3, H, W) to every expert's class
    probabilities (E, N, K) (and has ``num_experts``), ``gate`` is the seed's gate CNN, the router is the kind's
    (``GATE_ROUTERS``), given to the layer built. ``moe(x) -> (logits (N, K), MoEAux)``. Not for ``expert-aware``
    (its gate reads the experts' outputs, which a router's gate does not see)."""
    if check_kind(kind) == "expert-aware":
        raise MoelabError("seed_moe: the expert-aware gate reads the experts' outputs; combine it with SeedCombine")
    e = int(experts.num_experts)
    return MoE(None, e, experts=experts, router=gate_router(kind, e, top_k, gate=ConcatHeads(gate)))


def combine(kind: str, gates: Sequence[torch.Tensor], probs: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """The mixture's logits ``(N, K)`` for gate kind ``kind`` (one-off :class:`SeedCombine`)."""
    return SeedCombine(kind, probs.shape[0], top_k)(gates, probs)[0]


class GateNet(nn.Module):
    """The seed-1 gate: the expert CNN trunk, then ``heads`` x [dense(E) - ELU].

    ``trunk=False`` drops the conv trunk (the gate then reads only ``extra``).
    With ``extra_dim > 0`` (``expert-aware``) ``forward(x, extra)`` also takes a ``(N, extra_dim)``
    vector (the experts' log-probabilities and pooled features), mapped by dense(``hidden``) - ELU -
    dropout and concatenated to the trunk features before the gate heads.
    Returns a list of ``heads`` tensors ``(N, E)``.
    """

    def __init__(
        self,
        num_experts: int,
        heads: int = 1,
        width: int = 32,
        dropout: Sequence[float] = (0.2, 0.3, 0.4),
        extra_dim: int = 0,
        hidden: int = 256,
        extra_dropout: float = 0.3,
        trunk: bool = True,
    ):
        super().__init__()
        self.num_experts, self.extra_dim = num_experts, extra_dim
        if not trunk and extra_dim <= 0:
            raise MoelabError("GateNet without a trunk needs extra inputs (extra_dim > 0)")
        self.trunk = seed1_trunk(width, 3, tuple(dropout)) if trunk else None
        feat = 4 * width * (IMAGE_SIZE // 8) ** 2 if trunk else 0
        if extra_dim > 0:
            self.extra = nn.Sequential(
                nn.BatchNorm1d(extra_dim), nn.Linear(extra_dim, hidden), nn.ELU(), nn.Dropout(extra_dropout)
            )
            feat += hidden
        else:
            self.extra = None
        self.heads = nn.ModuleList(nn.Linear(feat, num_experts) for _ in range(heads))
        for h in self.heads:
            nn.init.xavier_uniform_(h.weight)
            nn.init.zeros_(h.bias)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> list[torch.Tensor]:
        parts = [self.trunk(x).flatten(1)] if self.trunk is not None else []
        if self.extra is not None:
            if extra is None:
                raise MoelabError("this gate is expert-aware: forward(x, extra) needs the experts' outputs")
            e = self.extra(extra)
            parts.append(e.to(parts[0].dtype) if parts else e)
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return [self.act(head(h)) for head in self.heads]
