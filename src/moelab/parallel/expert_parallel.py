"""Expert parallelism: the experts of an MoE layer sharded across the ranks of a process group.

    ep = ExpertParallelMoE.from_moe(layer, group)    # rank r keeps experts [r*E/W, (r+1)*E/W)
    y, aux = ep(x)                                   # x (..., d): this rank's tokens, as MoE

Only the experts change: :class:`ShardedExperts` is an :class:`~moelab.moe.experts.Experts` stack of
all E experts whose ``forward_groups`` / ``forward_slots`` send each row to the rank that owns its
expert (:func:`moelab.parallel.comm.all_to_all`), run the local shard's own expert math there, and
send the outputs back. ``MoE.forward`` (router, sort/gather/scatter-combine, auxiliary losses) runs
unchanged on top of it, so the single-process layer is the oracle: on every rank
``ep(x_r) == layer(x_r)`` and the gradients match (input, router, expert shard).

Exchange modes (rows = token-expert assignments, E experts, W ranks, El = E / W local experts):

    "dropless" (default)  rows sorted by expert (M, d); counts (W, El) exchanged first (one small
                          all-to-all), then an uneven all-to-all of exactly the routed rows. No padding,
                          nothing dropped beyond what the router's own capacity drops.
    "padded"              rows padded per expert to a capacity C (E, C, d) and exchanged in equal
                          parts (GShard-style). C = ``capacity`` (static, no host sync: rows past C in an
                          expert, in token order, are dropped: zero output and zero gradient, like the
                          router's capacity mask) or, when None, the largest expert count over the group
                          (one scalar all-reduce: exact).

Every rank of the group must call the layer at each step, even with zero tokens, and backpropagate
through its output (the backward pass exchanges gradients: it is a collective too).

Gradients. The expert shard's gradient sums the contributions of every rank's tokens, i.e. it is the
gradient of ``sum_r loss_r``; replicated parameters (router, the rest of the model) get this rank's
``loss_r`` only. With data-parallel training (DDP averages replicated grads over the world),
call :func:`sync_expert_grads` after ``backward``: it all-reduces shards over ``dp_group`` (the ranks
holding the same shard, see :func:`make_groups`) and divides by the world size, so every parameter
gets the gradient of the global mean loss. :func:`~moelab.parallel.ddp.wrap_model` leaves shard
parameters out of DDP.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe import dispatch as D
from moelab.moe.experts import Experts, ModuleExperts
from moelab.moe.layer import MoE
from moelab.parallel.comm import all_to_all, exchange_counts

__all__ = ["ShardedExperts", "ExpertParallelMoE", "expert_parallel", "sync_expert_grads", "make_groups",
           "shard_params"]


def _group_size_rank(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _rows_plan(counts: Tensor) -> D.DispatchPlan:
    """Plan for rows already grouped by expert with ``counts`` (El,) rows each (k = 1, identity order)."""
    rows = torch.arange(int(counts.sum()), device=counts.device)
    expert = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    return D.DispatchPlan(order=rows, token=rows, expert=expert, counts=counts,
                          offsets=counts.cumsum(0).to(torch.int32), inverse=rows, num_tokens=rows.numel(), k=1)


def slice_experts(experts: Experts, lo: int, hi: int) -> Experts:
    """A copy of experts ``[lo, hi)``: a ModuleExperts' modules, or every parameter/buffer with a leading
    expert dimension sliced (MLPExperts' ``w1 (E, in, h)`` -> ``(hi - lo, in, h)``, ...)."""
    e = experts.num_experts
    if isinstance(experts, ModuleExperts):
        return ModuleExperts([copy.deepcopy(m) for m in experts.experts[lo:hi]])
    memo = {id(t): None for t in [*experts.parameters(), *experts.buffers()]}  # don't copy full tensors
    out = copy.deepcopy(experts, memo)
    for src, dst in zip(experts.modules(), out.modules()):
        for store in ("_parameters", "_buffers"):
            for name, t in getattr(src, store).items():
                if t is None:
                    continue
                if t.dim() == 0 or t.shape[0] != e:
                    raise MoelabError(f"cannot shard {type(experts).__name__}: tensor '{name}' {tuple(t.shape)} "
                                      f"has no leading expert dimension of size {e}")
                piece = t.detach()[lo:hi].clone()
                getattr(dst, store)[name] = nn.Parameter(piece, t.requires_grad) if store == "_parameters" else piece
    out.num_experts = hi - lo
    return out


class ShardedExperts(Experts):
    """All E experts as seen by one rank: ``local`` holds experts [r*El, (r+1)*El), the others are
    reached through all-to-all over ``group``. Shapes as :class:`Experts` with E = ``num_experts``:

        forward_groups(xs (M, *in) sorted by expert, plan with counts (E,)) -> (M, *out)
        forward_slots(xs (E, C, *in)) -> (E, C, *out)

    Every rank of the group must call these together (they are collectives)."""

    def __init__(self, local: Experts, num_experts: int, group=None, *, exchange: str = "dropless",
                 capacity: int | None = None, dp_group=None):
        super().__init__()
        w, r = _group_size_rank(group)
        if exchange not in ("dropless", "padded"):
            raise MoelabError(f"expert-parallel exchange must be 'dropless' or 'padded', got {exchange!r}")
        if num_experts % w or local.num_experts != num_experts // w:
            raise MoelabError(f"expert parallelism needs num_experts ({num_experts}) divisible by the group size "
                              f"({w}) and {num_experts // w} local experts, got {local.num_experts}")
        self.local, self.num_experts, self.group, self.dp_group = local, num_experts, group, dp_group
        self.world, self.rank, self.num_local = w, r, num_experts // w
        self.exchange, self.capacity = exchange, capacity
        for p in local.parameters():
            p._moelab_expert_shard = True
        for name in ("in_dim", "out_dim", "hidden_dim"):
            if hasattr(local, name):
                setattr(self, name, getattr(local, name))

    def __deepcopy__(self, memo: dict) -> ShardedExperts:
        """Copies the shard, shares the process groups (they cannot be copied)."""
        memo[id(self.group)], memo[id(self.dp_group)] = self.group, self.dp_group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    @classmethod
    def from_experts(cls, experts: Experts, group=None, **kw) -> ShardedExperts:
        """Keep this rank's slice of a full (identical on every rank) expert stack."""
        if not isinstance(experts, Experts):
            raise MoelabError(f"expert parallelism needs an Experts stack (MLPExperts, ModuleExperts), got "
                              f"{type(experts).__name__}")
        w, r = _group_size_rank(group)
        el = experts.num_experts // w
        if experts.num_experts % w:
            raise MoelabError(f"expert parallelism: num_experts={experts.num_experts} is not divisible by the "
                              f"group size {w}")
        return cls(slice_experts(experts, r * el, (r + 1) * el), experts.num_experts, group, **kw)

    @property
    def expert_range(self) -> tuple[int, int]:
        return self.rank * self.num_local, (self.rank + 1) * self.num_local

    def extra_repr(self) -> str:
        lo, hi = self.expert_range
        return f"num_experts={self.num_experts}, local=[{lo}, {hi}), world={self.world}, exchange={self.exchange!r}"

    # ------------------------------------------------------------ exchanges
    def _rows(self, xs: Tensor, counts: Tensor) -> Tensor:
        """Dropless: xs (M, *in) grouped by global expert with counts (E,) -> (M, *out)."""
        w, el = self.world, self.num_local
        send_c = counts.view(w, el)  # rows for each rank's local experts
        recv_c = exchange_counts(send_c, self.group)  # (W, El): from rank s for my expert j
        send, recv = send_c.sum(1).tolist(), recv_c.sum(1).tolist()  # host sync (split sizes)
        got = all_to_all(xs, send, recv, self.group)  # (R, *in) grouped by (source, expert)
        seg = torch.repeat_interleave(torch.arange(w * el, device=counts.device), recv_c.reshape(-1))
        perm = torch.argsort((seg % el) * w + seg // el, stable=True)  # -> grouped by (expert, source)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        ys = self.local.forward_groups(got.index_select(0, perm), _rows_plan(recv_c.sum(0)))
        return all_to_all(ys.index_select(0, inv), recv, send, self.group)  # (M, *out)

    def _slots(self, xs: Tensor) -> Tensor:
        """Padded: xs (E, C, *in), same C on every rank -> (E, C, *out); equal-split exchanges."""
        w, el, c = self.world, self.num_local, xs.shape[1]
        f = xs.shape[2:]
        part = [el * c] * w
        got = all_to_all(xs.reshape(w * el * c, *f), part, part, self.group)  # (W*El*C, *in) by source
        got = got.view(w, el, c, *f).transpose(0, 1).reshape(el, w * c, *f)  # (El, W*C, *in)
        ys = self.local.forward_slots(got)  # (El, W*C, *out)
        o = ys.shape[2:]
        ys = ys.view(el, w, c, *o).transpose(0, 1).reshape(w * el * c, *o)
        return all_to_all(ys, part, part, self.group).view(w * el, c, *o)

    def _group_max(self, value: int | Tensor) -> int:
        t = torch.as_tensor(value, device=self._device()).reshape(1).long()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t)

    def _device(self) -> torch.device:
        p = next(self.local.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ------------------------------------------------------------ Experts API
    def forward_groups(self, xs: Tensor, plan: D.DispatchPlan) -> Tensor:
        if self.exchange == "dropless":
            return self._rows(xs, plan.counts)
        e = self.num_experts
        cap = self.capacity if self.capacity is not None else self._group_max(plan.counts.max())
        pos = torch.arange(plan.num_rows, device=xs.device) - (plan.offsets.long() - plan.counts)[plan.expert]
        slot = torch.where(pos < cap, plan.expert * cap + pos, e * cap)  # row past capacity -> trash slot E*C
        padded = xs.new_zeros(e * cap + 1, *xs.shape[1:]).index_copy(0, slot, xs)[: e * cap]
        ys = self._slots(padded.view(e, cap, *xs.shape[1:]))  # (E, C, *out)
        ys = ys.reshape(e * cap, *ys.shape[2:])
        return torch.cat([ys, ys.new_zeros(1, *ys.shape[1:])]).index_select(0, slot)  # (M, *out)

    def forward_slots(self, xs: Tensor) -> Tensor:
        e, c = xs.shape[:2]
        if self.exchange == "dropless":
            ys = self._rows(xs.reshape(e * c, *xs.shape[2:]), torch.full((e,), c, device=xs.device))
            return ys.view(e, c, *ys.shape[1:])
        cmax = self._group_max(c)  # ranks may have different C (e.g. expert choice on unequal batches)
        if cmax > c:
            xs = torch.cat([xs, xs.new_zeros(e, cmax - c, *xs.shape[2:])], 1)
        return self._slots(xs)[:, :c]

    def forward_sparse(self, x: Tensor, indices: Tensor, weights: Tensor | None = None,
                       mask: Tensor | None = None) -> Tensor:
        if x.shape[0] == 0:  # no tokens here: still take part in both exchanges (forward and backward)
            plan = D.sort_by_expert(indices, self.num_experts, mask)
            ys = self.forward_groups(D.gather_sorted(x, plan), plan)  # (0, *out), attached to the graph
            return ys.reshape(0, *([indices.shape[1]] if weights is None else []), *ys.shape[1:])
        return super().forward_sparse(x, indices, weights, mask)

    def gather(self) -> Experts:
        """The full expert stack on every rank (all-gather of the shards; for checkpoints / evaluation): a
        new module on this shard's device. The live shard is left as it is (same parameter objects, same
        device): training goes on after a gather."""
        if isinstance(self.local, ModuleExperts):
            objs: list = [None] * self.world
            # host copies to pickle (nn.Module.cpu() would move the live experts themselves)
            mine = [_host_copy(m) for m in self.local.experts]
            dist.all_gather_object(objs, mine, group=self.group)
            return ModuleExperts([m for part in objs for m in part]).to(self._device())
        full = copy.deepcopy(self.local)  # the live tensors are replaced below, never moved
        for sub in full.modules():
            for store in (sub._parameters, sub._buffers):
                for name, t in store.items():
                    if t is None:
                        continue
                    parts = [torch.empty_like(t) for _ in range(self.world)]
                    dist.all_gather(parts, t.detach().contiguous(), group=self.group)
                    cat = torch.cat(parts)
                    store[name] = nn.Parameter(cat, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else cat
        full.num_experts = self.num_experts
        return full


def _host_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every tensor on the CPU, made without moving ``module`` (and without
    copying its device tensors on the device first)."""
    memo = {id(t): None for t in [*module.parameters(), *module.buffers()]}  # filled in below, on the host
    out = copy.deepcopy(module, memo)
    for src, dst in zip(module.modules(), out.modules()):
        for store in ("_parameters", "_buffers"):
            for name, t in getattr(src, store).items():
                if t is None:
                    continue
                host = t.detach().to("cpu", copy=True)
                getattr(dst, store)[name] = nn.Parameter(host, t.requires_grad) if store == "_parameters" else host
    return out


class ExpertParallelMoE(MoE):
    """An :class:`~moelab.moe.MoE` whose ``experts`` is a :class:`ShardedExperts`; forward is ``MoE.forward``."""

    @classmethod
    def from_moe(cls, layer: MoE, group=None, *, exchange: str = "dropless", capacity: int | None = None,
                 dp_group=None) -> ExpertParallelMoE:
        """Copy ``layer`` (router and options replicated) keeping only this rank's experts.

        ``layer`` must be identical on every rank of ``group`` (same seed / broadcast weights)."""
        if not isinstance(layer, MoE):
            raise MoelabError(f"ExpertParallelMoE.from_moe needs a MoE layer, got {type(layer).__name__}")
        if isinstance(layer.experts, ShardedExperts):
            raise MoelabError("this MoE layer is already expert-parallel")
        sharded = ShardedExperts.from_experts(layer.experts, group, exchange=exchange, capacity=capacity,
                                              dp_group=dp_group)
        ep = copy.deepcopy(layer, {id(layer.experts): None})
        ep.__class__ = cls
        ep.experts = sharded
        return ep

    def to_moe(self) -> MoE:
        """A single-process :class:`MoE` with all experts gathered (collective over the group): a copy on this
        layer's device; this layer is left as it is (:meth:`ShardedExperts.gather`)."""
        full = copy.deepcopy(self, {id(self.experts): None})
        full.__class__ = MoE
        full.experts = self.experts.gather()
        return full


def expert_parallel(model: nn.Module, group=None, **kw) -> nn.Module:
    """Replace every :class:`MoE` in ``model`` (or ``model`` itself) by its :class:`ExpertParallelMoE`."""
    if isinstance(model, MoE) and not isinstance(model, ExpertParallelMoE):
        return ExpertParallelMoE.from_moe(model, group, **kw)
    for name, child in list(model.named_children()):
        new = expert_parallel(child, group, **kw)
        if new is not child:
            setattr(model, name, new)
    return model


def shard_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the expert shards in ``model`` (what DDP must not all-reduce)."""
    return [(n, p) for n, p in model.named_parameters() if getattr(p, "_moelab_expert_shard", False)]


@torch.no_grad()
def sync_expert_grads(model: nn.Module, world_size: int | None = None) -> None:
    """After ``backward``: turn each expert shard's gradient (a sum over its group's ranks' losses) into
    the gradient of the mean over all ``world_size`` ranks' losses (default: the default group's size),
    the convention DDP uses for the replicated parameters. Shards held by several ranks (``dp_group``)
    are all-reduced over those first. A shard that got no gradient counts as zero."""
    world = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    for m in model.modules():
        if not isinstance(m, ShardedExperts):
            continue
        for p in m.local.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if m.dp_group is not None and dist.get_world_size(m.dp_group) > 1:
                dist.all_reduce(p.grad, group=m.dp_group)
            p.grad.div_(world)


def make_groups(ep_size: int) -> tuple[object, object]:
    """(ep_group, dp_group) of this rank for ``world = dp * ep_size`` ranks: expert-parallel groups of
    consecutive ranks ``[i*ep_size, (i+1)*ep_size)``; a shard's data-parallel group holds the ranks with
    the same position in their EP group (ranks ``j, j + ep_size, ...``). Collective: call on every rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise MoelabError(f"expert-parallel size {ep_size} must divide the world size {world}")
    ep_group = dp_group = None
    for i in range(world // ep_size):
        g = dist.new_group(list(range(i * ep_size, (i + 1) * ep_size)))
        if rank // ep_size == i:
            ep_group = g
    for j in range(ep_size):
        g = dist.new_group(list(range(j, world, ep_size)))
        if rank % ep_size == j:
            dp_group = g
    return ep_group, dp_group
