"""Mixture-of-experts losses: task losses on mixtures and auxiliary router losses.

Shapes: N examples, E experts, C classes, D target width. ``expert_*`` tensors are (E, N, ...)
(the layout of ``MLPExperts.forward_dense``); gates are (N, E) and sum to 1 over E.

Task losses (mean over examples)
    mixture_cross_entropy   -log sum_i g_i softmax(z_i)[y]        (no double softmax)
    jacobs_competitive_loss sum_i g_i ||y - o_i||^2               (Jacobs et al. 1991, eq. 1.2)
    jacobs_loglik_loss      -log sum_i g_i exp(-||y - o_i||^2 / 2) (Jacobs et al. 1991, eq. 1.3)
    cooperative_loss        ||y - sum_i g_i o_i||^2               (the "blending" baseline)
Auxiliary router losses (scalars; 0 for a batch of no tokens)
    importance_loss         CV^2 of sum_n g_ni                     (Shazeer et al. 2017)
    load_loss               CV^2 of sum_n P(n, i)                  (Shazeer et al. 2017)
    switch_balance_loss     E * sum_i f_i P_i                      (Fedus et al. 2021)
    router_z_loss           mean_n logsumexp(z_n)^2                (Zoph et al. 2022)
    gate_entropy            mean_n -sum_i g_ni log g_ni            (regulariser; sign set by its weight)
    oracle_routing_loss     -log sum_{i covers y} softmax(g)_i     (routing target from known expert domains)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.errors import MoelabError

__all__ = [
    "oracle_routing_loss",
    "safe_log",
    "mixture_log_prob",
    "mixture_cross_entropy",
    "jacobs_competitive_loss",
    "jacobs_loglik_loss",
    "cooperative_loss",
    "cv_squared",
    "importance_loss",
    "load_loss",
    "switch_balance_loss",
    "router_z_loss",
    "gate_entropy",
    "mean_or_zero",
]


def _hi(t: Tensor) -> Tensor:
    """Compute in float32 at least: bf16/fp16 -> float32, float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def mean_or_zero(v: Tensor, dim: int | None = None) -> Tensor:
    """``v.mean(dim)``, but 0 (not NaN) over an empty dimension: an auxiliary loss of no tokens is zero."""
    if (v.numel() if dim is None else v.shape[dim]) == 0:
        return v.sum() if dim is None else v.sum(dim)
    return v.mean() if dim is None else v.mean(dim)


def safe_log(p: Tensor) -> Tensor:
    """log p with log 0 = -inf and a zero (not NaN) gradient at p = 0."""
    pos = p > 0
    return torch.where(pos, torch.log(torch.where(pos, p, torch.ones_like(p))), torch.full_like(p, -torch.inf))


def _log_gates(gates: Tensor | None, log_gates: Tensor | None, name: str) -> Tensor:
    if (gates is None) == (log_gates is None):
        raise MoelabError(f"{name}: pass exactly one of gates= (N, E) probabilities or log_gates= (N, E)")
    return log_gates if log_gates is not None else safe_log(gates)


