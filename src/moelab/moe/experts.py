"""Expert stacks: all E experts behind one interface, batched where the experts are.

Shapes (E experts, N tokens, M routed rows, C slots per expert):

    forward_dense(x (N, *in))              -> (E, N, *out)  every expert on every token
    forward_slots(xs (E, C, *in))          -> (E, C, *out)  expert e on its own batch xs[e]
    forward_groups(xs (M, *in), plan)      -> (M, *out)     rows grouped by expert (``DispatchPlan``)
    forward_sparse(x, indices (N, k), weights (N, k), mask=None) -> (N, *out)
                                           y[n] = sum_j weights[n, j] * expert_{indices[n, j]}(x[n])

:class:`MLPExperts` keeps stacked weights ``(E, in, hidden)`` / ``(E, hidden, out)``: the dense
path is one GEMM for the first layer and one ``baddbmm`` for the second; the sparse path is
sort -> gather once -> batched GEMMs -> weighted combine (:mod:`moelab.moe.dispatch`): on the CPU in
fp32/fp64 one fused kernel op (:func:`moelab.kernels.ops.sparse_mlp`, one GEMM per expert and layer),
else ``torch._grouped_mm`` over the unpadded expert-sorted rows, one ``baddbmm`` per load bucket
(:mod:`moelab.moe.bucketed_mlp`) or one fixed-capacity ``baddbmm`` (:func:`sparse_path` chooses).
:class:`ModuleExperts` wraps any list of modules and loops over them: the slow reference.

Inside :func:`exact_compute` every stack runs each routed expert on exactly its rows (what
:mod:`moelab.cost` counts: the layer's mathematics, not a layout's padding).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import kernels
from moelab.errors import MoelabError
from moelab.kernels import ops as kernel_ops
from moelab.moe import dispatch as D
from moelab.moe.bucketed_mlp import bucketed_mlp

__all__ = ["Experts", "MLPExperts", "ModuleExperts", "CallableExperts", "ACTIVATIONS", "get_activation",
           "sparse_path", "exact_compute", "exact_compute_on"]

_exact = threading.local()


@contextlib.contextmanager
def exact_compute() -> Iterator[None]:
    """Within it, expert stacks run every routed expert on exactly its rows: no padding rows, no bias folded
    into GEMM columns, no bias GEMM after the combine. A FLOP counter then sees the layer's mathematics,
    the same on every path and dtype (:func:`moelab.cost.count_flops` uses it). Slower: a matmul per
    expert and layer, and the group sizes read back to the host."""
    prev = getattr(_exact, "on", False)
    _exact.on = True
    try:
        yield
    finally:
        _exact.on = prev


def exact_compute_on() -> bool:
    return not torch.compiler.is_compiling() and getattr(_exact, "on", False)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": F.silu,
    "identity": lambda t: t,
    "softmax": lambda t: F.softmax(t, dim=-1),
    "log_softmax": lambda t: F.log_softmax(t, dim=-1),
}


def get_activation(act: str | Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor] | None:
    """Name (see ``ACTIVATIONS``), callable/module, or None (identity)."""
    if act is None or callable(act):
        return act
    if act not in ACTIVATIONS:
        raise MoelabError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)} or a callable")
    return None if act == "identity" else ACTIVATIONS[act]


def regular_plan(num_experts: int, per_expert: int, device: torch.device) -> D.DispatchPlan:
    """Plan for ``E * C`` rows where expert e owns rows ``[e*C, (e+1)*C)``."""
    counts = torch.full((num_experts,), per_expert, dtype=torch.long, device=device)
    rows = torch.arange(num_experts * per_expert, device=device)
    return D.DispatchPlan(
        order=rows, token=rows, expert=rows // max(per_expert, 1), counts=counts,
        offsets=counts.cumsum(0).to(torch.int32), inverse=rows, num_tokens=rows.numel(), k=1,
    )


class Experts(nn.Module):
    """Base class of expert stacks. Subclasses implement :meth:`forward_groups` at least."""

    num_experts: int

    def forward_groups(self, xs: Tensor, plan: D.DispatchPlan) -> Tensor:  # (M, *in) -> (M, *out)
        raise NotImplementedError

    def forward_slots(self, xs: Tensor) -> Tensor:  # (E, C, *in) -> (E, C, *out)
        e, c = xs.shape[:2]
        ys = self.forward_groups(xs.reshape(e * c, *xs.shape[2:]), regular_plan(e, c, xs.device))
        return ys.view(e, c, *ys.shape[1:])

    def forward_dense(self, x: Tensor) -> Tensor:  # (N, *in) -> (E, N, *out)
        return self.forward_slots(x.unsqueeze(0).expand(self.num_experts, *x.shape))

    def forward_sparse(self, x: Tensor, indices: Tensor, weights: Tensor | None = None,
                       mask: Tensor | None = None) -> Tensor:
        """x (N, *in), indices (N, k) -> (N, *out) combined with weights (N, k); (N, k, *out) if weights is None."""
        plan = D.sort_by_expert(indices, self.num_experts, mask)
        ys = self.forward_groups(D.gather_sorted(x, plan), plan)  # (M, *out)
        if weights is None:
            n, k = indices.shape
            padded = torch.cat([ys, ys.new_zeros(1, *ys.shape[1:])])  # row M: zeros for dropped assignments
            rows = padded.index_select(0, plan.inverse.clamp_max(ys.shape[0]))  # (N*k, *out)
            return rows.view(n, k, *ys.shape[1:])
        return D.scatter_combine(ys, plan, weights)

    def forward(self, x: Tensor, indices: Tensor | None = None, weights: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        if indices is None:
            return self.forward_dense(x)
        return self.forward_sparse(x, indices, weights, mask)


class MLPExperts(Experts):
    """E two-layer MLPs ``out_act(act(x W1_e + b1_e) W2_e + b2_e)`` with stacked weights.

    w1: (E, in_dim, hidden_dim), b1: (E, hidden_dim), w2: (E, hidden_dim, out_dim), b2: (E, out_dim).
    ``hidden_dim=None`` gives linear experts ``out_act(x W1_e + b1_e)`` with w1: (E, in_dim, out_dim).
    ``sparse_impl`` (the top-k path, :meth:`forward_sparse`): "fused" (the CPU kernel
    :func:`moelab.kernels.ops.sparse_mlp`: gather, one GEMM per expert and layer, combine, autograd in
    C++; fp32/fp64, a hidden activation it knows, no output activation; elsewhere as "auto"), "grouped"
    (``torch._grouped_mm`` over the expert-sorted rows, no padding), "bucketed" (experts sorted by load into <= 8 padded batches, one
    ``baddbmm`` each), "padded" (one batch padded to the busiest expert), "static" (no host sync: one
    (E, C) ``baddbmm`` for a router capacity C, else every expert on every token) or "auto" ("fused" where
    it can run, else :func:`sparse_path`).
    """

    def __init__(self, num_experts: int, in_dim: int, hidden_dim: int | None, out_dim: int | None = None, *,
                 activation: str | Callable | None = "gelu", output_activation: str | Callable | None = None,
                 bias: bool = True, sparse_impl: str = "auto"):
        super().__init__()
        if num_experts < 1 or in_dim < 1 or (hidden_dim is not None and hidden_dim < 1):
            raise MoelabError(f"MLPExperts needs num_experts, in_dim, hidden_dim >= 1; got "
                              f"{num_experts}, {in_dim}, {hidden_dim}")
        if sparse_impl not in SPARSE_IMPLS:
            raise MoelabError(f"sparse_impl must be one of {', '.join(map(repr, SPARSE_IMPLS))}, got {sparse_impl!r}")
        out_dim = in_dim if out_dim is None else out_dim
        self.num_experts, self.in_dim, self.hidden_dim, self.out_dim = num_experts, in_dim, hidden_dim, out_dim
        self.activation, self.output_activation = get_activation(activation), get_activation(output_activation)
        self.sparse_impl = sparse_impl
        self.max_buckets = 8  # bucketed layout: at most this many padded bmm batches per layer
        first = hidden_dim if hidden_dim is not None else out_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, in_dim, first))
        self.b1 = nn.Parameter(torch.empty(num_experts, first)) if bias else None
        if hidden_dim is not None:
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, out_dim))
            self.b2 = nn.Parameter(torch.empty(num_experts, out_dim)) if bias else None
        else:
            self.register_parameter("w2", None)
            self.register_parameter("b2", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            if w is None:
                continue
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, "
                f"out_dim={self.out_dim}, bias={self.b1 is not None}, sparse_impl={self.sparse_impl!r}")

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_dim:
            raise MoelabError(f"MLPExperts expected inputs of width in_dim={self.in_dim}, got shape {tuple(x.shape)}")

    def _act(self, h: Tensor, last: bool) -> Tensor:
        f = self.output_activation if last else self.activation
        return h if f is None else f(h)

    def _layers(self):
        yield self.w1, self.b1, self.w2 is None
        if self.w2 is not None:
            yield self.w2, self.b2, True

    def forward_dense(self, x: Tensor) -> Tensor:
        """x (N, in) -> (E, N, out): layer 1 as one (N, in) x (in, E*h) GEMM, layer 2 as a baddbmm."""
        self._check(x)
        e, n = self.num_experts, x.shape[0]
        w1 = self.w1.permute(1, 0, 2).reshape(self.in_dim, -1)  # (in, E*h)
        h = x @ w1 if self.b1 is None else torch.addmm(self.b1.reshape(-1), x, w1)  # (N, E*h)
        h = self._act(h.view(n, e, self.w1.shape[2]), self.w2 is None).transpose(0, 1)  # (E, N, h), per expert
        if self.w2 is None:
            return h
        return self._act(self._bmm(h, self.w2, self.b2), True)  # (E, N, out)

    @staticmethod
    def _bmm(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # (E, C, a) x (E, a, o) -> (E, C, o)
        return torch.bmm(h, w) if b is None else torch.baddbmm(b.unsqueeze(1), h, w)

    def forward_slots(self, xs: Tensor) -> Tensor:
        """xs (E, C, in) -> (E, C, out), one baddbmm per layer."""
        self._check(xs)
        h = xs
        for w, b, last in self._layers():
            h = self._act(self._bmm(h, w, b), last)
        return h

    def forward_groups(self, xs: Tensor, plan: D.DispatchPlan) -> Tensor:
        """xs (M, in) sorted by expert -> (M, out) (generic path; ``forward_sparse`` has the fast one)."""
        self._check(xs)
        dt = D.autocast_dtype(xs)
        if exact_compute_on():
            return self._rows_exact(xs.to(dt), plan)
        if not self._grouped_ok(dt, xs.device.type):
            cap = int(plan.counts.max()) if plan.num_rows else 0  # host sync: the padded capacity is a shape
            return D.unpad_by_expert(self.forward_slots(D.pad_by_expert(xs, plan, cap)), plan)
        h = xs
        for w, b, last in self._layers():
            h = D.grouped_mm(h, w, plan.offsets, plan.counts)  # (M, h)
            if b is not None:
                h = h + b.to(h.dtype).index_select(0, plan.expert)
            h = self._act(h, last)
        return h

    def forward_sparse(self, x: Tensor, indices: Tensor, weights: Tensor | None = None,
                       mask: Tensor | None = None, capacity: int | None = None) -> Tensor:
        """x (N, in), indices/weights (N, k) -> (N, out): sort once, gather once, batched GEMMs, combine.

        "bucketed": experts sorted by load into a few padded (E_b, C_b, in) batches, one ``baddbmm``
        per layer and bucket (bias fused). "grouped": one ``grouped_mm`` per layer over the unpadded
        sorted rows; b1 rides in the GEMM as extra input columns of ones (x | 1) @ (W1 ; b1), and b2
        (without an output activation) is added after the combine as gates (N, E) @ b2 (E, out).
        "static": see :meth:`_sparse_static`. ``capacity``: the router's expert capacity when it has one
        (every expert keeps at most that many of the assignments ``mask`` keeps).
        """
        self._check(x)
        if weights is None:
            return super().forward_sparse(x, indices, weights, mask)
        dt = D.autocast_dtype(x)
        if exact_compute_on():
            plan = D.sort_by_expert(indices, self.num_experts, mask)
            layout = D.flat_layout(plan)
            return D.combine_rows(self._rows_exact(D.gather_rows(x, layout, dt), plan), layout, weights)
        if self.sparse_impl in ("auto", "fused") and x.shape[0] and self._fused_ok(x, weights, dt):
            flat = D.flat_expert_ids(indices, self.num_experts, mask)  # (N*k,); a dropped assignment: expert E
            row_token, row_assign, assign_row, offsets = kernel_ops.expert_rows(flat, indices.shape[1], self.num_experts)
            return kernel_ops.sparse_mlp(x, weights, self.w1, self.b1, self.w2, self.b2, row_token, assign_row,
                                         row_assign, offsets, kernel_ops.act_code(self.activation))
        path = self._impl(dt, x.device.type, indices.numel())
        if path == "static" and capacity is None and self.sparse_impl == "auto" and x.shape[0] \
                and x.device.type != "meta":  # no capacity to bound the batch: one host read of the counts
            path = "bucketed"  # beats running every expert on every token (E/k x the FLOPs)
        if path == "static" or x.shape[0] == 0:  # no tokens: (0, out), attached to x and the weights
            return self._sparse_static(x, indices, weights, mask, capacity, dt)
        if path == "grouped":  # untrimmed plan: dropped assignments stay as dead rows, nothing read back
            plan = D.sort_by_expert(indices, self.num_experts, mask, trim=False)
            return self._sparse_grouped(x, plan, indices, weights, mask, dt)
        plan = D.sort_by_expert(indices, self.num_experts, mask)
        layout = D.bucket_layout(plan, max_buckets=1 if path == "padded" else self.max_buckets)
        if not layout.groups:  # every assignment dropped
            return x.new_zeros(x.shape[0], self.out_dim, dtype=dt) + 0 * weights.sum().to(dt)
        groups = [(experts.shape[0], cap) for experts, cap in layout.groups]
        xe = D.gather_rows(x, layout, dt)  # (R, in) in the compute dtype
        ye = bucketed_mlp(xe, groups, layout.expert_order, self._acts(), dt, self._params())  # (R, out)
        return D.combine_rows(ye, layout, weights)  # (N, out)

    def _fused_ok(self, x: Tensor, weights: Tensor, dt: torch.dtype) -> bool:
        """The fused CPU kernel (:func:`moelab.kernels.ops.sparse_mlp`) runs this call: two-layer experts with a
        hidden activation it knows and no output activation, x, weights and parameters all in fp32 or fp64
        (no autocast to another dtype), on the CPU with the kernels loaded."""
        if dt not in (torch.float32, torch.float64) or x.dtype != dt or weights.dtype != dt \
                or self.w2 is None or self.output_activation is not None:
            return False
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        return (w1.dtype == dt and w2.dtype == dt and (b1 is None or b1.dtype == dt) and (b2 is None or b2.dtype == dt)
                and kernel_ops.act_code(self.activation) is not None and kernels.enabled(x, weights, w1))

    def _acts(self) -> list:
        return [self.activation, self.output_activation] if self.w2 is not None else [self.output_activation]

    def _params(self) -> list:
        return [self.w1, self.b1] + ([self.w2, self.b2] if self.w2 is not None else [])

    def _sparse_grouped(self, x: Tensor, plan: D.DispatchPlan, indices: Tensor, weights: Tensor,
                        mask: Tensor | None, dt: torch.dtype) -> Tensor:
        layout = D.flat_layout(plan)
        counts = None if plan.live is not None else plan.counts  # group sizes (dead rows: diff(offsets))
        xa, w1 = x.to(dt), self.w1.to(dt)
        if self.b1 is not None:  # ones columns (a of them keep rows 16-byte aligned), bias row, zero rows
            a = _align(dt)
            xa = F.pad(xa, (0, a), value=1.0)  # (N, in+a)
            w1 = torch.cat([w1, self.b1.to(dt).unsqueeze(1), w1.new_zeros(self.num_experts, a - 1, w1.shape[2])],
                           dim=1)  # (E, in+a, h)
        h = D.grouped_mm(D.gather_rows(xa, layout), w1, plan.offsets, counts)  # (M, h)
        if self.w2 is None:
            return D.combine_rows(self._act(h, True), layout, weights)
        h = D.grouped_mm(self._act(h, False), self.w2.to(dt), plan.offsets, counts)  # (M, out)
        late_bias = self.b2 is not None and self.output_activation is None
        if self.b2 is not None and not late_bias:
            h = h + self.b2.to(h.dtype).index_select(0, plan.expert)
        y = D.combine_rows(self._act(h, True), layout, weights)  # (N, out)
        if late_bias:
            w = weights if mask is None else weights * mask
            gates = w.new_zeros(x.shape[0], self.num_experts).scatter_add(1, indices, w)  # (N, E)
            y = torch.addmm(y, gates.to(y.dtype), self.b2.to(y.dtype))
        return y

    def _sparse_static(self, x: Tensor, indices: Tensor, weights: Tensor, mask: Tensor | None,
                       capacity: int | None, dt: torch.dtype) -> Tensor:
        """Static shapes, nothing read back to the host. With a router capacity C: one (E, C) batch per layer
        (:func:`moelab.moe.dispatch.capacity_layout`, bias fused). Without one, N rows per expert is the only
        bound known on the device, so every expert runs on every token (``forward_dense``) and the sparse
        gates (N, E) mix them: E/k times the routed FLOPs, exact for any indices."""
        n, e = x.shape[0], self.num_experts
        if capacity is None or n == 0:
            w = weights if mask is None else weights * mask
            gates = w.new_zeros(n, e).scatter_add(1, indices, w)  # (N, E)
            ys = self.forward_dense(x)  # (E, N, out)
            return torch.einsum("ne,eno->no", gates.to(ys.dtype), ys)
        plan = D.sort_by_expert(indices, e, mask, trim=False)
        cap = min(capacity, indices.numel())  # no expert holds more than the N*k assignments
        layout = D.capacity_layout(plan, cap)
        xe = D.gather_rows(x, layout, dt)  # (E*C, in)
        ye = bucketed_mlp(xe, [(e, cap)], None, self._acts(), dt, self._params())  # (E*C, out)
        return D.combine_rows(ye, layout, weights)

    def _rows_exact(self, xs: Tensor, plan: D.DispatchPlan) -> Tensor:
        """xs (M, in) sorted by expert (a trimmed plan) -> (M, out): one matmul per expert and layer on exactly
        its rows, biases added per row (:func:`exact_compute`; host sync: the group sizes)."""
        sizes = plan.counts.tolist()  # host sync (exact_compute only)
        h = xs
        for w, b, last in self._layers():
            parts = [p @ w[i].to(p.dtype) for i, p in enumerate(h.split(sizes)) if p.shape[0]]
            h = torch.cat(parts) if parts else h.new_zeros(0, w.shape[2])
            if b is not None:
                h = h + b.to(h.dtype).index_select(0, plan.expert)
            h = self._act(h, last)
        return h

    def _grouped_ok(self, dt: torch.dtype, device_type: str = "cpu") -> bool:
        """``torch._grouped_mm`` can run these shapes in ``dt`` on this device without a host sync: a float
        dtype with 16-byte aligned rows, and bf16 off the CPU (see :func:`sparse_path`)."""
        a = _align(dt)
        widths = (self.in_dim, self.w1.shape[2], self.out_dim)
        return (D.has_native_grouped_mm() and dt in D.GROUPED_MM_DTYPES and all(w % a == 0 for w in widths)
                and (device_type == "cpu" or dt == torch.bfloat16))

    def _impl(self, dt: torch.dtype, device_type: str, assignments: int | None = None) -> str:
        """The sparse path of this call, :func:`sparse_path` of ``sparse_impl``, the device, the dtype and the
        call's routed multiply-adds (``assignments`` token-expert pairs)."""
        macs = None if assignments is None else assignments * sum(w.shape[1] * w.shape[2] for w, _, _ in self._layers())
        impl = "auto" if self.sparse_impl == "fused" else self.sparse_impl  # where the fused kernel cannot run
        return sparse_path(impl, device_type, dt, self._grouped_ok(dt, device_type), macs)

    def to_module_experts(self) -> ModuleExperts:
        """An equivalent :class:`ModuleExperts` (copies of the weights as nn.Linear stacks): the oracle."""
        mods = []
        for e in range(self.num_experts):
            layers: list[nn.Module] = []
            for w, b, last in self._layers():
                lin = nn.Linear(w.shape[1], w.shape[2], bias=b is not None)
                with torch.no_grad():
                    lin.weight.copy_(w[e].t())
                    if b is not None:
                        lin.bias.copy_(b[e])
                layers.append(lin)
                f = self.output_activation if last else self.activation
                if f is not None:
                    layers.append(_Lambda(f))
            mods.append(nn.Sequential(*layers))
        return ModuleExperts(mods)


