"""E convolutional expert blocks computed together as grouped convolutions, for per-image MoE layers.

Each expert is a ResNet basic block (He et al. 2016, "Deep Residual Learning for Image Recognition",
arXiv 1512.03385), :class:`ConvBlock`:

    y = relu(bn2(conv2(relu(bn1(conv1(x))))) [+ x])      conv1: 3x3, stride s; conv2: 3x3; no conv bias

with the residual when ``in_channels == out_channels`` and ``stride == 1`` (``residual=None``). Used as
``MoE(dim=None, num_experts=E, experts=ConvBlockExperts(...), gate=<x (N, C, H, W) -> logits (N, E)>,
router="topk" | "switch" | ...)``: each image is one token (sparsely gated image-level experts,
Shazeer et al. 2017 style routing on whole images).

Storage: every tensor of :class:`ConvBlock` under the same name, the E experts' copies concatenated
along dim 0, expert-major: the weights of the grouped network as they are (``conv1.weight``
(E*Hd, C, 3, 3), ``bn1.running_mean`` (E*Hd,), ``bn2.num_batches_tracked`` (E,)). Expert e's ``k`` is
``state_dict()[k].unflatten(0, (E, -1))[e]`` (:meth:`ConvBlockExperts.expert_state_dict`); the conv
kernels stay 4-D, so ``model.to(memory_format=torch.channels_last)`` works on a network holding them.

Shapes (E experts, N images, Cap slots per expert, M routed rows, C in, O out, Hd hidden channels):

    forward_dense(x (N, C, H, W))           -> (E, N, O, H', W')   conv1 one plain conv to E*Hd channels
    forward_slots(xs (E, Cap, C, H, W))     -> (E, Cap, O, H', W') one grouped conv per layer on
                                               (Cap, E*C, H, W), groups=E
    forward_groups(xs (M, C, H, W), plan)   -> (M, O, H', W')      pad to (E, max count) slots, grouped
                                               convs, masked BN, unpad
    forward_sparse(x, indices, weights, mask) (base class: sort -> gather -> forward_groups -> combine)

BatchNorm over the E*Hd (E*O) channels of the grouped layout is E per-expert BNs, since BN is per
channel. Training-mode statistics: in forward_dense/forward_slots every slot is a real input, so
``F.batch_norm`` over all of them is exactly each expert's BN over its own batch. In forward_groups an
expert's Cap slots are padded past its count; padding slots would enter that BN's mean and variance,
so there the statistics are masked: computed over each expert's real rows only (and the running stats
updated, ``num_batches_tracked`` incremented, only for experts that received rows), matching a loop that
calls block e on just the images routed to it. Padded slots are computed and thrown away; their outputs
never reach the result or any gradient. In eval mode BN uses the running stats and the mask is moot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe import dispatch as D
from moelab.moe.experts import Experts, exact_compute_on

__all__ = ["ConvBlock", "ConvBlockExperts", "IMPLS"]

# forward_groups: "grouped" pads every expert to the largest count and runs each layer as one conv with
# groups=E (BN statistics masked to the real rows); "loop" runs each expert's block on exactly its rows.
# Timed on the 2-core AVX-512-bf16 CPU (one 3x3 conv 256 -> 256 channels, 7x7, batch 512 split over
# E = 4 experts, bf16, forward + backward): grouped 390 ms, loop 370 ms; and the loop has no
# padding to waste on uneven routing, so "auto" is "loop" on the CPU, "grouped" elsewhere (unmeasured).
IMPLS = ("auto", "grouped", "loop")


class ConvBlock(nn.Module):
    """One expert: ``relu(bn2(conv2(relu(bn1(conv1(x))))) [+ x])`` (the per-expert reference module)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, hidden_channels: int | None = None,
                 residual: bool | None = None):
        super().__init__()
        hidden = out_channels if hidden_channels is None else hidden_channels
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.residual = in_channels == out_channels and stride == 1 if residual is None else residual

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + x if self.residual else h)


