"""The MoE layer: a router plus an expert stack.

    layer = MoE(dim=256, num_experts=8, hidden_dim=1024, router="topk", k=2)
    y, aux = layer(x)        # x (..., dim) -> y (..., out_dim); aux: MoEAux
    MoE(dim=256, num_experts=8, router="switch", router_options={"capacity_factor": 1.25})  # the router's options
    MoE(dim=256, num_experts=8, experts=MLPExperts(8, 256, 1024, activation="relu"))      # the experts' options

Execution by routing kind (N tokens = prod of x's leading dims, E experts):
    dense / multi    experts.forward_dense(x) (E, N, out) mixed by gates (N, E) (or G gate sets)
    sparse (top-k)   sort -> gather -> grouped GEMMs -> weighted scatter (``experts.forward_sparse``; with
                     the router's capacity, so that a static-shape path can use it)
    expert_choice    x[expert_tokens] (E, C, d) -> experts.forward_slots -> weighted index_add
    soft             slots = dispatch^T x (B, S, d) -> forward_slots -> combine @ slot outputs

``aux.loss`` is the weighted sum of the router's auxiliary losses (router defaults overridden by
``aux_loss_weights``); ``aux.losses`` holds every loss the router computed, unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe.experts import CallableExperts, Experts, MLPExperts, ModuleExperts
from moelab.moe.routers import Router, Routing, make_router

__all__ = ["MoE", "MoEAux", "LOSS_NAMES", "mix", "build_router"]

LOSS_NAMES = ("balance", "z", "importance", "load", "entropy")


@dataclass
class MoEAux:
    """Auxiliary outputs of :class:`MoE` (N = number of tokens, leading dims flattened)."""

    loss: Tensor  # () weighted sum of the auxiliary losses
    losses: dict[str, Tensor]  # name -> () unweighted
    logits: Tensor | None  # (N, E) router logits (float32)
    expert_counts: Tensor  # (E,) tokens (or slots) each expert processed
    dropped: Tensor  # () long, assignments/tokens dropped by capacity
    indices: Tensor | None = None  # (N, k) for top-k style routers
    expert_outputs: Tensor | None = None  # (E, N, out) for dense routers (Jacobs-style losses)
    routing: Routing | None = field(default=None, repr=False)

    @property
    def gates(self) -> Tensor:
        """(N, E) combine weights, dense view (built on first access for sparse routers)."""
        return self.routing.dense_gates()


def mix(r: Routing, expert_outputs: Tensor) -> Tensor:
    """Every expert's output ``(E, N, *out)`` mixed by routing ``r`` -> ``(N, *out)``.

    What :class:`MoE` does once the experts have run on every token: for "dense" and "sparse" routings the
    weighted sum by ``r.dense_gates()`` (unselected experts weigh 0), for "multi" one mixture per gate set,
    then their sum or element-wise max. Public so that a mixture over *cached* expert outputs (frozen
    experts, run once) routes and combines exactly like the layer."""
    if r.kind in ("dense", "sparse"):
        return torch.einsum("ne,en...->n...", r.dense_gates().to(expert_outputs.dtype), expert_outputs)
    if r.kind == "multi":
        per_gate = torch.einsum("gne,en...->gn...", r.multi_gates.to(expert_outputs.dtype), expert_outputs)
        return per_gate.sum(0) if r.multi_mode == "sum" else per_gate.amax(0)
    raise MoelabError(f"mix: routing kind {r.kind!r} runs experts on a subset of tokens or slots; only dense, "
                      f"sparse and multi routings mix outputs computed for every token")


def build_router(router: str | Router, dim: int | None, num_experts: int, k: int | None = None,
                 options: Mapping[str, Any] | None = None, gate: nn.Module | None = None) -> Router:
    """:class:`MoE`'s router: ``router`` by name with ``options`` (``k`` and ``gate`` among them when given), each
    validated by the router; or a built ``Router`` as it is (it then takes no options here)."""
    if options is not None and not isinstance(options, Mapping):
        raise MoelabError(f"MoE: router_options must be a mapping of option name -> value, got {options!r}")
    opts = dict(options or {})
    for key, val in (("k", k), ("gate", gate)):
        if val is not None:
            if key in opts:
                raise MoelabError(f"MoE: {key} given twice ({key}= and router_options[{key!r}]); give it once")
            opts[key] = val
    if isinstance(router, Router):
        if opts:
            raise MoelabError(f"MoE: router is a built {type(router).__name__} (router {router.name!r}); give "
                              f"{', '.join(sorted(opts))} to it when you build it, not to MoE")
        if router.num_experts != num_experts:
            raise MoelabError(f"MoE: num_experts={num_experts} but router {router.name!r} routes to "
                              f"{router.num_experts} experts")
        return router
    return make_router(router, dim, num_experts, **opts)


class MoE(nn.Module):
    """Mixture-of-experts layer.

    Args:
        dim: input width (``x`` is ``(..., dim)``). May be None with custom ``experts`` and a ``gate``;
            then ``x`` is ``(N, *features)`` and routing is per sample.
        num_experts: E.
        hidden_dim: the default experts' hidden width (default 4 * dim).
        router: a name from ``moelab.moe.routers.ROUTERS`` (or an alias), or a built ``Router`` (it then carries
            its own options: no ``k``, ``router_options`` or ``gate`` here).
        k: experts per token, for the routers that take it (``Router.takes_k``: topk, noisy_topk, hash); the
            router's default when None. A shortcut for ``router_options={"k": k}``.
        router_options: the router's further options, validated by the router (its keyword arguments:
            ``capacity_factor`` (topk, noisy_topk, switch, expert_choice), ``noise_epsilon`` (noisy_topk),
            ``slots_per_expert`` (soft), ``num_gates`` / ``mode`` (multi_gate), ``temperature`` (dense), the
            recipe options ``init``, ``train_noise``, ``balance`` / ``bias_rate`` (:mod:`moelab.moe.routers.base`), ...).
        gate: custom gating network x -> logits (N, E) replacing the router's default linear projection.
        experts: an ``Experts`` stack (e.g. ``MLPExperts(E, dim, hidden, activation="relu", bias=False)`` for
            other MLP options than the default GELU MLPs with bias), a list of modules (wrapped in
            ``ModuleExperts``), or a module with ``num_experts`` whose ``forward(x)`` is ``(E, N, ...)``.
            Default: ``MLPExperts(num_experts, dim, hidden_dim, out_dim)``.
        out_dim: the default experts' output width (default dim).
        aux_loss_weights: name -> weight for "balance", "z", "importance", "load", "entropy" (finite, >= 0;
            "entropy" may be negative: it then spreads the gates); overrides the router's defaults.

    A batch of no tokens gives an empty output and zero auxiliary losses.
    """

    def __init__(self, dim: int | None = None, num_experts: int = 8, hidden_dim: int | None = None,
                 router: str | Router = "topk", k: int | None = None, *,
                 router_options: Mapping[str, Any] | None = None, gate: nn.Module | None = None,
                 experts: Experts | Sequence[nn.Module] | nn.Module | None = None, out_dim: int | None = None,
                 aux_loss_weights: Mapping[str, float] | None = None):
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise MoelabError(f"MoE: dim must be a positive int, got {dim!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise MoelabError(f"MoE: num_experts must be a positive int, got {num_experts!r}")
        self.dim, self.num_experts = dim, num_experts
        if experts is None:
            if dim is None:
                raise MoelabError("MoE: dim is required unless you pass experts= (and gate=)")
            experts = MLPExperts(num_experts, dim, 4 * dim if hidden_dim is None else hidden_dim, out_dim)
        elif not isinstance(experts, nn.Module) or isinstance(experts, nn.ModuleList):
            experts = ModuleExperts(list(experts))
        elif not isinstance(experts, Experts) and hasattr(experts, "num_experts"):
            experts = CallableExperts(experts)  # forward(x) -> (E, N, ...), e.g. the CIFAR seed's ConvExperts
        if not hasattr(experts, "forward_dense"):
            raise MoelabError(f"MoE: experts must be an Experts stack (MLPExperts, ModuleExperts, ...), a module "
                              f"with num_experts whose forward gives (E, N, ...), or a list of modules, got "
                              f"{type(experts).__name__}")
        if getattr(experts, "num_experts", num_experts) != num_experts:
            raise MoelabError(f"MoE: num_experts={num_experts} but the experts stack has {experts.num_experts}")
        self.experts = experts
        self.out_dim = getattr(experts, "out_dim", out_dim)
        self.router = build_router(router, dim, num_experts, k, router_options, gate)

        weights = dict(self.router.default_loss_weights)
        for name, w in (aux_loss_weights or {}).items():
            if name not in LOSS_NAMES:
                raise MoelabError(f"MoE: unknown auxiliary loss {name!r} in aux_loss_weights; "
                                  f"valid: {', '.join(LOSS_NAMES)}")
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) \
                    or (w < 0 and name != "entropy"):
                raise MoelabError(f"MoE: aux_loss_weights[{name!r}] must be a finite number >= 0 (any finite "
                                  f"number for 'entropy': < 0 spreads the gates), got {w!r}")
            if w and name not in self.router.loss_names:
                raise MoelabError(f"MoE: router {self.router.name!r} does not produce the {name!r} loss "
                                  f"(it produces {list(self.router.loss_names) or 'none'}); remove it from "
                                  f"aux_loss_weights instead of having it ignored")
            weights[name] = float(w)
        self.aux_loss_weights = {n: w for n, w in weights.items() if w}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, aux_loss_weights={self.aux_loss_weights}"

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        if self.dim is not None:
            if x.dim() < 1 or x.shape[-1] != self.dim:
                raise MoelabError(f"MoE expected input of shape (..., {self.dim}), got {tuple(x.shape)}")
            lead = x.shape[:-1]  # explicit sizes below: -1 is ambiguous for a batch of no tokens
            if self.router.name == "soft":  # groups of m tokens: (B, m, d); a 2-D x is m = 1
                xr = x.reshape(math.prod(x.shape[:-2]), x.shape[-2], self.dim) if x.dim() >= 3 \
                    else x.reshape(math.prod(lead), 1, self.dim)
            else:
                xr = x if x.dim() == 2 else x.reshape(math.prod(lead), self.dim)
        else:
            lead, xr = x.shape[:1], x
        r = self.router(xr)
        xf = xr.reshape(xr.shape[0] * xr.shape[1], *xr.shape[2:]) if r.kind == "soft" else xr
        expert_outputs = None
        every = r.kind in ("dense", "multi") or (r.kind == "sparse" and r.mask is None
                                                  and r.indices.shape[1] == self.num_experts)
        if every:
            expert_outputs = self.experts.forward_dense(xf)  # (E, N, *out)
            y = mix(r, expert_outputs)
        elif r.kind == "sparse":  # the router's capacity lets MLPExperts run a static-shape batch
            cap = {"capacity": r.capacity} if r.capacity is not None and isinstance(self.experts, MLPExperts) else {}
            y = self.experts.forward_sparse(xf, r.indices, r.weights, r.mask, **cap)
        elif r.kind == "expert_choice":
            y = self._expert_choice(xf, r)
        elif r.kind == "soft":
            y = self._soft(xr, r)
        else:  # pragma: no cover - a Router subclass with an unknown kind
            raise MoelabError(f"router {self.router.name!r} returned unknown routing kind {r.kind!r}")

        loss = None  # the weighted sum, without a zero to start from (one op less per step and in backward)
        for name, w in self.aux_loss_weights.items():
            term = w * r.losses[name]
            loss = term if loss is None else loss + term
        if loss is None:
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
        aux = MoEAux(loss=loss, losses=r.losses, logits=r.logits, expert_counts=r.expert_counts,
                     dropped=r.dropped, indices=r.indices, expert_outputs=expert_outputs, routing=r)
        return (y if x.dim() == 2 and self.dim is not None else y.reshape(*lead, *y.shape[1:])), aux

    def _expert_choice(self, x: Tensor, r: Routing) -> Tensor:
        e, c = r.expert_tokens.shape
        tok = r.expert_tokens.reshape(-1)  # (E*C,)
        ys = self.experts.forward_slots(x.index_select(0, tok).view(e, c, *x.shape[1:]))  # (E, C, *out)
        w = r.expert_weights.to(ys.dtype).view(e, c, *([1] * (ys.dim() - 2)))
        contrib = (w * ys).reshape(e * c, *ys.shape[2:])
        return contrib.new_zeros(x.shape[0], *ys.shape[2:]).index_add(0, tok, contrib)

    def _soft(self, x: Tensor, r: Routing) -> Tensor:
        b, m, d = x.shape
        e = self.num_experts
        disp, comb = r.dispatch.to(x.dtype), r.combine
        slots = torch.einsum("bms,bmd->bsd", disp, x)  # (B, S, d)
        p = slots.shape[1] // e
        xs = slots.view(b, e, p, d).transpose(0, 1).reshape(e, b * p, d)  # (E, B*p, d)
        ys = self.experts.forward_slots(xs)  # (E, B*p, out)
        o = ys.shape[-1]
        ys = ys.view(e, b, p, o).transpose(0, 1).reshape(b, e * p, o)  # (B, S, out)
        y = torch.einsum("bms,bso->bmo", comb.to(ys.dtype), ys)  # (B, m, out)
        return y.reshape(b * m, o)
