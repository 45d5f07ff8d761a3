"""The ``sparse_mlp`` family's typed config (:mod:`moelab.schema`): one frozen dataclass per section, and its
cross-key check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

from moelab.config import Float, Int, refuse
from moelab.experiments.digits import Activation, Dataset, DigitData
from moelab.experiments.router_recipe import check_recipe
from moelab.experiments.sections import Compute
from moelab.schema import defaults_of, rules_of
from moelab.train.optim import Optim

Router = Literal["topk", "noisy_topk", "switch", "expert_choice", "soft", "dense"]
ROUTERS = get_args(Router)


@dataclass(frozen=True)
class Data(DigitData):
    dataset: Dataset = "mnist"
    resize: Literal["seed_half", "none"] = "seed_half"  # the seed's 28 -> 14 cubic zoom
    val_size: Annotated[int, Int(ge=1)] = 5000  # held out from train (stratified): the split every choice is made on
    standardize: bool = True


@dataclass(frozen=True)
class Model:
    arch: Literal["residual", "experts"] = "residual"  # trunk + residual MoE FFN + head | experts = whole MLPs
    dim: Annotated[int, Int(ge=1)] = 64  # residual width
    hidden: Annotated[int, Int(ge=1)] = 128  # each expert's hidden width (dim-hidden-dim)
    depth: Annotated[int, Int(ge=1)] = 1  # residual FFN blocks
    moe_layers: Literal["all", "last"] = "all"  # which blocks are MoE
    num_experts: Annotated[int, Int(ge=1)] = 16
    router: Router = "topk"
    k: Annotated[int, Int(ge=1)] = 1  # experts per example (topk, noisy_topk)
    normalize: bool = False  # topk: renormalise the k gates to sum 1 (k = 1: every gate is 1, no router gradient)
    capacity_factor: Annotated[float, Float(gt=0, also=(0.0,))] = 0.0  # 0: the router's default
    activation: Activation = "gelu"
    router_init: Literal["default", "zeros"] = "default"  # zeros: the gate starts at 0 (Chen et al. 2022)
    router_noise: Literal["none", "uniform"] = "none"  # topk, switch: U(0, 1) on the choosing logits in training
    balance: Literal["aux", "bias"] = "aux"  # topk, switch: bias = aux-loss-free balancing (DeepSeek-V3), no balance loss
    bias_rate: Annotated[float, Float(gt=0)] = 1e-3  # balance = bias: each step's bias move per expert


@dataclass(frozen=True)
class Train(Optim):
    epochs: Annotated[int, Int(ge=1)] = 20
    batch_size: Annotated[int, Int(ge=1)] = 256
    lr: Annotated[float, Float(gt=0)] = 3e-3
    weight_decay: Annotated[float, Float(ge=0)] = 0.05
    label_smoothing: Annotated[float, Float(ge=0, lt=1)] = 0.1
    aux_scale: Annotated[float, Float(ge=0)] = 1.0  # multiplies the router's default auxiliary-loss weights
    routing_lr_scale: Annotated[float, Float(gt=0)] = 1.0  # the routers' lr / the other parameters' lr
    shift: Annotated[int, Int(ge=0, le=8)] = 1  # random translation of the 28x28 images (pixels) before the zoom
    rotate: Annotated[float, Float(ge=0, le=45)] = 0.0  # random rotation of the 28x28 images (degrees; 0: off)
    scale: Annotated[float, Float(ge=0, lt=0.5)] = 0.0  # random zoom by a factor in [1 - scale, 1 + scale]
    log_every: Annotated[int, Int(ge=1)] = 5


@dataclass(frozen=True)
class Baselines:
    equal_cost: bool = True  # dense-equal-flops (and dense-equal-params), same recipe
    equal_params: bool = True  # false: only dense-equal-flops


@dataclass(frozen=True)
class Config:
    """The ``sparse_mlp`` family's config (``mnist-sparse``)."""

    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)
    baselines: Baselines = field(default_factory=Baselines)
    # bf16 "auto": where the device computes it natively (a GPU); on a CPU the sparse path is slower in bf16
    # (gather / scatter), see docs
    compute: Compute = field(default_factory=lambda: Compute(threads=1))


DEFAULTS, RULES = defaults_of(Config), rules_of(Config)
RESUMABLE = ("compute.threads", "train.log_every")


def check_config(c: Config) -> None:
    """Cross-key rules: k of E experts; recipe keys only for routers that take them."""
    m = c.model
    if c.data.task != "classes" and c.train.rotate >= c.data.rotate_deg / 2:
        raise refuse("train.rotate", c.train.rotate, f"below data.rotate_deg / 2 = {c.data.rotate_deg / 2:g} with "
                     f"data.task = {c.data.task} (larger random rotations make the two labels' angles overlap)")
    if m.router in ("topk", "noisy_topk") and m.k > m.num_experts:
        raise refuse("model.k", m.k, f"at most model.num_experts = {m.num_experts} (experts per example)")
    if m.router == "dense" and m.capacity_factor:
        raise refuse("model.capacity_factor", m.capacity_factor, "0 with model.router = dense (no capacity)")
    check_recipe(m, m.router, ROUTERS)