SPARSE_IMPLS = ("auto", "fused", "grouped", "bucketed", "padded", "static")


#: routed multiply-adds per call below which "auto" takes "grouped" on the CPU in fp32 (measured, see below)
SMALL_CALL_MACS = 1 << 28


def sparse_path(impl: str, device_type: str, dtype: torch.dtype, grouped_ok: bool, macs: int | None = None) -> str:
    """The path :meth:`MLPExperts.forward_sparse` takes where the fused CPU kernel cannot run (``"auto"`` and
    ``"fused"`` take that kernel first: fp32/fp64 on the CPU, 1.3x faster than "grouped" at mnist-sparse's
    layer and than "bucketed" at d 128, h 256, E 64, equal at d 512, h 2048, ``moelab bench layer``):
    "grouped", "bucketed", "padded" or "static".

    "auto": the CPU takes "bucketed" (as fast as or faster than ``torch._grouped_mm`` on every ``moelab bench
    layer`` config there, fp32 and bf16, up to 1.35x on many small experts; and than one GEMM per expert
    issued from C++: oneDNN builds a new bf16 kernel for every new row count), except for small calls in fp32
    (``macs``, the call's routed multiply-adds, under :data:`SMALL_CALL_MACS`), where "grouped" issues fewer
    ops: fwd + bwd of the layer, 1 thread, 2-core AVX2 VM, grouped / bucketed time 0.76 at d 32, h 64, E 16,
    top-2, 512 tokens (4M MACs: ``mnist-sparse``), 0.79 at E 32, 0.90 at d 64, h 128 (17M), 0.95 at 2048
    tokens, E 8 (67M); and 1.09 at d 128, h 256, E 64, 8192 tokens (1.1G) and at d 256, h 1024, E 8, 4096
    tokens (4.3G). A rule of the call's size, not a timing: the same shapes take the same path in every run. Elsewhere "grouped" in bf16,
    "static" in any other dtype: ``torch._grouped_mm`` takes only bf16 on CUDA (its meta kernel refuses the
    rest; fp32 takes a fallback that copies the offsets to the host), and the bucketed and padded layouts
    read the per-expert counts back to size their batches, while "static" reads nothing back
    (:meth:`MLPExperts.forward_sparse` takes "bucketed" instead when "auto" gave "static" and the router has
    no capacity: one host read per layer costs less than running every expert on every token).
    "grouped" where it cannot run (``grouped_ok`` False: no native kernel, unaligned widths, or not bf16 off
    the CPU) becomes "bucketed" on the CPU and "static" elsewhere; the other names are taken as given."""
    if impl in ("bucketed", "padded", "static"):
        return impl
    cpu = device_type == "cpu"
    small = cpu and dtype == torch.float32 and macs is not None and macs < SMALL_CALL_MACS
    if grouped_ok and (impl == "grouped" or not cpu or small):
        return "grouped"
    return "bucketed" if cpu else "static"