def _reduce(v: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    if reduction == "none":
        return v
    raise MoelabError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_experts(expert_out: Tensor, lg: Tensor, name: str) -> None:
    if expert_out.dim() < 2 or lg.dim() != 2 or expert_out.shape[:2] != (lg.shape[1], lg.shape[0]):
        raise MoelabError(f"{name}: expected expert outputs (E, N, ...) and gates (N, E), got "
                          f"{tuple(expert_out.shape)} and {tuple(lg.shape)}")


def mixture_log_prob(expert_logits: Tensor, target: Tensor, gates: Tensor | None = None, *,
                     log_gates: Tensor | None = None) -> Tensor:
    """log p(y | x) = logsumexp_i(log g_i + log_softmax(z_i)[y]).

    expert_logits (E, N, C) unnormalised class scores; target (N,) long; gates/log_gates (N, E) -> (N,).
    """
    lg = _log_gates(gates, log_gates, "mixture_log_prob")
    _check_experts(expert_logits, lg, "mixture_log_prob")
    logp = F.log_softmax(_hi(expert_logits), dim=-1)  # (E, N, C)
    idx = target.view(1, -1, 1).expand(logp.shape[0], -1, 1)
    logp_y = logp.gather(-1, idx).squeeze(-1).t()  # (N, E)
    return torch.logsumexp(_hi(lg) + logp_y, dim=1)  # (N,)


def mixture_cross_entropy(expert_logits: Tensor, target: Tensor, gates: Tensor | None = None, *,
                          log_gates: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """NLL of the mixture of expert class distributions (softmax once, per expert; never on the mixture).

    expert_logits (E, N, C), target (N,), gates (N, E) or log_gates (N, E) -> scalar.
    """
    return _reduce(-mixture_log_prob(expert_logits, target, gates, log_gates=log_gates), reduction)


def _sq_err(expert_out: Tensor, target: Tensor) -> Tensor:
    """(E, N, D), (N, D) -> (N, E) squared distances ||y - o_i||^2."""
    if target.shape != expert_out.shape[1:]:
        raise MoelabError(f"target shape {tuple(target.shape)} does not match expert outputs "
                          f"{tuple(expert_out.shape)} (expected (N, ...) = {tuple(expert_out.shape[1:])})")
    return (expert_out - target.unsqueeze(0)).pow(2).flatten(2).sum(-1).t()


def jacobs_competitive_loss(expert_out: Tensor, target: Tensor, gates: Tensor, *, half: bool = False,
                            reduction: str = "mean") -> Tensor:
    """sum_i g_i ||y - o_i||^2 (times 0.5 if ``half``), mean over examples.

    expert_out (E, N, D), target (N, D), gates (N, E) -> scalar.
    """
    _check_experts(expert_out, gates, "jacobs_competitive_loss")
    v = (gates * _sq_err(expert_out, target)).sum(1)  # (N,)
    return _reduce(0.5 * v if half else v, reduction)


def jacobs_loglik_loss(expert_out: Tensor, target: Tensor, gates: Tensor | None = None, *,
                       log_gates: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """-log sum_i g_i exp(-||y - o_i||^2 / 2), computed as -logsumexp(log g_i - ||y - o_i||^2 / 2).

    expert_out (E, N, D), target (N, D), gates/log_gates (N, E) -> scalar.
    """
    lg = _log_gates(gates, log_gates, "jacobs_loglik_loss")
    _check_experts(expert_out, lg, "jacobs_loglik_loss")
    return _reduce(-torch.logsumexp(lg - 0.5 * _sq_err(expert_out, target), dim=1), reduction)


def cooperative_loss(expert_out: Tensor, target: Tensor, gates: Tensor, *, reduction: str = "mean") -> Tensor:
    """||y - sum_i g_i o_i||^2: expert_out (E, N, D), target (N, D), gates (N, E) -> scalar."""
    _check_experts(expert_out, gates, "cooperative_loss")
    mix = torch.einsum("ne,en...->n...", gates.to(expert_out.dtype), expert_out)
    return _reduce((mix - target).pow(2).flatten(1).sum(1), reduction)


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var(v) / mean(v)^2 of a (E,) vector (population variance); 0 if E = 1."""
    v = _hi(v)
    if v.numel() <= 1:
        return v.sum() * 0.0
    return v.var(unbiased=False) / (v.mean().pow(2) + eps)


def importance_loss(gates: Tensor) -> Tensor:
    """CV^2 of expert importance sum_n g_ni. gates (N, E) -> scalar."""
    return cv_squared(gates.sum(0))


def load_loss(load_probs: Tensor) -> Tensor:
    """CV^2 of the smooth load estimate sum_n P(n, i). load_probs (N, E) or (E,) -> scalar."""
    return cv_squared(load_probs.sum(0) if load_probs.dim() == 2 else load_probs)


def switch_balance_loss(probs: Tensor, counts: Tensor) -> Tensor:
    """E * sum_i f_i P_i: f_i = counts_i / sum(counts) (fraction dispatched, no gradient),
    P_i = mean_n probs_ni (router probability). probs (N, E), or (E,) already averaged over tokens;
    counts (E,) -> scalar; 1.0 when uniform."""
    e = probs.shape[-1]
    p = mean_or_zero(_hi(probs), 0) if probs.dim() == 2 else _hi(probs)  # (E,)
    f = counts.to(p.dtype) / counts.sum().clamp_min(1).to(p.dtype)  # (E,)
    return e * (f.detach() * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """mean_n (logsumexp_i z_ni)^2. logits (N, E) -> scalar."""
    return mean_or_zero(torch.logsumexp(_hi(logits), dim=-1).pow(2))


def gate_entropy(gates: Tensor) -> Tensor:
    """mean_n -sum_i g_ni log g_ni (0 log 0 = 0). gates (N, E) -> scalar.

    Minimising it (positive weight) sharpens the gates; a negative weight spreads them."""
    g = _hi(gates)
    pos = g > 0
    plogp = torch.where(pos, g * torch.log(torch.where(pos, g, torch.ones_like(g))), torch.zeros_like(g))
    return -mean_or_zero(plogp.sum(-1))


def oracle_routing_loss(gates: torch.Tensor, labels: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """Auxiliary routing target: ``-log`` of the softmax-over-experts mass on the experts whose pair
    holds the true class. ``cover`` is a ``(K, E)`` 0/1 matrix (class k is in expert e's pair)."""
    logp = torch.log_softmax(gates.float(), dim=1)
    mask = cover[labels].bool()  # (N, E)
    return -torch.logsumexp(logp.masked_fill(~mask, float("-inf")), dim=1).mean()
