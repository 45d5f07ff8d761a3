"""``moelab gradcheck``: autograd against central differences in float64 for the jacobs experiments' losses
(the faithful seed mixture's competitive loss, the modern mixture's loss), per parameter group."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.errors import MoelabError
from moelab.experiments.digits import load_data
from moelab.experiments.jacobs.config import Config
from moelab.experiments.jacobs.modern import mixture_loss
from moelab.models.mlp_mixture import (
    SeedMixture,
    add_bias_column,
    mixture_log_gates,
    mlp_mixture,
    seed_mixture_gradients,
)
from moelab.schema import typed

GRAD_GROUPS = ("gate hidden", "gate softmax", "experts hidden", "experts output")


def _group_of(name: str) -> str:
    if name in ("gate_hidden", "router.gate.0.weight", "router.gate.0.bias"):
        return "gate hidden"
    if name in ("gate_softmax", "router.gate.2.weight", "router.gate.2.bias"):
        return "gate softmax"
    if name in ("expert_hidden", "experts.w1", "experts.b1"):
        return "experts hidden"
    if name in ("expert_output", "experts.w2", "experts.b2"):
        return "experts output"
    raise MoelabError(f"gradcheck: no parameter group for {name!r}")


def finite_difference_grads(loss_fn, params: dict[str, Tensor], coords: dict[str, Tensor], h: float = 1e-4,
                            block: int = 128) -> dict[str, Tensor]:
    """Central differences ``(f(p + h e_k) - f(p - h e_k)) / 2h`` of ``loss_fn(params) -> scalar`` at the flat
    element indices ``coords[name]`` of each parameter, vmapped over ``block`` coordinates at a time."""
    from torch.func import vmap

    names = list(params)
    flat = torch.cat([params[k].reshape(-1) for k in names])
    sizes = [params[k].numel() for k in names]
    offsets = dict(zip(names, np.cumsum([0, *sizes[:-1]]).tolist()))
    where = torch.cat([coords[k] + offsets[k] for k in names])

    def f(theta: Tensor) -> Tensor:
        return loss_fn({k: p.view(params[k].shape) for k, p in zip(names, theta.split(sizes))})

    fv = vmap(f)
    out = torch.empty(len(where), dtype=flat.dtype)
    for i in range(0, len(where), block):
        idx = where[i:i + block]
        step = torch.zeros(len(idx), flat.numel(), dtype=flat.dtype)
        step[torch.arange(len(idx)), idx] = h
        out[i:i + block] = (fv(flat + step) - fv(flat - step)) / (2 * h)
    return dict(zip(names, out.split([len(coords[k]) for k in names])))


def relative_error(a: Tensor, b: Tensor, scale: float | None = None) -> float:
    """``max_i |a_i - b_i| / max(max_i |a_i|, max_i |b_i|)``: the largest elementwise difference relative to the
    group's gradient scale (``scale`` overrides ``max|a|``, e.g. when ``a`` is a sample of a larger tensor).

    Plain elementwise ratios ``|a_i - b_i| / |a_i|`` are not used: elements whose gradient is ~1e-8 (pixels that
    are almost always 0) are dominated by the finite difference's own rounding (~1e-12 absolute)."""
    top = max(float(a.abs().max()) if a.numel() else 0.0, scale or 0.0, float(b.abs().max()) if b.numel() else 0.0)
    return 0.0 if top == 0 else float((a - b).abs().max()) / top


