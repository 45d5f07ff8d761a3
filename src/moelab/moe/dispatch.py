"""Token dispatch ops: sort assignments by expert, lay rows out, gather, scatter-combine, grouped GEMM.

The sparse MoE path (MegaBlocks-style split of ops and layer, without block-sparse kernels):

    indices (N, k) --sort_by_expert--> plan: order/token/expert (M,), counts (E,), inverse (N*k,)
    plan           --flat_layout / bucket_layout--> layout: rows (R,) for the experts to run on
    x (N, d)       --gather_rows-->    xe (R, d)      one gather, rows grouped by expert
    xe             --experts------->   ye (R, o)      grouped GEMM (flat) or a few bmm (buckets)
    ye, w (N, k)   --combine_rows-->   y (N, o)       y[n] = sum_j w[n, j] * ye[assign_row[n*k + j]]

``M`` is the number of kept assignments (``N * k`` minus dropped ones); dropped assignments sort
last (sentinel expert ``E``) and contribute zero.

Layouts. The *flat* layout is the M sorted rows themselves (for ``grouped_mm``: no padding). The
*bucketed* layout puts the experts, sorted by load, into at most a handful of buckets; bucket b is
an (E_b, C_b, d) batch padded to its largest group, so each layer is one ``bmm`` per bucket (few
kernel calls, bias fused by ``baddbmm``) while the padding stays small (the bucket boundaries
minimise padded rows + a per-call cost, :func:`plan_buckets`). Experts with no tokens are skipped.

The *capacity* layout (:func:`capacity_layout`) is one (E, C) batch for a capacity C fixed by the router:
static shapes, nothing read back to the host.

Gather and combine are custom autograd functions whose backward passes are gathers through the
inverse maps (``assign_row``/``row_assign``), so neither direction needs a serial ``index_add``.
Everything stays on the input's device. Host syncs, only where a shape depends on the routing: a trimmed
plan (``sort_by_expert(trim=True)``, the default) reads M when assignments are dropped, and the bucketed
layout reads the per-expert counts (CPU paths). The flat and capacity layouts read nothing back: an
untrimmed plan (``trim=False``) keeps the dropped assignments as dead rows at the end of the last group
(zero inputs, never read, no gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moelab import kernels
from moelab.kernels import ops as kernel_ops

__all__ = [
    "DispatchPlan",
    "RowLayout",
    "sort_by_expert",
    "flat_expert_ids",
    "flat_layout",
    "capacity_layout",
    "bucket_layout",
    "plan_buckets",
    "gather_rows",
    "combine_rows",
    "gather_sorted",
    "permute_experts",
    "scatter_combine",
    "grouped_mm",
    "has_native_grouped_mm",
    "pad_by_expert",
    "unpad_by_expert",
    "autocast_dtype",
]


@dataclass
class DispatchPlan:
    """Expert-sorted view of a routing decision.

    order:   (M,)   assignment id ``n*k + j`` of each sorted row
    token:   (M,)   token index of each sorted row (``order // k``)
    expert:  (M,)   expert id of each sorted row (non-decreasing)
    counts:  (E,)   kept rows per expert, sums to the number of kept assignments
    offsets: (E,)   int32 cumulative counts (end row of each group), for ``grouped_mm``
    inverse: (N*k,) sorted row of assignment ``n*k + j``; ``>= M`` for dropped assignments
    live:    (M,)   bool, untrimmed plans only: False for the dead rows of dropped assignments (M = N*k;
             they sort last, ``expert`` clamps them to E-1 and ``offsets[-1]`` is N*k)
    """

    order: Tensor
    token: Tensor
    expert: Tensor
    counts: Tensor
    offsets: Tensor
    inverse: Tensor
    num_tokens: int
    k: int
    live: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.token.shape[0]

    @property
    def has_dropped(self) -> bool:
        return self.num_rows < self.inverse.shape[0]


def flat_expert_ids(indices: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    """(N, k) expert ids -> (N*k,) with the dropped assignments (``mask`` False) set to the sentinel E."""
    flat = indices.reshape(-1)
    return flat if mask is None else torch.where(mask.reshape(-1), flat, torch.full_like(flat, num_experts))


def sort_by_expert(indices: Tensor, num_experts: int, mask: Tensor | None = None, *,
                   trim: bool = True) -> DispatchPlan:
    """Sort the (N, k) expert assignments by expert id (stable: token order kept within an expert).

    mask: optional (N, k) bool, False = assignment dropped (it is not computed, contributes zero).
    trim: drop the dropped assignments' rows (M = kept count: one host sync, the row count is a shape);
    False keeps all N*k rows, the dropped ones as dead rows (``live``), and reads nothing back.
    """
    n, k = indices.shape
    e = num_experts
    flat = flat_expert_ids(indices, e, mask)  # (N*k,)
    if kernels.enabled(flat):  # one counting-sort pass
        order, counts, inverse = kernel_ops.sort_plan(flat, e)
        counts = counts[:e]
    else:  # no bincount (it reads the ids' max back to the host): a scatter_add of ones
        order = torch.argsort(flat, stable=True)  # (N*k,) assignment id of each sorted row
        counts = torch.zeros(e + 1, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))[:e]  # (E,)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    expert, live = flat.index_select(0, order), None
    offsets = counts.cumsum(0)
    if mask is not None and trim:
        m = int(counts.sum())  # host sync (trimmed masked routing only): the kept rows' count sizes the plan
        order, expert = order[:m], expert[:m]
    elif mask is not None:  # dead rows (sentinel E, sorted last) ride at the end of the last group
        live = expert < e
        expert = expert.clamp_max(e - 1)
        offsets = torch.cat([offsets[:-1], offsets.new_full((1,), flat.shape[0])])
    return DispatchPlan(
        order=order,
        token=order // k,
        expert=expert,
        counts=counts,
        offsets=offsets.to(torch.int32),
        inverse=inverse,
        num_tokens=n,
        k=k,
        live=live,
    )


@dataclass
class RowLayout:
    """Where each assignment's row lives in the (R, ...) tensor the experts run on.

    row_token:  (R,)   token of each row; ``num_tokens`` marks a padding row (reads zeros)
    row_assign: (R,)   assignment of each row; ``N*k`` marks a padding row
    assign_row: (N*k,) row of each assignment; ``R`` marks a dropped assignment (reads zeros)
    groups:     bucketed layouts: [(experts (E_b,) long, capacity C_b)], rows in that order
    expert_order: bucketed layouts: (E,) every expert once, bucket order then experts without rows;
                None when that is range(E) (one bucket holding all experts)
    """

    row_token: Tensor
    row_assign: Tensor
    assign_row: Tensor
    num_tokens: int
    k: int
    padded: bool
    dropped: bool
    groups: list[tuple[Tensor, int]] | None = None
    expert_order: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.row_token.shape[0]


def flat_layout(plan: DispatchPlan) -> RowLayout:
    """The M expert-sorted rows, unpadded (for ``grouped_mm`` / per-group loops). The dead rows of an untrimmed
    plan are padding rows (read zeros, get no gradient); its dropped assignments read zero."""
    m = plan.num_rows
    if plan.live is not None:
        nk = plan.inverse.shape[0]
        row_token = torch.where(plan.live, plan.token, plan.num_tokens)
        row_assign = torch.where(plan.live, plan.order, nk)
        assign_row = torch.where(plan.live.index_select(0, plan.inverse), plan.inverse, m)
        return RowLayout(row_token, row_assign, assign_row, plan.num_tokens, plan.k, padded=True, dropped=True)
    assign_row = plan.inverse.clamp_max(m) if plan.has_dropped else plan.inverse
    return RowLayout(plan.token, plan.order, assign_row, plan.num_tokens, plan.k, padded=False,
                     dropped=plan.has_dropped)


def capacity_layout(plan: DispatchPlan, capacity: int) -> RowLayout:
    """One (E, C) batch, C = ``capacity`` fixed by the caller (a router's capacity: no expert keeps more):
    expert e's kept assignments in rows [e*C, e*C + count_e) in token order, the rest padding. Static shapes,
    nothing read back to the host. An assignment past its expert's C rows is dropped (reads zero).
    ``plan``: untrimmed (``sort_by_expert(trim=False)``) or without a mask, with N*k > 0 rows."""
    e, c, nk = plan.counts.shape[0], capacity, plan.inverse.shape[0]
    if plan.num_rows != nk or nk == 0:
        raise ValueError("capacity_layout needs an untrimmed plan with at least one row")
    dev = plan.order.device
    starts = plan.counts.cumsum(0) - plan.counts  # (E,) first sorted row of each expert
    pos = torch.arange(c, device=dev)  # (C,)
    valid = (pos < plan.counts[:, None]).reshape(-1)  # (E*C,) slot holds a row
    src = (starts[:, None] + pos).reshape(-1).clamp_max(nk - 1)  # (E*C,) its sorted row
    row_assign = torch.where(valid, plan.order.index_select(0, src), nk)
    row_token = torch.where(valid, row_assign // plan.k, plan.num_tokens)
    ex = plan.expert.index_select(0, plan.inverse)  # (N*k,) expert of each assignment
    at = plan.inverse - starts.index_select(0, ex)  # position within its expert
    kept = at < c if plan.live is None else plan.live.index_select(0, plan.inverse) & (at < c)
    assign_row = torch.where(kept, ex * c + at, e * c)
    return RowLayout(row_token, row_assign, assign_row, plan.num_tokens, plan.k, padded=True, dropped=True,
                     groups=[(torch.arange(e, device=dev), c)])


def plan_buckets(counts: list[int], max_buckets: int = 8, call_cost: float = 0.03) -> list[tuple[list[int], int]]:
    """Partition the experts with tokens into <= max_buckets buckets of similar load.

    Minimises (padded rows) + call_cost * M * (number of buckets): bucket b is padded to its
    largest count. counts: rows per expert -> [(expert ids (ascending), capacity)], heaviest first.
    """
    ids = [e for e, c in enumerate(counts) if c > 0]
    if not ids:
        return []
    ids.sort(key=lambda e: -counts[e])
    c = np.array([counts[e] for e in ids], dtype=np.float64)  # descending
    n = len(c)
    if n > 512:  # keep the O(B n^2) search cheap: equal-size buckets
        b = min(max_buckets, n)
        edges = np.linspace(0, n, b + 1).round().astype(int)
        return [(sorted(ids[s:t]), int(c[s])) for s, t in zip(edges[:-1], edges[1:]) if t > s]
    # cost[i, j]: experts i..j-1 (descending) padded to c[i]
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    cost = np.where(j > i, (j - i) * c[np.minimum(i, n - 1)], np.inf)
    f = np.full(n + 1, np.inf)
    f[0] = 0.0
    best, best_b, choices = np.inf, 1, []
    penalty = call_cost * c.sum()
    for b in range(1, min(max_buckets, n) + 1):
        tot = f[:, None] + cost  # (n+1, n+1): previous split i, new end j
        arg = tot.argmin(0)
        f = tot[arg, np.arange(n + 1)]
        choices.append(arg)
        if f[n] + penalty * b < best - 1e-9:
            best, best_b = f[n] + penalty * b, b
    splits, j = [], n
    for b in range(best_b, 0, -1):
        i = int(choices[b - 1][j])
        splits.append((i, j))
        j = i
    return [(sorted(ids[s:t]), int(c[s])) for s, t in reversed(splits)]  # ids ascending within a bucket


def bucket_layout(plan: DispatchPlan, max_buckets: int = 8, call_cost: float = 0.03) -> RowLayout:
    """Rows for a few padded (E_b, C_b, ...) batches (see :func:`plan_buckets`)."""
    counts = plan.counts.tolist()  # host sync: the bucket shapes are chosen on the host
    buckets = plan_buckets(counts, max_buckets, call_cost)
    e, dev = len(counts), plan.counts.device
    start = [0] * e  # first padded row of each expert
    r = 0
    groups = []
    for experts, cap in buckets:
        for slot, ex in enumerate(experts):
            start[ex] = r + slot * cap
        r += len(experts) * cap
        groups.append((torch.tensor(experts, dtype=torch.long, device=dev), cap))
    order = [ex for experts, _ in buckets for ex in experts]
    order += [ex for ex in range(e) if counts[ex] == 0]
    expert_order = None if order == list(range(e)) else torch.tensor(order, dtype=torch.long, device=dev)
    nk = plan.inverse.shape[0]
    start_t = torch.tensor(start, dtype=torch.long, device=dev)
    if kernels.enabled(plan.order):
        row_token, row_assign, assign_row = kernel_ops.bucket_rows(plan.order, plan.expert, start_t, r,
                                                                   plan.num_tokens, plan.k, nk)
    else:
        rows = start_t[plan.expert] + _position_in_group(plan)  # (M,) padded row per sorted row
        row_token = torch.full((r,), plan.num_tokens, dtype=torch.long, device=dev).index_copy_(0, rows, plan.token)
        row_assign = torch.full((r,), nk, dtype=torch.long, device=dev).index_copy_(0, rows, plan.order)
        assign_row = torch.full((nk,), r, dtype=torch.long, device=dev).index_copy_(0, plan.order, rows)
    return RowLayout(row_token, row_assign, assign_row, plan.num_tokens, plan.k, padded=r > plan.num_rows,
                     dropped=plan.has_dropped, groups=groups, expert_order=expert_order)


def _with_zero_row(t: Tensor) -> Tensor:
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


class _GatherRows(torch.autograd.Function):
    """xe[r] = x[row_token[r]] (zero for padding rows); backward sums each token's k row-gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, row_token: Tensor, assign_row: Tensor, k: int, padded: bool,
                dropped: bool) -> Tensor:
        ctx.save_for_backward(assign_row)
        ctx.k, ctx.dropped = k, dropped
        return (_with_zero_row(x) if padded else x).index_select(0, row_token)  # (R, *f)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (assign_row,) = ctx.saved_tensors
        g = (_with_zero_row(grad) if ctx.dropped else grad).index_select(0, assign_row)  # (N*k, *f)
        g = g.view(g.shape[0] // ctx.k, ctx.k, *grad.shape[1:])
        out = g[:, 0]
        for j in range(1, ctx.k):  # a short loop over k, not over experts
            out = out + g[:, j]
        return out, None, None, None, None, None


def gather_rows(x: Tensor, layout: RowLayout, dtype: torch.dtype | None = None) -> Tensor:
    """x: (N, *f) -> (R, *f) in the layout's row order, cast to ``dtype`` (default x's)."""
    dtype = x.dtype if dtype is None else dtype
    if kernels.enabled(x):  # gather + cast + zero rows in one pass
        return kernel_ops.gather_rows(x, layout.row_token, layout.assign_row, layout.k, dtype)
    return _GatherRows.apply(x.to(dtype), layout.row_token, layout.assign_row, layout.k, layout.padded,
                             layout.dropped)


class _CombineRows(torch.autograd.Function):
    """y[n] = sum_j w[n, j] * ye[assign_row[n*k + j]]  (dropped assignments read zero)."""

    @staticmethod
    def forward(ctx, ye: Tensor, assign_row: Tensor, row_assign: Tensor, weights: Tensor, padded: bool,
                dropped: bool) -> Tensor:
        n, k = weights.shape
        flat = ye.reshape(ye.shape[0], math.prod(ye.shape[1:]))  # (R, o)
        yk = (_with_zero_row(flat) if dropped else flat).index_select(0, assign_row).view(n, k, flat.shape[1])
        w = weights.to(ye.dtype)
        y = yk[:, 0] * w[:, :1]  # (N, o)
        for j in range(1, k):
            y = torch.addcmul(y, yk[:, j], w[:, j : j + 1])
        ctx.save_for_backward(yk, w, row_assign)
        ctx.wdtype, ctx.shape, ctx.padded = weights.dtype, ye.shape, padded
        return y.view(n, *ye.shape[1:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        yk, w, row_assign = ctx.saved_tensors
        n, k, o = yk.shape
        g = grad.reshape(n, 1, o).to(yk.dtype)
        grad_ye = grad_w = None
        if ctx.needs_input_grad[3]:
            grad_w = (yk * g).sum(-1).to(ctx.wdtype)  # (N, k)
        if ctx.needs_input_grad[0]:
            gk = (g * w.unsqueeze(2)).view(n * k, o)  # (N*k, o) gradient per assignment
            grad_ye = (_with_zero_row(gk) if ctx.padded else gk).index_select(0, row_assign).view(ctx.shape)
        return grad_ye, None, None, grad_w, None, None


def combine_rows(ye: Tensor, layout: RowLayout, weights: Tensor) -> Tensor:
    """ye: (R, *o) expert outputs in layout order, weights: (N, k) -> (N, *o)."""
    if kernels.enabled(ye, weights):  # one pass forward, one per gradient backward
        return kernel_ops.combine_rows(ye, layout.assign_row, layout.row_assign, weights)
    return _CombineRows.apply(ye, layout.assign_row, layout.row_assign, weights, layout.padded, layout.dropped)


class _PermuteExperts(torch.autograd.Function):
    """w[perm] cast to ``dtype`` (perm a permutation of the experts); backward is a gather by the inverse.
    ``fused``: one pass each way with the CPU kernel instead of cast + index_select."""

    @staticmethod
    def forward(ctx, w: Tensor, perm: Tensor, dtype: torch.dtype, fused: bool) -> Tensor:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        ctx.save_for_backward(inv)
        ctx.wdtype, ctx.fused = w.dtype, fused
        return kernel_ops.permute_cast(w, perm, dtype) if fused else w.to(dtype).index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv,) = ctx.saved_tensors
        if ctx.fused:
            return kernel_ops.permute_cast(grad, inv, ctx.wdtype), None, None, None
        return grad.index_select(0, inv).to(ctx.wdtype), None, None, None


def permute_experts(w: Tensor, perm: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(E, ...) -> (E, ...) rows in ``perm`` order (a permutation of range(E)), cast to ``dtype``."""
    return _PermuteExperts.apply(w, perm, w.dtype if dtype is None else dtype, kernels.enabled(w))


def gather_sorted(x: Tensor, plan: DispatchPlan) -> Tensor:
    """x: (N, *f) -> (M, *f) rows in expert-sorted order."""
    return gather_rows(x, flat_layout(plan))


def scatter_combine(ys: Tensor, plan: DispatchPlan, weights: Tensor) -> Tensor:
    """ys: (M, *o) expert outputs in sorted order, weights: (N, k) -> (N, *o)."""
    return combine_rows(ys, flat_layout(plan), weights)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def has_native_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: ``_grouped_mm``'s backward refuses the
    broadcast (stride-0) gradient of e.g. ``out.sum()`` ("Invalid strides/sizes")."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, counts: Tensor | None = None) -> Tensor:
    """Grouped GEMM: a (M, K) rows grouped by ``offsets`` (E,) int32 ends, b (E, K, P) -> (M, P).

    Uses ``torch._grouped_mm`` (one ATen call, autograd included; needs 16-byte aligned rows and a
    float32/bf16/fp16 dtype) when it can; otherwise a loop of matmuls over groups. Operands are cast
    to the autocast dtype when autocast is on (``_grouped_mm`` is not on the CPU autocast list).
    ``counts``: the group sizes when they are ``diff(offsets)`` (saves the diff in the fallback).
    """
    dt = autocast_dtype(a)
    a, b = a.to(dt), b.to(dt)
    if a.shape[0] == 0:  # no rows: (0, P), still attached to b
        return a @ b[0]
    align = 16 // a.element_size()
    if (has_native_grouped_mm() and dt in GROUPED_MM_DTYPES
            and a.shape[1] % align == 0 and b.shape[2] % align == 0):
        return _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offsets))
    # host sync (fallback without native grouped_mm only): split sizes
    sizes = (counts if counts is not None else torch.diff(offsets, prepend=offsets.new_zeros(1))).tolist()
    return torch.cat([p @ b[i] for i, p in enumerate(a.split(sizes))])


AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # device types autocast knows (not e.g. meta)


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` would run in under the current autocast state."""
    dev = x.device.type
    if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return x.dtype


def pad_by_expert(xs: Tensor, plan: DispatchPlan, capacity: int) -> Tensor:
    """(M, *f) expert-sorted rows -> (E, C, *f) zero-padded per-expert batches (C = capacity)."""
    e = plan.counts.shape[0]
    out = xs.new_zeros(e * capacity, *xs.shape[1:])
    out = out.index_copy(0, plan.expert * capacity + _position_in_group(plan), xs)
    return out.view(e, capacity, *xs.shape[1:])


def unpad_by_expert(ye: Tensor, plan: DispatchPlan) -> Tensor:
    """(E, C, *o) -> (M, *o) back to the expert-sorted row layout."""
    e, c = ye.shape[:2]
    return ye.reshape(e * c, *ye.shape[2:]).index_select(0, plan.expert * c + _position_in_group(plan))


def _position_in_group(plan: DispatchPlan) -> Tensor:
    """(M,) position of each sorted row within its expert's group."""
    starts = plan.offsets.long() - plan.counts  # (E,)
    return torch.arange(plan.num_rows, device=plan.expert.device) - starts[plan.expert]
