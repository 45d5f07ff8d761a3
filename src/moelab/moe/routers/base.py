"""Router base class and the routing decision it returns.

A router maps tokens x (N, d) to a :class:`Routing`:

    kind      how the layer executes it: "dense" (every expert on every token, mixed by
              ``gates``), "sparse" (``indices``/``weights``, optional ``mask``), "expert_choice"
              (``expert_tokens``/``expert_weights``), "soft" (``dispatch``/``combine``), "multi"
              (``multi_gates`` + ``multi_mode``)
    gates     (N, E)  dense view of the combine weights (zeros for unselected experts)
    logits    (N, E)  raw router logits, float32
    losses    name -> scalar auxiliary loss (unweighted); always returned, each computed when first read
              (:class:`LazyLosses`: the layer reads only the weighted ones)

Every router takes ``gate``: an optional ``nn.Module`` mapping x -> logits (N, E) used instead
of the default ``nn.Linear(dim, E, bias=False)``. A plain ``nn.Linear`` gate (the default) runs in float32
(float64 for float64 inputs) with autocast off: which experts a token goes to must not depend on the
compute precision (any other gate module runs as given). Routing has static shapes and reads nothing back
to the host (except the optional finite check, :func:`finite_checks_on`): no bincount, one_hot or .item().

Recipe options (validated by the router that takes them):

    init         "default" | "zeros": the gate's output layer starts at 0, every expert scored alike
                 (Chen et al. 2022); every router with a learned gate
    train_noise  "none" | "uniform": U(0, noise_scale) added, in training only, to the scores that *choose*
                 the experts (Chen et al. 2022); top-k and switch
    balance      "aux" | "bias": "bias" is auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias
                 buffer added to the choosing scores only, moved by ``bias_rate`` against each step's load
                 (:meth:`Router.update_bias`, :func:`update_router_biases` after each optimiser step); no
                 balance loss by default; top-k and switch

Noise and bias change which experts a token goes to, never its combine weights (those come from the logits).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe.dispatch import AUTOCAST_DEVICES, flat_expert_ids


class LazyLosses(MutableMapping):
    """name -> auxiliary loss, each given as a tensor or as a function computing it on first read.

    A router offers every loss it can compute; the layer adds only those with a weight, so the others cost
    nothing unless read (``aux.losses[name]``, logging). A read computes the value from the routing's tensors
    as they were in the forward pass, with autograd as it is at the read."""

    def __init__(self, losses: dict[str, Tensor | Callable[[], Tensor]] | None = None):
        self._values = dict(losses or {})

    def __getitem__(self, name: str) -> Tensor:
        v = self._values[name]
        if callable(v):
            v = self._values[name] = v()
        return v

    def __setitem__(self, name: str, value: Tensor | Callable[[], Tensor]) -> None:
        self._values[name] = value

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"LazyLosses({', '.join(self._values)})"


@dataclass
class Routing:
    kind: str
    gates: Tensor | None  # (N, E); None = derived lazily from indices/weights/mask (dense_gates())
    expert_counts: Tensor  # (E,) long
    dropped: Tensor  # () long
    logits: Tensor | None = None  # (N, E)
    indices: Tensor | None = None  # (N, k)
    weights: Tensor | None = None  # (N, k)
    mask: Tensor | None = None  # (N, k) bool, False = dropped
    expert_tokens: Tensor | None = None  # (E, C) expert choice
    expert_weights: Tensor | None = None  # (E, C)
    dispatch: Tensor | None = None  # (B, m, S) soft MoE, softmax over tokens m
    combine: Tensor | None = None  # (B, m, S) soft MoE, softmax over slots S
    multi_gates: Tensor | None = None  # (G, N, E)
    multi_mode: str = "sum"
    losses: MutableMapping[str, Tensor] = field(default_factory=dict)  # a dict or LazyLosses
    capacity: int | None = None  # sparse routings with a capacity: no expert keeps more than this many rows

    def dense_gates(self) -> Tensor:
        """(N, E) combine weights, dense view (zeros for unselected / dropped experts); computed once."""
        if self.gates is None:
            w = self.weights if self.mask is None else self.weights * self.mask
            self.gates = dense_from_sparse(self.indices, w, self.expert_counts.shape[0])
        return self.gates


INITS, TRAIN_NOISES, BALANCES = ("default", "zeros"), ("none", "uniform"), ("aux", "bias")


class Router(nn.Module):
    """Base: holds the gating network and validates logits. Subclasses implement :meth:`route`."""

    name: ClassVar[str] = "router"
    #: losses this router returns in ``Routing.losses`` and the weights MoE uses by default (an instance
    #: attribute overrides them where an option changes them: ``balance="bias"`` drops "balance")
    loss_names: ClassVar[tuple[str, ...]] = ()
    default_loss_weights: ClassVar[dict[str, float]] = {}
    #: whether the router takes ``k`` (experts per token), the option :class:`~moelab.moe.MoE` has a shortcut for
    takes_k: ClassVar[bool] = False
    #: gating modules the router takes besides ``gate`` (option names, each x -> (N, E)), e.g. noisy top-k's
    #: ``noise_gate``; a model with a custom ``gate`` passes one of each, zero-initialised
    extra_gates: ClassVar[tuple[str, ...]] = ()
    #: the selection options' values for routers that do not take them (see :meth:`setup_selection`)
    train_noise, balance = "none", "aux"

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | None = None,
                 num_logits: int | None = None, default_gate: bool = True, init: str = "default"):
        super().__init__()
        check_int(self.name, "num_experts", num_experts, 1)
        self.dim, self.num_experts = dim, num_experts
        self.num_logits = num_experts if num_logits is None else num_logits
        if gate is None and default_gate:
            if dim is None:
                raise MoelabError(f"router {self.name!r}: give either dim (for the default linear gate) or gate=")
            gate = nn.Linear(dim, self.num_logits, bias=False)
        self.gate = gate
        if check_choice(self.name, "init", init, INITS) == "zeros":
            zero_gate(self.name, gate)

    def setup_selection(self, train_noise: str, noise_scale: float, balance: str, bias_rate: float) -> None:
        """Validate and keep the options that move which experts a token picks (module docstring). ``balance=
        "bias"`` registers ``expert_bias`` (E,) (saved in the state_dict) and ``expert_load`` (E,) long, the
        tokens each expert was picked for since the last :meth:`update_bias` (not saved: 0 after every step)."""
        self.train_noise = check_choice(self.name, "train_noise", train_noise, TRAIN_NOISES)
        self.noise_scale = check_float(self.name, "noise_scale", noise_scale, 0.0, strict=True)
        self.balance = check_choice(self.name, "balance", balance, BALANCES)
        self.bias_rate = check_float(self.name, "bias_rate", bias_rate, 0.0, strict=True)
        if self.balance == "bias":
            self.register_buffer("expert_bias", torch.zeros(self.num_experts))
            self.register_buffer("expert_load", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
            self.default_loss_weights = {n: w for n, w in type(self).default_loss_weights.items() if n != "balance"}

    def selection_scores(self, logits: Tensor) -> Tensor | None:
        """(N, E) scores the experts are chosen on (logits + expert bias + training noise), or None when they are
        the logits themselves. Static: branches on options and ``self.training`` only."""
        sel = logits + self.expert_bias.to(logits.dtype) if self.balance == "bias" else None
        if self.train_noise == "uniform" and self.training:
            sel = (logits if sel is None else sel) + torch.rand_like(logits) * self.noise_scale
        return sel

    def record_load(self, indices: Tensor) -> None:
        """Bias balancing, in training: add the (N, k) choices' tokens per expert to ``expert_load`` (on the device)."""
        if self.balance == "bias" and self.training:
            self.expert_load += counts_of(indices, self.num_experts)

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += bias_rate * sign(mean load - load_i) (DeepSeek-V3), the load summed since the last call and over
        data-parallel ranks; then the load restarts at 0. Exact integer comparison (sum - E * load_i), tensor ops
        on the device: no host sync. No load (no training forward since) leaves the bias as it is."""
        load = self.expert_load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        delta = torch.sign(load.sum() - self.num_experts * load).to(self.expert_bias.dtype)  # (E,) in {-1, 0, 1}
        self.expert_bias.add_(delta, alpha=self.bias_rate)
        self.expert_load.zero_()

    def logits(self, x: Tensor, check: bool = True) -> Tensor:
        """x (..., d) -> float32 (float64 for float64 x) logits (..., num_logits); non-finite logits raise MoelabError
        (``check=False``: the caller checks them, e.g. the fused top-k kernel, which counts them as it goes)."""
        logits = project(self.gate, x)
        if logits.shape[:-1] != x.shape[: logits.dim() - 1] or logits.shape[-1] != self.num_logits:
            raise MoelabError(f"router {self.name!r}: gate must map x {tuple(x.shape)} to logits "
                              f"(..., {self.num_logits}), got {tuple(logits.shape)}")
        logits = to_float(logits)
        if check:
            check_finite(logits, self.name)
        return logits

    def route(self, x: Tensor) -> Routing:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Routing:
        return self.route(x)


def to_float(t: Tensor) -> Tensor:
    """Routing math runs in float32 (or float64 when the input is float64), never in bf16/fp16."""
    return t if t.dtype == torch.float64 else t.float()


def fp32_of(*ts: Tensor) -> torch.dtype:
    """float64 if any of ``ts`` is float64, else float32: the dtype routing projections run in."""
    for t in ts:  # a loop, not any(generator): this runs in every router call
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device`` (a no-op where autocast does not exist, e.g. meta)."""
    if device.type not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def linear_fp32(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., d) @ weight (o, d)^T (+ bias) in float32 (float64 if x or weight is) with autocast off: a routing
    projection whose top-k must not change with the compute precision (bf16 autocast would round x and W)."""
    dt = fp32_of(x, weight)
    if x.dtype != dt:
        x = x.to(dt)
    if weight.dtype != dt:
        weight = weight.to(dt)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    if x.device.type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)  # (entering a disabled autocast costs more than this GEMM at router sizes)
    with autocast_off(x.device):
        return F.linear(x, weight, bias)


def project(gate: nn.Module, x: Tensor) -> Tensor:
    """A gating module on x: a plain ``nn.Linear`` (the default gate, or one passed as ``gate=``) in float32
    (:func:`linear_fp32`), any other module as it is (under autocast, in its dtype)."""
    if type(gate) is nn.Linear:
        return linear_fp32(x, gate.weight, gate.bias)
    return gate(x)


CHECK_FINITE_ENV = "MOELAB_CHECK_FINITE"


def finite_checks_on(device: torch.device) -> bool:
    """Whether routers test their logits for NaN/inf on ``device``.

    The test reads a value back to the host. On the CPU that costs nothing (no device queue to drain),
    so it is always on there; on an accelerator it would stall the stream once per MoE layer and
    forward, so it runs only when ``$MOELAB_CHECK_FINITE=1`` (debugging a diverging run)."""
    if device.type == "cpu":
        return os.environ.get(CHECK_FINITE_ENV, "1").strip() != "0"
    return os.environ.get(CHECK_FINITE_ENV, "0").strip() == "1"


def check_finite(logits: Tensor, name: str) -> None:
    """Raise a MoelabError naming the router on NaN/inf logits (skipped while torch.compile traces or a
    torch.func transform runs, and on accelerators unless :func:`finite_checks_on` says so).

    A cheap test first (the sum of finite values is finite unless it overflows), then the exact one."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
            or not finite_checks_on(logits.device):
        return  # no data-dependent branch under torch.compile, vmap or grad transforms
    # host sync (CPU: free; accelerators: only with $MOELAB_CHECK_FINITE=1)
    if not bool(torch.isfinite(logits.sum())) and not bool(torch.isfinite(logits).all()):
        raise_nonfinite(name, int((~torch.isfinite(logits)).sum()))


