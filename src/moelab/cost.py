"""What a model costs: parameters and inference FLOPs per example, counted, not worked out by hand.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a real forward pass in eval
mode: every matmul / bmm / baddbmm / conv the model runs (2 FLOPs per multiply-add), so a sparse
mixture is charged for the experts it routes to, and a dense mixture for all of its experts. The count
is the model's mathematics, not an implementation's: the forward runs inside
:func:`moelab.moe.experts.exact_compute`, where expert stacks run each routed expert on exactly its rows
(no padding rows of the bucketed / capacity layouts, no bias columns folded into grouped GEMMs), so a
layer counts the same on every sparse path, in fp32 and under bf16 autocast. Elementwise ops
(activations, softmax, norms) are not counted, as is usual in the MoE literature; they are a small share
for the networks here.

    params = count_params(model)
    flops = flops_per_example(model, x[:256])      # x: a batch of real inputs
    flops, rho = flop_split(model, x[:256])        # and the routed share of them

``rho`` (Sun et al. 2026, "When Does Sparse MoE Help in Vision?") is the share of the counted FLOPs spent
in routed experts: everything a :class:`moelab.MoE` layer computes except its router, and the convolution
of a :class:`moelab.moe.CondConv2d` (its experts' mixed kernel) except its routing function. 0 for a dense
network.

:func:`match_width` finds the width of a dense network whose counted cost equals a target, for the
``dense-equal-params`` / ``dense-equal-flops`` baselines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from moelab.errors import MoelabError

__all__ = ["count_params", "count_flops", "flops_per_example", "flop_split", "match_width", "cost_row"]


def _register_grouped_mm() -> None:
    """Teach the counter ``aten._grouped_mm`` (the accelerator path of :class:`moelab.moe.MLPExperts`), which
    it does not count by itself: (M, K) rows grouped by expert x (E, K, O) weights -> (M, O) is 2*M*K*O
    FLOPs, only the rows each expert owns, no padding."""
    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is None:
        return
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        if len(a_shape) == 2 and len(b_shape) == 3:  # 2-D rows x 3-D stacked weights (the MoE case)
            return 2 * a_shape[0] * a_shape[1] * b_shape[2]
        if len(a_shape) == 3 and len(b_shape) == 3:  # batched
            return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
        return 2 * out_shape[-2] * out_shape[-1] * a_shape[-1] if out_shape is not None else 0


_register_grouped_mm()


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(fn: Callable[..., object], *args, **kwargs) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` (matmuls and convolutions, 2 per multiply-add; expert stacks
    on exactly their routed rows)."""
    from moelab.moe.experts import exact_compute  # late: moelab.moe is heavier than this module

    counter = FlopCounterMode(display=False)
    with exact_compute(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _routed_modules(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(name, names of its non-expert children) of every routed module in ``model``, named as
    FlopCounterMode's module tracker names them (the root's class name, then the dotted path)."""
    from moelab.moe.condconv import CondConv2d
    from moelab.moe.layer import MoE

    root = type(model).__name__
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            skip = ["router"]
        elif isinstance(m, CondConv2d):
            skip = ["routing_fn"]
        else:
            continue
        full = f"{root}.{name}" if name else root
        out.append((full, [f"{full}.{c}" for c in skip]))
    return out


@torch.no_grad()
def flop_split(model: nn.Module, batch: Tensor) -> tuple[float, float]:
    """``(flops_per_example, rho)``: counted inference FLOPs per example (as :func:`flops_per_example`) and
    the share of them spent in routed experts (0.0 for a network without a mixture). One counted pass."""
    from moelab.moe.experts import exact_compute

    if batch.shape[0] < 1:
        raise MoelabError("flops_per_example: the batch is empty")
    param = next(model.parameters(), None)
    if param is not None and param.device != batch.device and batch.device.type != "meta":
        batch = batch.to(param.device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with exact_compute(), counter:
            model(batch)
    finally:
        model.train(was_training)
    total = int(counter.get_total_flops())
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    routed = 0
    for name, skip in _routed_modules(model):
        routed += counts.get(name, 0) - sum(counts.get(c, 0) for c in skip)
    return total / batch.shape[0], (round(routed / total, 4) if total else 0.0)


def flops_per_example(model: nn.Module, batch: Tensor) -> float:
    """Inference FLOPs per example of ``model`` on ``batch`` (N, ...): counted in eval mode, divided by N.

    The model's train/eval mode is restored afterwards. For a routed model the count is that batch's
    routing (pass a few hundred real examples: the average is then what inference costs). The batch is
    moved to the model's device (its first parameter's) when they differ."""
    return flop_split(model, batch)[0]


def match_width(cost: Callable[[int], float], target: float, lo: int = 1, hi: int = 1 << 16) -> int:
    """The width ``w`` in ``[lo, hi]`` whose ``cost(w)`` is closest to ``target``; ``cost`` must grow with ``w``
    (e.g. ``lambda h: count_params(mlp(196, h, 10))``). Bisection: O(log(hi - lo)) calls."""
    if cost(lo) >= target:
        return lo
    if cost(hi) < target:
        raise MoelabError(f"match_width: no width up to {hi} reaches the target cost {target:g}")
    a, b = lo, hi  # cost(a) < target <= cost(b)
    while b - a > 1:
        mid = (a + b) // 2
        if cost(mid) < target:
            a = mid
        else:
            b = mid
    return a if target - cost(a) < cost(b) - target else b


def cost_row(model: nn.Module, batch: Tensor) -> dict:
    """``{"params": ..., "flops_per_example": ..., "rho": ...}`` for a summary's model row
    (:func:`flop_split`)."""
    flops, rho = flop_split(model, batch)
    return {"params": count_params(model), "flops_per_example": round(flops, 1), "rho": rho}
