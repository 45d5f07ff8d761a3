"""Autograd wrappers over the fused CPU kernels (``torch.ops.moelab``, see ``moe_cpu.cpp``).

Callers check :func:`moelab.kernels.enabled` first; the PyTorch twins live in
``moelab.moe.dispatch`` and ``moelab.moe.routers`` and are what the tests compare against.

    topk_softmax(logits (N, E), k, normalize) -> indices (N, k), weights (N, k), lse (N,),
                 psum (E,) = sum_n softmax(logits)_n, entropy (N,), counts (E,), bad () (non-finite logits),
                 balance () (Switch balance loss)
    expert_rows(flat (N*k,) ids in [0, E], k, E) -> row_token (M,), row_assign (M,), assign_row (N*k,), offsets (E,)
    gather_rows(x (N, *f), row_token (R,), assign_row (N*k,), k, dtype) -> (R, *f)
    combine_rows(ye (R, *o), assign_row (N*k,), row_assign (R,), weights (N, k)) -> (N, *o)
    permute_cast(w (E, ...), perm (E,), dtype) -> w[perm] in dtype (autograd: dispatch.permute_experts)
    sparse_mlp(x (N, in), weights (N, k), w1, b1, w2, b2, row_token, assign_row, row_assign, offsets (E,), act)
        -> (N, out): the two-layer experts on their expert-sorted rows (fp32/fp64), gather -> GEMMs -> combine
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["topk_softmax", "gather_rows", "combine_rows", "permute_cast", "sort_plan", "expert_rows", "bucket_rows",
           "sparse_mlp", "act_code", "has_blas", "use_blas", "small_gemm_limit"]


def _ops():
    return torch.ops.moelab


def topk_softmax(logits: Tensor, k: int, normalize: bool = True) -> tuple[Tensor, ...]:
    """Router epilogue in one pass per row (float32/float64 logits) -> indices, weights, lse, psum, entropy,
    counts (E,) int64 (assignments per expert), bad () int64 (non-finite logits), balance () (the Switch
    balance loss E sum_i f_i P_i, f_i = counts_i / (N k), P_i = psum_i / N).

    weights: softmax over the k selected logits (``normalize``) or their full-softmax probabilities;
    ties pick the lower expert id. weights, lse, psum, entropy and balance are differentiable."""
    return _ops().topk_softmax(logits, k, normalize)  # autograd in C++ (moe_cpu.cpp)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, row_token: Tensor, assign_row: Tensor, k: int, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(assign_row)
        ctx.k, ctx.xdtype = k, x.dtype
        return _ops().gather_rows(x, row_token, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (assign_row,) = ctx.saved_tensors
        return _ops().gather_sum(grad, assign_row, ctx.k, ctx.xdtype), None, None, None, None


def gather_rows(x: Tensor, row_token: Tensor, assign_row: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """xe[r] = x[row_token[r]] in ``dtype`` (token N: zero row); backward sums each token's k rows."""
    return _GatherRows.apply(x, row_token, assign_row, k, dtype)


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ye: Tensor, assign_row: Tensor, row_assign: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(ye, assign_row, row_assign, weights)
        return _ops().combine(ye, assign_row, weights)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ye, assign_row, row_assign, weights = ctx.saved_tensors
        need_ye, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_ye, grad_w = _ops().combine_backward(grad, ye, assign_row, row_assign, weights, need_ye, need_w)
        return (grad_ye if need_ye else None), None, None, (grad_w if need_w else None)


def combine_rows(ye: Tensor, assign_row: Tensor, row_assign: Tensor, weights: Tensor) -> Tensor:
    """y[n] = sum_j weights[n, j] * ye[assign_row[n*k + j]] (row R: dropped), in ye's dtype."""
    return _CombineRows.apply(ye, assign_row, row_assign, weights)


def permute_cast(w: Tensor, perm: Tensor, dtype: torch.dtype) -> Tensor:
    """w[perm] cast to dtype in one pass (no autograd: ``dispatch.permute_experts`` wraps it)."""
    return _ops().permute_cast(w, perm, dtype)


def sort_plan(flat: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable counting sort of (A,) expert ids in [0, E]: order (A,), counts (E+1,), inverse (A,)."""
    return _ops().sort_plan(flat, num_experts)


def expert_rows(flat: Tensor, k: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The trimmed flat layout of (N*k,) expert ids (E: dropped) in one pass: row_token (M,), row_assign (M,),
    assign_row (N*k,) (M: dropped), offsets (E,) int64 end rows (what ``sort_by_expert`` + ``flat_layout`` give)."""
    return _ops().expert_rows(flat, k, num_experts)


def bucket_rows(order: Tensor, expert: Tensor, start: Tensor, num_rows: int, num_tokens: int, k: int,
                num_assign: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row maps of a padded layout: row_token (R,), row_assign (R,), assign_row (A,)."""
    return _ops().bucket_rows(order, expert, start, num_rows, num_tokens, k, num_assign)



#: hidden activations the grouped MLP kernel runs (the ATen op of the reference path), by function
_ACT_CODES = {None: 0, torch.nn.functional.gelu: 1, torch.nn.functional.relu: 2, torch.nn.functional.silu: 3,
              torch.tanh: 4, torch.sigmoid: 5}


def act_code(fn) -> int | None:
    """The kernel's code for a hidden activation (None: identity), or None if the kernel has no such one."""
    try:
        return _ACT_CODES.get(fn)
    except TypeError:  # unhashable callable
        return None


def sparse_mlp(x: Tensor, weights: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
               row_token: Tensor, assign_row: Tensor, row_assign: Tensor, offsets: Tensor, act: int) -> Tensor:
    """y[n] = sum_j weights[n, j] * mlp_{e(n, j)}(x[n]) for the two-layer experts ``act(x W1_e + b1_e) W2_e + b2_e``
    (fp32/fp64), on a flat expert-sorted layout (``row_token`` (R,), ``assign_row`` (N*k,), ``row_assign`` (R,),
    ``offsets`` (E,) end rows): gather, one GEMM per expert and layer (its own kernel for small operands, else
    the BLAS), combine; three kernel calls each way."""
    return _ops().sparse_mlp(x, weights, w1, b1, w2, b2, row_token, assign_row, row_assign, offsets, act)


def has_blas() -> bool:
    """The grouped MLP kernel calls the BLAS torch links (else ATen's addmm on views)."""
    return bool(_ops().blas())


def use_blas(on: bool) -> bool:
    """Whether the grouped MLP kernel may call the BLAS directly (False: ATen's addmm, the path of a torch build
    that exports no BLAS); returns the previous setting. For tests and benchmarks."""
    return bool(_ops().use_blas(on))


def small_gemm_limit(nbytes: int) -> int:
    """The largest operand (bytes) for which the grouped MLP kernel runs its own register-blocked GEMM instead
    of the BLAS (default 64 KiB: small experts, where a BLAS call's fixed costs outweigh the arithmetic; 0:
    never); returns the previous limit. For tests and benchmarks."""
    return int(_ops().small_gemm_limit(int(nbytes)))
