"""Bucketed MLP experts: every layer as one batched GEMM per bucket (a few), never per expert.

Rows come in a :class:`~moelab.moe.dispatch.RowLayout` with ``groups`` = [(experts (E_b,), C_b)]:
bucket b is an (E_b, C_b, in) block of the (R, in) input. Per layer,

    W_perm = W[perm] (cast to the compute dtype)       one gather of the stacked weights
    H_b    = act(baddbmm(b_b, X_b, W_b))               one batched GEMM per bucket, bias fused

The weights are permuted into bucket order once per layer (:func:`~moelab.moe.dispatch.permute_experts`,
whose backward is a gather by the inverse permutation) and split into per-bucket views; the rows are
split, not sliced, so the backward concatenates gradients once instead of zero-filling a full-size
gradient per bucket. (A hand-written autograd.Function for the whole stack measured slower on CPU
than letting autograd run these few ops.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moelab.moe.dispatch import permute_experts

Act = Callable[[Tensor], Tensor] | None


def bucketed_mlp(xe: Tensor, groups: Sequence[tuple[int, int]], perm: Tensor | None, acts: Sequence[Act],
                 dt: torch.dtype, params: Sequence[Tensor | None]) -> Tensor:
    """Run stacked MLP experts on bucketed rows: xe (R, in) -> (R, out).

    groups: [(E_b, C_b)] bucket sizes in row order (R = sum E_b * C_b); perm: (E,) expert ids in bucket
    order, every expert once (experts without rows last), or None when the buckets hold range(E) in
    order; acts: activation per layer (None = identity); params: [w1, b1, w2, b2, ...] with w (E, a, o)
    and b (E, o) or None; dt: compute dtype.
    """
    sizes = [eb for eb, _ in groups]
    e = params[0].shape[0]
    if sum(sizes) < e:  # experts without rows: their weights get no gradient
        sizes = [*sizes, e - sum(sizes)]
    hs = [xb.view(eb, cap, -1) for xb, (eb, cap) in zip(xe.to(dt).split([eb * cap for eb, cap in groups]), groups)]
    for li, act in enumerate(acts):
        w, b = params[2 * li], params[2 * li + 1]
        ws = (w.to(dt) if perm is None else permute_experts(w, perm, dt)).split(sizes)
        bs = [None] * len(sizes) if b is None else \
            (b.to(dt) if perm is None else permute_experts(b, perm, dt)).split(sizes)
        hs = [_layer(hb, wb, bb, act) for hb, wb, bb in zip(hs, ws, bs)]  # (E_b, C_b, o) per bucket
    flat = [hb.reshape(-1, hb.shape[-1]) for hb in hs]
    return flat[0] if len(flat) == 1 else torch.cat(flat)  # (R, out)


def _layer(h: Tensor, w: Tensor, b: Tensor | None, act: Act) -> Tensor:
    h = torch.bmm(h, w) if b is None else torch.baddbmm(b.unsqueeze(1), h, w)
    return h if act is None else act(h)
