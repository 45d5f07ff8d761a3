"""Two-level hierarchical mixture over class-pair experts (Jordan & Jacobs 1994), used by the CIFAR
seed's ``hierarchical`` variant: the top-level gate is a 10-way classifier (the generalist), it weighs each
expert by its probability mass on the expert's pair, and each expert only decides *within* its pair.

Shapes: ``class_probs`` (N, K), expert ``probs`` (E, N, K), ``cover`` (K, E) 0/1 (class k in expert e's pair).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelab.errors import MoelabError

__all__ = ["pair_cover", "hierarchical_weights", "combine_hierarchical"]


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