def _align(dt: torch.dtype) -> int:
    """Elements per 16 bytes (``_grouped_mm`` needs 16-byte aligned strides)."""
    return max(1, 16 // torch.empty((), dtype=dt).element_size())


class _Lambda(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class CallableExperts(Experts):
    """Adapter for a stack module whose ``forward(x (N, ...))`` returns all experts' outputs (E, N, ...)
    (e.g. ``ConvExperts``). Sparse paths run every expert on the routed rows and keep each row's own
    expert's output: correct, not sparse in compute."""

    def __init__(self, stack: nn.Module):
        super().__init__()
        self.stack = stack
        self.num_experts = int(stack.num_experts)

    def forward_dense(self, x: Tensor) -> Tensor:
        return self.stack(x)

    def forward_sparse(self, x: Tensor, indices: Tensor, weights: Tensor | None = None,
                       mask: Tensor | None = None) -> Tensor:
        """The stack runs every expert on every row it is given: run it once on the N rows (not on the N*k
        routed copies) and keep each row's chosen experts: (N, *out), or (N, k, *out) without weights."""
        ys = self.stack(x)  # (E, N, *out)
        n, k = indices.shape
        picked = ys[indices, torch.arange(n, device=x.device).unsqueeze(1)]  # (N, k, *out)
        tail = (1,) * (picked.dim() - 2)
        if mask is not None:
            picked = picked * mask.view(n, k, *tail).to(picked.dtype)
        if weights is None:
            return picked
        return (weights.to(picked.dtype).view(n, k, *tail) * picked).sum(1)

    def forward_groups(self, xs: Tensor, plan: D.DispatchPlan) -> Tensor:
        ys = self.stack(xs)  # (E, M, ...)
        return ys[plan.expert, torch.arange(xs.shape[0], device=xs.device)]


class ModuleExperts(Experts):
    """Any list of modules as experts; every path loops over experts in Python (the reference).

    ``forward_sparse`` is the naive MoE: per expert, ``index_select`` its tokens, run it, and
    ``index_add`` the weighted outputs back.
    """

    def __init__(self, experts: Sequence[nn.Module]):
        super().__init__()
        experts = list(experts)
        if not experts:
            raise MoelabError("ModuleExperts needs at least one expert module, got an empty list")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)

    def forward_dense(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.experts])

    def forward_slots(self, xs: Tensor) -> Tensor:
        return torch.stack([m(xe) for m, xe in zip(self.experts, xs)])

    def forward_groups(self, xs: Tensor, plan: D.DispatchPlan) -> Tensor:
        parts = xs.split(plan.counts.tolist())  # host sync: one module call per expert needs its rows
        return torch.cat([m(p) for m, p in zip(self.experts, parts)])

    def forward_sparse(self, x: Tensor, indices: Tensor, weights: Tensor | None = None,
                       mask: Tensor | None = None) -> Tensor:
        n, k = indices.shape
        keep = torch.ones_like(indices, dtype=torch.bool) if mask is None else mask
        y = None
        for e, m in enumerate(self.experts):
            tok, slot = torch.nonzero((indices == e) & keep, as_tuple=True)
            out = m(x.index_select(0, tok))  # (n_e, *out)
            if y is None:
                shape = (n, *out.shape[1:]) if weights is not None else (n * k, *out.shape[1:])
                y = out.new_zeros(shape)
            if weights is None:
                y = y.index_add(0, tok * k + slot, out)
            else:
                w = weights[tok, slot].to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
                y = y.index_add(0, tok, w * out)
        return y if weights is not None else y.view(n, k, *y.shape[1:])
