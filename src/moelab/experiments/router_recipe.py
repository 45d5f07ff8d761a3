"""The router recipe keys the MoE families share (``mnist-sparse``, ``cifar10-moe``), mapped onto the router's
own options (:mod:`moelab.moe.routers.base`), which validate them:

    model.router_init    "default" | "zeros"   -> init          (every router with a learned gate)
    model.router_noise   "none" | "uniform"    -> train_noise   (topk, switch)
    model.balance        "aux" | "bias"        -> balance       (topk, switch; "bias": no balance loss)
    model.bias_rate      > 0                   -> bias_rate     (with balance = "bias")

``train.routing_lr_scale`` (:func:`moelab.train.optim.param_groups`) is the fifth key of the recipe.
"""

from __future__ import annotations

from moelab.config import refuse
from moelab.moe.routers import resolve, router_options

#: config key -> (router option, the key's default)
KEYS = {"router_init": ("init", "default"), "router_noise": ("train_noise", "none"), "balance": ("balance", "aux")}


def recipe_options(m) -> dict:
    """The router options of the recipe keys of ``m`` (a ``model`` section) that differ from their defaults."""
    opts = {opt: getattr(m, key) for key, (opt, default) in KEYS.items() if getattr(m, key) != default}
    if m.balance == "bias":
        opts["bias_rate"] = m.bias_rate
    return opts


def check_recipe(m, router: str, routers: tuple[str, ...]) -> None:
    """Refuse a recipe key set for a router that does not take its option (``routers``: the family's choices)."""
    takes = router_options(resolve(router)[0])
    for key, (opt, default) in KEYS.items():
        if getattr(m, key) != default and opt not in takes:
            able = [r for r in routers if opt in router_options(resolve(r)[0])]
            raise refuse(f"model.{key}", getattr(m, key), f"{default!r} with model.router = {router} (it has no "
                         f"{opt} option; routers that do: {', '.join(able)})")


def loss_weights(router: str, m, aux_scale: float) -> dict[str, float]:
    """The router's default auxiliary-loss weights x ``aux_scale``; no balance loss when ``model.balance = "bias"``
    (the bias does the balancing)."""
    defaults = resolve(router)[0].default_loss_weights
    return {n: aux_scale * w for n, w in defaults.items() if not (n == "balance" and m.balance == "bias")}