def raise_nonfinite(name: str, bad: int) -> None:
    raise MoelabError(f"router {name!r} produced {bad} non-finite logits (NaN/inf): check the input and "
                      f"the gate's weights (learning rate too high?)")


def zero_gate(name: str, gate: nn.Module | None) -> None:
    """``init="zeros"``: the gate's last ``nn.Linear`` (each head's, for a list of gates) starts at 0."""
    heads = list(gate.gates) if isinstance(getattr(gate, "gates", None), nn.ModuleList) else [gate]
    for head in heads:
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
        if not linears:
            raise MoelabError(f"router {name!r}: init='zeros' zeroes the gate's last nn.Linear and the gate "
                              f"{type(head).__name__} has none; use init='default'")
        with torch.no_grad():
            linears[-1].weight.zero_()
            if linears[-1].bias is not None:
                linears[-1].bias.zero_()


def check_choice(name: str, option: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise MoelabError(f"router {name!r}: {option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_int(name: str, option: str, value, minimum: int) -> int:
    """An int (not a bool) >= minimum; MoelabError naming the router and the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoelabError(f"router {name!r}: {option} must be >= {minimum} (an int), got {value!r}")
    return value


def check_float(name: str, option: str, value, minimum: float = 0.0, *, strict: bool = False,
                below: float | None = None) -> float:
    """A finite real number (not a bool) >= minimum (> with ``strict``), < ``below`` when given -> float."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > minimum if strict else value >= minimum) and (below is None or value < below)
    if not ok:
        rng = f"{'>' if strict else '>='} {minimum:g}" + (f" and < {below:g}" if below is not None else "")
        raise MoelabError(f"router {name!r}: {option} must be {rng} (a finite number), got {value!r}")
    return float(value)


def check_bool(name: str, option: str, value) -> bool:
    if not isinstance(value, bool):
        raise MoelabError(f"router {name!r}: {option} must be True or False, got {value!r}")
    return value


def default_k(k: int | None, num_experts: int, default: int = 2) -> int:
    """k as given, or the router's default clamped to the number of experts (one expert: k = 1)."""
    return min(default, num_experts) if k is None else k


def check_k(name: str, k: int, num_experts: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > num_experts:
        raise MoelabError(f"router {name!r}: k must be an int in [1, num_experts={num_experts}], got {k!r}")
    return k


def warn_top1_softmax(name: str, k: int, num_experts: int) -> None:
    """k = 1 with weights = softmax over the chosen logits: that softmax is always 1, so the task loss gives
    the gate no gradient (only the auxiliary losses train it). Warned once per call site."""
    if k == 1 and num_experts > 1:
        warnings.warn(f"router {name!r} with k=1: the softmax over one chosen logit is always 1, so the gate "
                      f"learns only from the auxiliary losses, not from the task; use router='switch' (top-1 "
                      f"weighted by its full softmax probability)", UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel, seen from its caller's caller, of the first frame outside moelab: the
    user's line that built the layer (MoE, make_router or a router class)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))  # .../moelab
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(root + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def check_capacity_factor(name: str, cf: float | None, allow_none: bool = True) -> float | None:
    if cf is None and allow_none:
        return None
    return check_float(name, "capacity_factor", cf, 0.0, strict=True)


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * N * k / E), at least 1."""
    return max(1, int(-(-capacity_factor * num_tokens * k // num_experts)))


def capacity_mask(indices: Tensor, num_experts: int, capacity: int) -> Tensor:
    """(N, k) expert ids -> (N, k) bool keep mask: each expert keeps its first ``capacity`` assignments.

    Priority: all first choices (in token order) before all second choices, etc. (GShard/Switch).
    """
    n, k = indices.shape
    flat = indices.t().reshape(-1)  # (k*N,) choice-major order
    # a comparison, not F.one_hot: one_hot checks the ids' range on the host (a sync; no meta kernel)
    onehot = (flat.unsqueeze(1) == torch.arange(num_experts, device=flat.device)).long()  # (k*N, E)
    pos = (onehot.cumsum(0) * onehot).sum(1) - 1  # (k*N,) position within its expert
    return (pos < capacity).view(k, n).t()


def topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest logits per row, descending; (N, E) -> (N, k) each.

    For k <= 2, argmax (twice, masking the first winner) is a few times faster than ``torch.topk`` on
    CPU for (N, E) rows; values are gathered so gradients flow as with ``torch.topk``."""
    if k > 2 or logits.shape[-1] < 2:
        return logits.topk(k, dim=-1)
    i1 = logits.argmax(-1, keepdim=True)  # (N, 1)
    if k == 1:
        idx = i1
    else:
        rest = logits.detach().scatter(-1, i1, float("-inf"))
        idx = torch.cat([i1, rest.argmax(-1, keepdim=True)], dim=-1)  # (N, 2)
    return logits.gather(-1, idx), idx


def dense_from_sparse(indices: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """(N, k) indices and weights -> (N, E) dense gates."""
    return weights.new_zeros(indices.shape[0], num_experts).scatter_add(1, indices, weights)


def counts_of(indices: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    """(N, k) -> (E,) number of (kept) assignments per expert.

    A scatter_add, not ``torch.bincount``: bincount reads the ids' max back to the host (a sync on an
    accelerator, a graph break under torch.compile) and has no meta kernel."""
    flat = flat_expert_ids(indices, num_experts, mask)  # dropped assignments go to a sentinel bin E
    bins = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return bins.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]


def zero_long(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.long, device=device)
