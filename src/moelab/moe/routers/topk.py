"""Top-k softmax gating, the "sparse gating" of the seed code (as in Shazeer et al. 2017 without
noise): keep the k largest logits, softmax over them.

    x (N, d) -> logits (N, E) -> indices (N, k) = topk(logits)
    weights (N, k) = softmax(logits[indices])   (sums to 1 over the selected experts)
    y = sum_j weights[:, j] * expert_{indices[:, j]}(x)

A subclass changes the weights of the chosen experts by overriding :meth:`TopKRouter.weights_from` and
setting ``softmax_weights = False`` (the CIFAR seed's ReLU of the k largest gate outputs:
:mod:`moelab.reproductions.routers`).

k defaults to 2 (at most the number of experts). k = 1 with the default softmax weights (``normalize``)
is a trap: the softmax over one chosen logit is always 1, so the task loss gives the gate no gradient and
it learns only from the auxiliary losses; the router warns, and ``router="switch"`` (top-1 weighted by
the full softmax probability) is what you want (or ``normalize=False``, which is the same weights).

Optional ``capacity_factor``: expert capacity C = ceil(cf * N * k / E); assignments beyond it
are dropped (mask), first choices before second choices.
Losses: Switch balance (f from the top-k assignments), z-loss, importance CV^2, gate entropy.

Recipe options (:mod:`moelab.moe.routers.base`): ``init``, ``train_noise`` / ``noise_scale`` and ``balance`` /
``bias_rate`` choose the experts on ``logits + expert_bias + U(0, noise_scale)``; the weights stay those of the
chosen experts' logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab import kernels
from moelab.kernels import ops as kernel_ops
from moelab.moe import losses as L
from moelab.moe.routers.base import (
    LazyLosses,
    Router,
    Routing,
    capacity_mask,
    check_bool,
    check_capacity_factor,
    check_finite,
    check_k,
    counts_of,
    default_k,
    expert_capacity,
    finite_checks_on,
    raise_nonfinite,
    topk,
    warn_top1_softmax,
    zero_long,
)


def sparse_routing(logits: Tensor, probs: Tensor | None, indices: Tensor, weights: Tensor,
                   capacity_factor: float | None, extra: dict[str, Tensor] | None = None,
                   lse: Tensor | None = None, entropy: Tensor | None = None, counts: Tensor | None = None,
                   balance: Tensor | None = None) -> Routing:
    """Build a "sparse" Routing (applying capacity) from (N, E) logits/probs and (N, k) choices.

    Losses, each a few passes over (N, E) at most, computed when read (:class:`LazyLosses`): balance (f before
    capacity), z, importance (sum of kept gate values per expert), entropy of ``probs``. lse: optional (N,) logsumexp(logits).
    The fused router passes ``probs=None`` with ``lse``, ``entropy`` (N,), ``counts`` (E,) (assignments per
    expert) and the ``balance`` loss instead.
    """
    n, e = logits.shape
    k = indices.shape[1]
    mask = capacity = None
    dropped = zero_long(logits.device)
    counts_all = counts_of(indices, e) if counts is None else counts  # (E,) before capacity: Switch's f_i
    counts = counts_all
    if capacity_factor is not None:
        capacity = expert_capacity(n, e, k, capacity_factor)
        mask = capacity_mask(indices, e, capacity)  # (N, k)
        counts = counts_of(indices, e, mask)
        dropped = (~mask).sum()

    def importance() -> Tensor:  # CV^2 of (E,) = gates.sum(0)
        w_kept = weights if mask is None else weights * mask
        return L.cv_squared(w_kept.new_zeros(e).index_add(0, indices.reshape(-1), w_kept.reshape(-1)))

    def log_z() -> Tensor:  # (N,)
        return torch.logsumexp(logits, dim=-1) if lse is None else lse

    def gate_entropy() -> Tensor:  # mean_n -sum p log p with log p = logits - lse
        return L.mean_or_zero(log_z() - (probs * logits).sum(-1) if entropy is None else entropy)

    losses = LazyLosses({"balance": balance if balance is not None else
                         lambda: L.switch_balance_loss(probs, counts_all),
                         "z": lambda: L.mean_or_zero(log_z().square()), "importance": importance,
                         "entropy": gate_entropy, **(extra or {})})
    return Routing("sparse", gates=None, logits=logits, indices=indices, weights=weights, mask=mask,
                   expert_counts=counts, dropped=dropped, losses=losses, capacity=capacity)


def fused_sparse_routing(logits: Tensor, k: int, normalize: bool, capacity_factor: float | None,
                         name: str = "topk") -> Routing:
    """:func:`sparse_routing` of top-k softmax gating with the fused CPU kernel: softmax, top-k,
    weights, logsumexp, mean probabilities, entropy, loads and the finite check (the router ``name``'s, see
    :func:`check_finite`) in one pass over the logits (the same values)."""
    indices, weights, lse, psum, ent, counts, bad, balance = kernel_ops.topk_softmax(logits, k, normalize)
    if finite_checks_on(logits.device) and int(bad):
        raise_nonfinite(name, int(bad))
    # the kernel's balance is L.switch_balance_loss(psum / N, counts) (f_i = counts_i / (N k): k per token)
    return sparse_routing(logits, None, indices, weights, capacity_factor, lse=lse, entropy=ent, counts=counts,
                          balance=balance)


class TopKRouter(Router):
    name = "topk"
    loss_names = ("balance", "z", "importance", "entropy")
    default_loss_weights = {"balance": 0.01}
    takes_k = True
    #: whether :meth:`weights_from` is the softmax this class computes (then the fused CPU kernel may compute it,
    #: and k = 1 with ``normalize`` warns); a subclass with other weights sets it False
    softmax_weights = True

    def __init__(self, dim: int | None, num_experts: int, k: int | None = None, *, gate: nn.Module | None = None,
                 capacity_factor: float | None = None, normalize: bool = True, init: str = "default",
                 train_noise: str = "none", noise_scale: float = 1.0, balance: str = "aux", bias_rate: float = 1e-3):
        super().__init__(dim, num_experts, gate=gate, init=init)
        self.setup_selection(train_noise, noise_scale, balance, bias_rate)
        self.k = check_k(self.name, default_k(k, num_experts), num_experts)
        self.capacity_factor = check_capacity_factor(self.name, capacity_factor)
        self.normalize = check_bool(self.name, "normalize", normalize)
        if self.softmax_weights and normalize:
            warn_top1_softmax(self.name, self.k, num_experts)

    def weights_from(self, top: Tensor, probs: Tensor, indices: Tensor) -> Tensor:
        """(N, k) combine weights of the chosen experts from their logits ``top`` (N, k), the full softmax
        ``probs`` (N, E) and the choices ``indices`` (N, k): the softmax over the chosen logits (``normalize``),
        else their full softmax probability."""
        return torch.softmax(top, dim=-1) if self.normalize else probs.gather(1, indices)

    def route(self, x: Tensor) -> Routing:
        logits = self.logits(x, check=False)  # (N, E)
        sel = self.selection_scores(logits)  # (N, E) or None: choose on the logits
        if sel is None and self.softmax_weights and kernels.enabled(logits):  # it checks the logits
            return fused_sparse_routing(logits, self.k, self.normalize, self.capacity_factor, self.name)
        check_finite(logits, self.name)
        probs = torch.softmax(logits, dim=-1)  # (N, E)
        top, indices = topk(logits if sel is None else sel, self.k)  # (N, k)
        if sel is not None:
            top = logits.gather(1, indices)
            self.record_load(indices)
        return sparse_routing(logits, probs, indices, self.weights_from(top, probs, indices), self.capacity_factor)
