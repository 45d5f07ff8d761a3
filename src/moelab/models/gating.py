"""Gate networks and combine rules of seed experiment 1 (frozen CNN experts on CIFAR-10 class pairs).

Notation: ``probs`` are the experts' softmax outputs, shape ``(E, N, K)``; a gate output ``g`` is
``(N, E)``, un-normalised (dense + ELU in the seed). Every combine rule returns the mixture's
*logits* ``(N, K)``: the seed applies a softmax on top, so training uses ``cross_entropy(logits, y)``
and the mixture's class probabilities are ``softmax(logits)``.

Rules (``GATE_KINDS``):

* ``standard``: ``sum_e g[:, e] * probs[e]`` (the seed's ``gating_multiplier``).
* ``sparse``: the two largest gate values kept, the others set to -inf, then ReLU (so masked experts
  and kept-but-negative values weigh 0), then the standard sum (the seed's ``sparseGating``).
* ``two-gates``: two gate heads; their weights are summed, then the standard sum (``merge_two_gates``).
* ``two-gates-max``: two standard mixtures, one per gate head, element-wise max (``reduce_max``).
* ``expert-aware`` (not in the seed): the standard sum, but the gate head also sees the frozen
  experts' outputs (log-probabilities) and pooled trunk features, so choosing experts no longer
  rests on the gate's own trunk alone.
* ``hierarchical`` (not in the seed; :func:`combine_hierarchical`): a two-level hierarchical mixture
  (Jordan & Jacobs 1994) whose top-level gate is a 10-way CNN classifier (the generalist): it weighs
  each expert by its probability mass on the expert's pair, and each expert only decides *within*
  its pair. No gate is trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.models.cifar_cnn import IMAGE_SIZE, seed1_trunk

GATE_KINDS = ("standard", "sparse", "two-gates", "two-gates-max", "expert-aware")
HIERARCHICAL = "hierarchical"  # no trained gate network: see combine_hierarchical
# The seed's Adam learning rates per gating variant (expert-aware: like standard).
SEED_LR = {"standard": 1e-3, "sparse": 1e-4, "two-gates": 5e-4, "two-gates-max": 5e-4, "expert-aware": 1e-3}


def check_kind(kind: str) -> str:
    if kind not in GATE_KINDS:
        raise MoelabError(f"gate.kind must be one of {', '.join(GATE_KINDS)}; got {kind!r}")
    return kind


def num_heads(kind: str) -> int:
    return 2 if check_kind(kind) in ("two-gates", "two-gates-max") else 1


def combine_standard(gates: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``(N, E)`` weights x ``(E, N, K)`` expert probabilities -> ``(N, K)``: ``sum_e g_e * p_e``."""
    if probs.dim() != 3 or gates.shape != probs.shape[:2][::-1]:
        raise MoelabError(f"combine: gates must be (N, E) and probs (E, N, K); got {tuple(gates.shape)}, "
                          f"{tuple(probs.shape)}")
    return torch.einsum("ne,enk->nk", gates, probs)


def sparse_gates(gates: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Keep the ``k`` largest gate values per row, mask the rest with -inf, then ReLU (masked -> 0)."""
    k = min(k, gates.shape[1])
    top = gates.topk(k, dim=1)
    masked = torch.full_like(gates, float("-inf")).scatter(1, top.indices, top.values)
    return torch.relu(masked)


def combine(kind: str, gates: Sequence[torch.Tensor], probs: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """The mixture's logits ``(N, K)`` for gate variant ``kind`` from its gate head outputs."""
    kind = check_kind(kind)
    if len(gates) != num_heads(kind):
        raise MoelabError(f"gate kind {kind!r} takes {num_heads(kind)} gate output(s), got {len(gates)}")
    if kind in ("standard", "expert-aware"):
        return combine_standard(gates[0], probs)
    if kind == "sparse":
        return combine_standard(sparse_gates(gates[0], top_k), probs)
    if kind == "two-gates":
        return combine_standard(gates[0] + gates[1], probs)
    return torch.maximum(combine_standard(gates[0], probs), combine_standard(gates[1], probs))


def effective_weights(kind: str, gates: Sequence[torch.Tensor], top_k: int = 2) -> torch.Tensor:
    """One ``(N, E)`` weight per expert, for routing statistics (two heads: their sum)."""
    kind = check_kind(kind)
    if kind == "sparse":
        return sparse_gates(gates[0], top_k)
    return gates[0] if len(gates) == 1 else gates[0] + gates[1]


def pair_cover(pairs: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """``(K, E)`` 0/1 matrix: class k is in expert e's pair."""
    cover = torch.zeros(num_classes, len(pairs))
    for e, pair in enumerate(pairs):
        cover[list(pair), e] = 1.0
    return cover


def hierarchical_weights(class_probs: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` top-level class probabilities -> ``(N, E)`` expert weights: each expert's share of
    the probability mass on its pair (rows sum to 1)."""
    mass = class_probs.float() @ cover  # (N, E)
    return mass / mass.sum(1, keepdim=True).clamp_min(1e-12)


def combine_hierarchical(class_probs: torch.Tensor, probs: torch.Tensor, cover: torch.Tensor,
                         blend: float = 1.0) -> torch.Tensor:
    """Logits ``(N, K)`` of the two-level mixture ``p(y) = 1/c_y sum_{e covers y} r(pair_e) q_e(y)``.

    ``class_probs`` r ``(N, K)``: the top-level classifier's softmax; ``probs`` ``(E, N, K)``: the
    experts' softmax; ``cover`` ``(K, E)``: :func:`pair_cover`. ``q_e`` is expert e's output
    renormalised over its own pair (what it was trained to tell apart), ``r(pair_e)`` the top level's
    mass on that pair, ``c_y`` the number of experts covering class y (classes in no pair keep r(y)).
    With every class in the same number of pairs, p sums to 1. ``blend`` interpolates the log
    probabilities: 0 gives ``log r`` (the top level alone), 1 the mixture."""
    if probs.dim() != 3 or class_probs.shape != probs.shape[1:] or cover.shape != (probs.shape[2], probs.shape[0]):
        raise MoelabError(f"combine_hierarchical: class_probs must be (N, K), probs (E, N, K) and cover (K, E); "
                          f"got {tuple(class_probs.shape)}, {tuple(probs.shape)}, {tuple(cover.shape)}")
    r = class_probs.float()
    mass = r @ cover  # (N, E)
    within = probs.float() * cover.t().unsqueeze(1)  # (E, N, K), zero outside each expert's pair
    within = within / within.sum(-1, keepdim=True).clamp_min(1e-12)
    per_class = cover.sum(1)  # (K,)
    p = torch.einsum("ne,enk->nk", mass, within) / per_class.clamp_min(1.0)
    p = torch.where(per_class > 0, p, r)
    return torch.lerp(r.clamp_min(1e-12).log(), p.clamp_min(1e-12).log(), float(blend))


def oracle_routing_loss(gates: torch.Tensor, labels: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """Auxiliary routing target: ``-log`` of the softmax-over-experts mass on the experts whose pair
    holds the true class. ``cover`` is a ``(K, E)`` 0/1 matrix (class k is in expert e's pair)."""
    logp = torch.log_softmax(gates.float(), dim=1)
    mask = cover[labels].bool()  # (N, E)
    return -torch.logsumexp(logp.masked_fill(~mask, float("-inf")), dim=1).mean()


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