class _Stack(nn.Module):
    """Holds one layer's tensors, the E experts' copies concatenated along dim 0; the repr shows their shapes."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={tuple(v.shape)}" for k, v in [*self._parameters.items(), *self._buffers.items()])


def _positive(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise MoelabError(f"ConvBlockExperts: {name} must be a positive int, got {v!r}")
    return v


class ConvBlockExperts(Experts):
    """E :class:`ConvBlock` experts, weights in the grouped layout (see the module docstring); every path
    runs each layer as one convolution with ``groups=E`` (the first layer of ``forward_dense``: one plain conv).

    ``residual=None``: a residual when ``in_channels == out_channels`` and ``stride == 1``; True there,
    False to drop it (no projection shortcut). BN momentum and eps: ``nn.BatchNorm2d``'s defaults
    (``self.momentum``, ``self.eps``).
    """

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, stride: int = 1,
                 hidden_channels: int | None = None, *, residual: bool | None = None, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise MoelabError(f"ConvBlockExperts: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.in_channels, self.out_channels = _positive("in_channels", in_channels), _positive("out_channels",
                                                                                             out_channels)
        self.num_experts, self.stride = _positive("num_experts", num_experts), _positive("stride", stride)
        self.hidden_channels = out_channels if hidden_channels is None else _positive("hidden_channels",
                                                                                      hidden_channels)
        if residual and (in_channels != out_channels or stride != 1):
            raise MoelabError(f"ConvBlockExperts: residual=True needs in_channels == out_channels and stride 1 "
                              f"(no projection shortcut), got {in_channels} -> {out_channels}, stride {stride}")
        self.residual = in_channels == out_channels and stride == 1 if residual is None else bool(residual)
        blocks = [self._block() for _ in range(num_experts)]  # nn.Conv2d / BatchNorm2d init per expert
        for name, t in blocks[0].state_dict(keep_vars=True).items():
            mod, leaf = name.split(".")
            if mod not in self._modules:
                self.add_module(mod, _Stack())
            cat = torch.cat([b.state_dict(keep_vars=True)[name].detach().reshape(-1, *t.shape[1:])
                             for b in blocks])  # (E * t.shape[0], ...), or (E,) for the scalar counters
            if isinstance(t, nn.Parameter):
                self._modules[mod].register_parameter(leaf, nn.Parameter(cat))
            else:
                self._modules[mod].register_buffer(leaf, cat)
        self.momentum, self.eps = blocks[0].bn1.momentum, blocks[0].bn1.eps
        self.impl = impl

    def _block(self) -> ConvBlock:
        return ConvBlock(self.in_channels, self.out_channels, self.stride, self.hidden_channels, self.residual)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, num_experts={self.num_experts}, "
                f"stride={self.stride}, hidden_channels={self.hidden_channels}, residual={self.residual}")

    def expert_state_dict(self, e: int) -> dict[str, Tensor]:
        """Expert e's tensors as a :class:`ConvBlock` state dict (copies, detached)."""
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.num_experts:
            raise MoelabError(f"ConvBlockExperts: expert index must be an int in [0, {self.num_experts}), got {e!r}")
        out = {}
        for k, v in self.state_dict().items():
            t = v.unflatten(0, (self.num_experts, -1))[e]  # (E*c, ...) -> expert e's (c, ...)
            out[k] = (t.squeeze(0) if k.endswith("num_batches_tracked") else t).clone()  # counters: (1,) -> ()
        return out

    def to_modules(self) -> nn.ModuleList:
        """The experts as E independent :class:`ConvBlock` (copies), same device, dtype and train/eval mode."""
        ref = self.conv1.weight
        mods = nn.ModuleList()
        for e in range(self.num_experts):
            m = self._block().to(ref.device, ref.dtype)
            m.load_state_dict(self.expert_state_dict(e))
            mods.append(m.train(self.training))
        return mods

    # --- shape checks ---------------------------------------------------------------------------

    def _check(self, x: Tensor, lead: int, what: str) -> None:
        """x (*lead dims, in_channels, H, W)."""
        if x.dim() != lead + 3 or x.shape[lead] != self.in_channels:
            want = {1: "(N, {c}, H, W)", 2: "(E, Cap, {c}, H, W)"}[lead].format(c=self.in_channels)
            raise MoelabError(f"ConvBlockExperts.{what} expected inputs of shape {want}, got {tuple(x.shape)}")

    # --- the grouped network --------------------------------------------------------------------

    def _bn(self, h: Tensor, bn: nn.Module, valid: Tensor | None) -> Tensor:
        """h (B, E*Ch, H, W) -> BN per channel; valid (B, E) bool: the real rows (None: every row)."""
        if not self.training or valid is None:
            if self.training:
                bn.num_batches_tracked.add_(1)
            return F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training,
                                self.momentum, self.eps)
        b, _, hh, ww = h.shape
        e = self.num_experts
        acc = torch.promote_types(h.dtype, torch.float32)  # statistics in >= float32 (bf16 under autocast)
        hv = h.view(b, e, -1, hh, ww).to(acc)  # (B, E, Ch, H, W)
        m = valid.to(acc).view(b, e, 1, 1, 1)
        n = valid.sum(0) * (hh * ww)  # (E,) values per channel
        denom = n.clamp_min(1).to(acc)[:, None]  # experts without rows: finite (unused) statistics
        dims = (0, 3, 4)
        mean = (hv * m).sum(dims) / denom  # (E, Ch)
        d = hv - mean[:, :, None, None]  # (B, E, Ch, H, W)
        var = (d.square() * m).sum(dims) / denom  # biased, used to normalise
        scale = bn.weight.view(e, -1) * torch.rsqrt(var + self.eps)  # (E, Ch)
        y = d * scale[:, :, None, None] + bn.bias.view(e, -1, 1, 1)
        with torch.no_grad():
            seen = (n > 0)[:, None]  # (E, 1): an expert without rows keeps its running stats
            unbiased = var * (n / (n - 1).clamp_min(1)).to(acc)[:, None]
            for buf, stat in ((bn.running_mean, mean), (bn.running_var, unbiased)):
                buf_e = buf.view(e, -1)  # (E, Ch), a view: updated in place
                buf_e.copy_(torch.where(seen, torch.lerp(buf_e, stat.to(buf.dtype), self.momentum), buf_e))
            bn.num_batches_tracked.add_((n > 0).long())
        return y.to(h.dtype).view_as(h)

    def _grouped(self, h: Tensor, shared: bool, valid: Tensor | None = None) -> Tensor:
        """(B, C, H, W) shared by all experts (``shared``) or (B, E*C, H, W) expert-major -> (B, E*O, H', W')."""
        e = self.num_experts
        x = h
        h = F.conv2d(h, self.conv1.weight, None, self.stride, 1, groups=1 if shared else e)
        h = F.relu(self._bn(h, self.bn1, valid))  # (B, E*Hd, H', W')
        h = self._bn(F.conv2d(h, self.conv2.weight, None, 1, 1, groups=e), self.bn2, valid)
        if self.residual:
            h = (h.unflatten(1, (e, -1)) + x.unsqueeze(1)).flatten(1, 2) if shared else h + x
        return F.relu(h)  # (B, E*O, H', W')

    def _slots(self, xs: Tensor, valid: Tensor | None) -> Tensor:
        """xs (E, Cap, C, H, W) -> (E, Cap, O, H', W'); valid (E, Cap) bool marks the real slots."""
        e, cap = xs.shape[:2]
        h = xs.transpose(0, 1).flatten(1, 2)  # (Cap, E*C, H, W), expert-major channels
        ys = self._grouped(h, shared=False, valid=None if valid is None else valid.t())  # (Cap, E*O, H', W')
        return ys.unflatten(1, (e, -1)).transpose(0, 1)  # (E, Cap, O, H', W')

    # --- Experts interface ----------------------------------------------------------------------

    def forward_dense(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) -> (E, N, O, H', W'): every expert on every image (BN stats over all N)."""
        self._check(x, 1, "forward_dense")
        ys = self._grouped(x, shared=True)  # (N, E*O, H', W')
        return ys.unflatten(1, (self.num_experts, -1)).transpose(0, 1)

    def forward_slots(self, xs: Tensor) -> Tensor:
        """xs (E, Cap, C, H, W) -> (E, Cap, O, H', W'): expert e on its batch xs[e] (every slot real)."""
        self._check(xs, 2, "forward_slots")
        if xs.shape[0] != self.num_experts:
            raise MoelabError(f"ConvBlockExperts.forward_slots expected {self.num_experts} expert batches "
                              f"(E, Cap, {self.in_channels}, H, W), got shape {tuple(xs.shape)}")
        return self._slots(xs, None)

    def forward_groups(self, xs: Tensor, plan: D.DispatchPlan) -> Tensor:
        """xs (M, C, H, W) sorted by expert -> (M, O, H', W'): ``impl`` "loop" (each expert on its rows) or
        "grouped" (padded to (E, max count) slots, grouped convs, BN masked)."""
        self._check(xs, 1, "forward_groups")
        if plan.counts.shape[0] != self.num_experts or xs.shape[0] != plan.num_rows:
            raise MoelabError(f"ConvBlockExperts.forward_groups: plan for {plan.counts.shape[0]} experts and "
                              f"{plan.num_rows} rows, got {self.num_experts} experts and {xs.shape[0]} rows")
        counts = plan.counts.tolist()  # host sync: the padded capacity is a shape
        cap = max(counts)
        if cap == 0:  # nothing routed: (0, O, H', W'), still attached to the input and the parameters
            h, w = ((s + 2 - 3) // self.stride + 1 for s in xs.shape[2:])
            return xs.new_zeros(0, self.out_channels, h, w) + 0 * (self.conv1.weight.sum() + xs.sum())
        if self.resolve_impl(xs) == "loop":
            return self._loop(xs, counts)
        full = min(counts) == cap  # every expert exactly full: no padding, plain BN
        valid = None if full else torch.arange(cap, device=xs.device) < plan.counts[:, None]  # (E, Cap)
        return D.unpad_by_expert(self._slots(D.pad_by_expert(xs, plan, cap), valid), plan)

    def resolve_impl(self, x: Tensor) -> str:
        """``impl`` for this call: "auto" is "loop" on the CPU, "grouped" elsewhere; "loop" inside
        :func:`moelab.moe.experts.exact_compute` (no padded slots: what a FLOP counter should see)."""
        if exact_compute_on():
            return "loop"
        if self.impl != "auto":
            return self.impl
        return "loop" if x.device.type == "cpu" else "grouped"

    def _loop(self, xs: Tensor, counts: list[int]) -> Tensor:
        """xs (M, C, H, W) sorted by expert -> (M, O, H', W'): each expert's block on exactly its rows, with
        slices of the stacked tensors (BN running stats updated through the slices, which are views).
        No padded rows, so no masking, and FLOP counters see exactly k blocks per image."""
        outs, start = [], 0
        hd, o = self.hidden_channels, self.out_channels
        for e, n in enumerate(counts):
            if n == 0:
                continue
            x = xs[start:start + n]
            start += n
            h = F.conv2d(x, self.conv1.weight[e * hd:(e + 1) * hd], None, self.stride, 1)
            h = F.relu(self._bn_slice(h, self.bn1, e, hd))
            h = self._bn_slice(F.conv2d(h, self.conv2.weight[e * o:(e + 1) * o], None, 1, 1), self.bn2, e, o)
            outs.append(F.relu(h + x if self.residual else h))
        return torch.cat(outs)

    def _bn_slice(self, h: Tensor, bn: nn.Module, e: int, c: int) -> Tensor:
        sl = slice(e * c, (e + 1) * c)
        if self.training:
            bn.num_batches_tracked[e] += 1
        return F.batch_norm(h, bn.running_mean[sl], bn.running_var[sl], bn.weight[sl], bn.bias[sl], self.training,
                            self.momentum, self.eps)
