"""Routers: one per module, all on :class:`~moelab.moe.routers.base.Router`.

``make_router(name, dim, num_experts, **options)`` builds one by name; ``ROUTERS`` maps names to
classes. A router validates its own options; ``Router.takes_k`` says whether it takes ``k`` and
``Router.extra_gates`` which gating modules it takes besides ``gate``. Names are case-insensitive and ``-`` equals ``_`` (``"two-gates-max"``).
:func:`update_router_biases` is the training loop's hook for ``balance="bias"`` routers.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import nn

from moelab.errors import MoelabError
from moelab.moe.routers.base import Router, Routing
from moelab.moe.routers.dense import DenseRouter
from moelab.moe.routers.expert_choice import ExpertChoiceRouter
from moelab.moe.routers.hash import HashRouter
from moelab.moe.routers.multi_gate import MultiGateRouter
from moelab.moe.routers.noisy_topk import NoisyTopKRouter, noisy_topk_load
from moelab.moe.routers.soft import SoftMoERouter
from moelab.moe.routers.switch import SwitchRouter
from moelab.moe.routers.topk import TopKRouter
from moelab.moe.routers.uniform import UniformRouter

__all__ = [
    "ROUTERS", "ALIASES", "make_router", "Router", "Routing", "DenseRouter", "TopKRouter", "NoisyTopKRouter",
    "SwitchRouter", "ExpertChoiceRouter", "SoftMoERouter", "MultiGateRouter", "UniformRouter", "HashRouter",
    "noisy_topk_load", "bias_balanced", "update_router_biases",
]

ROUTERS: dict[str, type[Router]] = {
    cls.name: cls
    for cls in (DenseRouter, TopKRouter, NoisyTopKRouter, SwitchRouter, ExpertChoiceRouter, SoftMoERouter,
                MultiGateRouter, UniformRouter, HashRouter)
}

#: extra names -> (router name, preset options)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "softmax": ("dense", {}),
    "sparse": ("topk", {}),
    "random": ("hash", {"mode": "random"}),
    "two_gates": ("multi_gate", {"num_gates": 2, "mode": "sum"}),
    "two_gates_max": ("multi_gate", {"num_gates": 2, "mode": "max"}),
}


def router_names() -> list[str]:
    return sorted([*ROUTERS, *ALIASES])


def resolve(name: str) -> tuple[type[Router], dict[str, Any]]:
    """Router name or alias -> (class, preset options); MoelabError listing valid names otherwise."""
    key = str(name).strip().lower().replace("-", "_")
    if key in ROUTERS:
        return ROUTERS[key], {}
    if key in ALIASES:
        base, preset = ALIASES[key]
        return ROUTERS[base], dict(preset)
    raise MoelabError(f"unknown router {name!r}; valid routers: {', '.join(router_names())}")


def router_options(cls: type[Router]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "dim", "num_experts")]


def make_router(name: str | type[Router] | Router, dim: int | None, num_experts: int, *,
                gate: nn.Module | None = None, **options: Any) -> Router:
    """Build a router by name (or from a ``Router`` subclass, e.g. one defined outside this package); a built
    ``Router`` is returned as it is. ``options`` the router does not take raise a MoelabError naming the router
    and them; the router validates the values of those it takes."""
    if isinstance(name, Router):
        return name
    cls, preset = (name, {}) if isinstance(name, type) and issubclass(name, Router) else resolve(name)
    allowed = router_options(cls)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise MoelabError(f"router {cls.name!r} does not take option(s) {bad}; it takes {allowed}")
    return cls(dim, num_experts, gate=gate, **{**preset, **options})


def bias_balanced(model: nn.Module) -> list[Router]:
    """The routers in ``model`` with ``balance="bias"`` (auxiliary-loss-free balancing)."""
    return [m for m in model.modules() if isinstance(m, Router) and m.balance == "bias"]


def update_router_biases(model: nn.Module | Iterable[Router]) -> None:
    """Call after each optimiser step: every bias-balanced router in ``model`` (or each router given) moves its
    expert bias against the load it routed since the last call (:meth:`Router.update_bias`). No host sync."""
    for r in bias_balanced(model) if isinstance(model, nn.Module) else model:
        r.update_bias()