def gradcheck_main(experiment: str, overrides: list[str] | None = None, *, data_dir: str | None = None,
                   seed: int = 0, num_examples: int = 20, tol: float = 1e-5, max_coords: int = 1000) -> int:
    """``moelab gradcheck NAME``: autograd vs central finite differences, float64, on ``num_examples`` training
    images of the experiment's data set; prints the maximum relative error per parameter group.

    Finite differences cost two forward passes per element, so parameters with more than ``max_coords``
    elements are checked on ``max_coords`` random elements (the seed's ``numerical_gradient_ME`` loops over
    all 57035, which takes minutes). Returns 0 if all are below ``tol``, else 1."""
    from torch.func import functional_call

    from moelab.experiments import resolve_config
    from moelab.train.run import seeded_generator

    name, raw = resolve_config(experiment, overrides)
    if raw.get("family") != "jacobs":
        raise MoelabError(f"gradcheck supports the jacobs experiments; '{name}' is family {raw.get('family')!r}.")
    c, t0 = typed(Config, raw), time.perf_counter()
    data = load_data(c.data, seed, data_dir, shuffle_split=c.seed_protocol.shuffle_split,
                     batch_size=c.train.batch_size if c.mode == "modern" else None)
    x = data["train_x"][:num_examples].double()
    y = data["train_y"][:num_examples]
    n_cls, m = data["num_classes"], c.model
    g = seeded_generator(seed, "gradcheck")
    if c.mode == "faithful":
        model = SeedMixture(m.num_experts, x.shape[1], m.hidden, n_cls, m.gate_hidden, generator=g,
                            dtype=torch.float64)
        xin, target = add_bias_column(x), F.one_hot(y, n_cls).double()

        def loss_fn(params: dict[str, Tensor]) -> Tensor:
            return seed_loss(params, xin, target)
        what = "Jacobs competitive loss 0.5 * sum_i g_i ||y - o_i||^2 (the seed's mean_squared_error_ME)"
    else:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        model = mlp_mixture(m.num_experts, x.shape[1], m.hidden, n_cls, m.gate_hidden, m.activation,
                            m.gate_temperature).double()
        kind, eps = c.train.loss, c.train.label_smoothing

        def loss_fn(params: dict[str, Tensor]) -> Tensor:
            out = functional_call(model, params, (x,))[1]
            return mixture_loss(kind, out.expert_outputs, mixture_log_gates(model, out.logits), y, eps)
        what = f"modern loss {kind!r}"
    print(f"gradcheck {name}: {what}; {num_examples} training images, float64; autograd vs central differences "
          f"(h = 1e-4); relative error = max |autograd - numeric| / max |gradient| per group")
    auto, worst = _compare_groups(model, loss_fn, g, max_coords)
    if c.mode == "faithful":
        # the hand-written full-batch gradient that training uses, against autograd
        seed_mixture_gradients(model, xin.T.contiguous(), target.T.contiguous(), gate_grad_scale=1.0, chunk=8)
        hand = max(relative_error(auto[k], p.grad) for k, p in model.named_parameters())
        print(f"  training gradient (hand-written, gate_grad_scale=1) vs autograd: max relative error {hand:.3e}")
        worst["hand-written"] = hand
    ok = all(v < tol for v in worst.values())
    print(f"{'OK: all' if ok else 'FAILED: not all'} below {tol:g} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


def _compare_groups(model, loss_fn, g: torch.Generator, max_coords: int) -> tuple[dict, dict[str, float]]:
    """Autograd vs finite differences of ``loss_fn(params)`` per parameter group, printed; -> (autograd
    gradients by name, worst relative error by group). Parameters with more than ``max_coords`` elements are
    checked on ``max_coords`` random ones."""
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    auto = dict(zip(leaves, torch.autograd.grad(loss_fn(leaves), list(leaves.values()))))
    coords = {k: (torch.arange(p.numel()) if p.numel() <= max_coords else
                  torch.randperm(p.numel(), generator=g)[:max_coords].sort().values) for k, p in params.items()}
    fd = finite_difference_grads(loss_fn, params, coords)
    worst: dict[str, float] = {}
    counted: dict[str, list[int]] = {}
    for k in params:
        grp = _group_of(k)
        worst[grp] = max(worst.get(grp, 0.0), relative_error(auto[k].reshape(-1)[coords[k]], fd[k],
                                                             scale=float(auto[k].abs().max())))
        c = counted.setdefault(grp, [0, 0])
        c[0] += len(coords[k])
        c[1] += params[k].numel()
    for grp in GRAD_GROUPS:
        if grp in worst:
            print(f"  {grp:<15} max relative error {worst[grp]:.3e}   ({counted[grp][0]} of {counted[grp][1]} "
                  f"elements checked)")
    return auto, worst


def seed_loss(p: dict[str, Tensor], x: Tensor, target: Tensor) -> Tensor:
    """The seed's forward and ``mean_squared_error_ME`` as a pure function of the parameters (vmappable)."""
    hg = torch.sigmoid(x @ p["gate_hidden"])
    gates = torch.softmax(hg @ p["gate_softmax"][1:] + p["gate_softmax"][0], dim=-1)  # (N, E)
    he = torch.sigmoid(torch.einsum("nd,edk->enk", x, p["expert_hidden"]))
    o = torch.sigmoid(he @ p["expert_output"][:, 1:] + p["expert_output"][:, :1])  # (E, N, C)
    err = ((o - target) ** 2).sum(-1)  # (E, N)
    return 0.5 * (gates.T * err).sum() / x.shape[0]
