"""Router base class and the routing decision it returns.

A router maps tokens x (N, d) to a :class:`Routing`:

    kind      how the layer executes it: "dense" (every expert on every token, mixed by
              ``gates``), "sparse" (``indices``/``weights``, optional ``mask``), "expert_choice"
              (``expert_tokens``/``expert_weights``), "soft" (``dispatch``/``combine``), "multi"
              (``multi_gates`` + ``multi_mode``)
    gates     (N, E)  dense view of the combine weights (zeros for unselected experts)
    logits    (N, E)  raw router logits, float32
    losses    dict name -> scalar auxiliary loss (unweighted); always returned

Every router takes ``gate``: an optional ``nn.Module`` mapping x -> logits (N, E) used instead
of the default ``nn.Linear(dim, E, bias=False)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError


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
    losses: dict[str, Tensor] = field(default_factory=dict)

    def dense_gates(self) -> Tensor:
        """(N, E) combine weights, dense view (zeros for unselected / dropped experts); computed once."""
        if self.gates is None:
            w = self.weights if self.mask is None else self.weights * self.mask
            self.gates = dense_from_sparse(self.indices, w, self.expert_counts.shape[0])
        return self.gates


class Router(nn.Module):
    """Base: holds the gating network and validates logits. Subclasses implement :meth:`route`."""

    name: ClassVar[str] = "router"
    #: losses this router returns in ``Routing.losses`` and the weights MoE uses by default
    loss_names: ClassVar[tuple[str, ...]] = ()
    default_loss_weights: ClassVar[dict[str, float]] = {}

    def __init__(self, dim: int | None, num_experts: int, *, gate: nn.Module | None = None,
                 num_logits: int | None = None, default_gate: bool = True):
        super().__init__()
        if num_experts < 1:
            raise MoelabError(f"router {self.name!r}: num_experts must be >= 1, got {num_experts}")
        self.dim, self.num_experts = dim, num_experts
        self.num_logits = num_experts if num_logits is None else num_logits
        if gate is None and default_gate:
            if dim is None:
                raise MoelabError(f"router {self.name!r}: give either dim (for the default linear gate) or gate=")
            gate = nn.Linear(dim, self.num_logits, bias=False)
        self.gate = gate

    def logits(self, x: Tensor) -> Tensor:
        """x (..., d) -> float32 (float64 for float64 x) logits (..., num_logits); non-finite logits raise MoelabError."""
        logits = self.gate(x)
        if logits.shape[:-1] != x.shape[: logits.dim() - 1] or logits.shape[-1] != self.num_logits:
            raise MoelabError(f"router {self.name!r}: gate must map x {tuple(x.shape)} to logits "
                              f"(..., {self.num_logits}), got {tuple(logits.shape)}")
        logits = to_float(logits)
        check_finite(logits, self.name)
        return logits

    def route(self, x: Tensor) -> Routing:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Routing:
        return self.route(x)


def to_float(t: Tensor) -> Tensor:
    """Routing math runs in float32 (or float64 when the input is float64), never in bf16/fp16."""
    return t if t.dtype == torch.float64 else t.float()


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
        bad = int((~torch.isfinite(logits)).sum())
        raise MoelabError(f"router {name!r} produced {bad} non-finite logits (NaN/inf): check the input and "
                          f"the gate's weights (learning rate too high?)")


GATE_VALUES = ("softmax", "raw")


def check_gate_values(name: str, gate_values: str) -> str:
    """``"softmax"``: combine weights are the softmax of the gate's logits (the usual router).
    ``"raw"``: the gate's outputs *are* the combine weights, un-normalised (the CIFAR seed's dense + ELU
    gates); top-k routers keep the k largest and pass them through ReLU (the seed's sparse gating)."""
    if gate_values not in GATE_VALUES:
        raise MoelabError(f"router {name!r}: gate_values must be one of {', '.join(GATE_VALUES)}, got {gate_values!r}")
    return gate_values


def check_k(name: str, k: int, num_experts: int) -> int:
    if not isinstance(k, int) or k < 1 or k > num_experts:
        raise MoelabError(f"router {name!r}: k must be an int in [1, num_experts={num_experts}], got {k!r}")
    return k


def check_capacity_factor(name: str, cf: float | None, allow_none: bool = True) -> float | None:
    if cf is None and allow_none:
        return None
    if cf is None or not float(cf) > 0:
        raise MoelabError(f"router {name!r}: capacity_factor must be > 0, got {cf!r}")
    return float(cf)


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * N * k / E), at least 1."""
    return max(1, int(-(-capacity_factor * num_tokens * k // num_experts)))


def capacity_mask(indices: Tensor, num_experts: int, capacity: int) -> Tensor:
    """(N, k) expert ids -> (N, k) bool keep mask: each expert keeps its first ``capacity`` assignments.

    Priority: all first choices (in token order) before all second choices, etc. (GShard/Switch).
    """
    n, k = indices.shape
    flat = indices.t().reshape(-1)  # (k*N,) choice-major order
    onehot = torch.nn.functional.one_hot(flat, num_experts)  # (k*N, E)
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
    """(N, k) -> (E,) number of (kept) assignments per expert."""
    flat = indices.reshape(-1)
    if mask is not None:  # dropped assignments go to a sentinel bin E
        flat = torch.where(mask.reshape(-1), flat, torch.full_like(flat, num_experts))
    return torch.bincount(flat, minlength=num_experts + 1)[:num_experts]


def zero_long(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.long, device=device)
