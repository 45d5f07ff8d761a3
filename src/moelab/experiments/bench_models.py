"""The experiments' own networks, for the benchmarks: ``moelab bench steps`` and ``moelab bench cnn``.

The benchmarks (:mod:`moelab.bench`) time any (mixture, dense network) pair and know no experiment; this
module builds the pairs the experiments train, each mixture with the dense network whose counted inference
FLOPs per example match it (:func:`moelab.cost.match_width`), through the families' own builders. The CLI
hands these builders to the benchmarks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moelab.cost import flops_per_example, match_width
from moelab.errors import MoelabError

#: name -> (experiment, --set overrides): the sizes the experiments train (``moelab bench steps``)
SIZES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist-sparse": ("mnist-sparse", ()),
    "cifar10-moe-blocks": ("cifar10-moe", ("model.width=64",)),
    "cifar10-moe-tokens": ("cifar10-moe", ("model.width=64", "model.moe=tokens", "model.num_experts=8",
                                           "model.k=2", "model.expert_hidden=512")),
}

#: ``moelab bench cnn``'s default variants (specs of the cifar10-moe model section, see :func:`parse_variant`)
VARIANTS = ("condconv:E=4:blocks=3", "condconv:E=4:blocks=2,3", "blocks:E=4:k=2", "blocks:E=4:router=switch",
            "blocks:E=8:router=switch", "blocks:E=4:router=switch:expert=resnet", "tokens:E=8:k=2:blocks=3:hidden=8w")


def step_pair(size: str, sets: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, dict]:
    """(mixture, dense-equal-flops network, a batch x, labels y, {batch, dense_width}) of an experiment size:
    its built-in config with ``sets`` (``--set``-style) applied, a random batch of its batch size."""
    from moelab.experiments import get_family, resolve_config
    from moelab.schema import typed

    if size not in SIZES:
        raise MoelabError(f"bench steps: unknown size {size!r}; expected one of {', '.join(SIZES)}")
    exp, base = SIZES[size]
    _, raw = resolve_config(exp, [*base, *sets])
    c = typed(get_family(raw["family"]).schema, raw)
    torch.manual_seed(0)
    if raw["family"] == "sparse_mlp":
        from moelab.experiments.sparse_mlp import build_model

        side = 14 if c.data.resize == "seed_half" else 28
        x, y = torch.randn(c.train.batch_size, side * side), torch.randint(0, 10, (c.train.batch_size,))
        moe, dense, w = _with_dense_twin(build_model(c.model, side * side, 10),
                                         lambda h: build_model(c.model, side * side, 10, h, dense=True), x[:256],
                                         hi=64 * c.model.hidden)
    else:
        from moelab.experiments.cifar_moe import build_model

        x, y = torch.randn(c.train.batch_size, 3, 32, 32), torch.randint(0, 10, (c.train.batch_size,))
        moe, dense, w = _with_dense_twin(build_model(c.model), lambda w: build_model(c.model, w, dense=True), x[:4],
                                         hi=8 * c.model.width)
    return moe, dense, x, y, {"batch": len(y), "dense_width": w}


def _with_dense_twin(moe: nn.Module, dense_at, probe: torch.Tensor, hi: int) -> tuple[nn.Module, nn.Module, int]:
    """(moe, ``dense_at(w)`` at the width w whose counted FLOPs on ``probe`` are closest to the mixture's, w)."""
    w = match_width(lambda w: flops_per_example(dense_at(w), probe), flops_per_example(moe, probe), hi=hi)
    return moe, dense_at(w), w


def parse_variant(spec: str, width: int):
    """``"condconv:E=4:blocks=2,3"`` / ``"blocks:E=8:k=1:router=switch"`` / ``"tokens:E=8:k=2:hidden=8w"`` -> the
    cifar_moe model section (``hidden``: the token experts' hidden width, ``Nw`` = N x ``width``)."""
    from moelab.experiments.cifar_moe.config import Model

    kind, *opts = spec.split(":")
    if kind not in ("condconv", "blocks", "tokens"):
        raise MoelabError(f"bench cnn: variant {spec!r}: expected condconv:..., blocks:... or tokens:..., got {kind!r}")
    m: dict = {"moe": kind, "width": width}
    keys = {"E": "num_experts", "k": "k", "blocks": "moe_blocks", "router": "router", "routing": "routing",
            "expert": "expert_block", "hidden": "expert_hidden"}
    for opt in opts:
        key, _, val = opt.partition("=")
        if key not in keys or not val:
            raise MoelabError(f"bench cnn: variant {spec!r}: unknown option {opt!r} (expected one of "
                              f"{', '.join(k + '=' for k in keys)})")
        if key == "blocks":
            m["moe_blocks"] = [int(b) for b in val.split(",")]
        elif key == "hidden":
            m[keys[key]] = int(val[:-1]) * width if val.endswith("w") else int(val)
        elif key in ("E", "k"):
            m[keys[key]] = int(val)
        else:
            m[keys[key]] = val
    return dataclasses.replace(Model(), **m)


def cnn_pair(spec: str, width: int, probe: torch.Tensor) -> tuple[nn.Module, nn.Module, int]:
    """(the cifar10-moe mixture of variant ``spec`` at ``width``, its dense-equal-flops FastCNN, that CNN's
    width), the FLOPs counted on ``probe``."""
    from moelab.experiments.cifar_moe import build_model

    m = parse_variant(spec, width)
    return _with_dense_twin(build_model(m), lambda w: build_model(m, w, dense=True), probe, hi=8 * width)
