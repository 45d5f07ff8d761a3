"""Sparse MoE MLPs on MNIST 14x14 against dense networks of equal cost (``mnist-sparse``).

The network (:class:`moelab.models.mlp_mixture.SparseMoEMLP`) is a residual MLP on the flat 14x14 image,
``Linear(196, dim) -> [z + FFN(LayerNorm(z))] x depth -> LayerNorm -> Linear(dim, 10)``, whose FFN is a
:class:`moelab.MoE` layer: E ``dim-hidden-dim`` GELU experts, each example routed to k of them by the router
``model.router`` (``topk``, ``noisy_topk``, ``switch``, ``expert_choice``, ``soft``; ``model.k``,
``model.capacity_factor``; ``dense``: the per-sample soft mixture, every expert weighted by a softmax). The
router's own auxiliary losses (its default weights times ``train.aux_scale``) are added to the cross-entropy.
The router recipe (:mod:`moelab.experiments.router_recipe`): ``model.router_init``, ``model.router_noise``,
``model.balance`` / ``model.bias_rate`` and ``train.routing_lr_scale``.

Baselines, trained in the same run with exactly the same recipe (optimizer, schedule, epochs, batch size,
augmentation, label smoothing; ``baselines.equal_cost = false`` skips them):

``dense-equal-flops``
    the same network with a dense FFN whose hidden width makes its counted inference FLOPs per example
    (:func:`moelab.cost.flops_per_example`, FlopCounterMode) closest to the mixture's counted *active*
    FLOPs, router included;
``dense-equal-params``
    the same network with a dense FFN whose width makes its parameter count closest to the mixture's
    total (all E experts).

Data: the seed's 14x14 MNIST (``data.resize = "seed_half"``), standardised, random +-1 px shifts of the
28x28 image before the zoom (:class:`moelab.data.augment.Augment`; optional random rotation and zoom,
``train.rotate`` / ``train.scale``), and ``data.val_size`` training images held out (stratified) as a validation split: every design choice was
made on it; the summary reports validation and test error of the last epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import Float, Int, refuse
from moelab.cost import cost_row
from moelab.data.augment import Augment
from moelab.errors import MoelabError
from moelab.experiments import family
from moelab.experiments.digit_common import (
    Activation,
    Dataset,
    DigitData,
    Splits,
    dense_baselines,
    format_lead,
    load_data,
    model_report,
)
from moelab.experiments.router_recipe import check_recipe, loss_weights, recipe_options
from moelab.experiments.sections import Compute
from moelab.models.mlp_mixture import SparseMoEMLP
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.runtime import torch_threads
from moelab.schema import defaults_of, rules_of
from moelab.train.evaluation import error_pct, save_eval
from moelab.train.optim import Optim
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict, seed_module_init

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


def build_model(m: Model, in_dim: int, num_classes: int, hidden: int | None = None, dense: bool = False,
                aux_scale: float = 1.0) -> SparseMoEMLP:
    """The mixture (``dense=False``) or the dense network with FFN width ``hidden``."""
    if dense:
        return SparseMoEMLP(in_dim, m.dim, hidden or m.hidden, num_classes, m.depth, 0,
                            activation=m.activation, arch=m.arch)
    router = m.router
    opts = {"normalize": m.normalize} if router == "topk" else {}
    return SparseMoEMLP(in_dim, m.dim, m.hidden, num_classes, m.depth, m.num_experts, router,
                        k=m.k, capacity_factor=m.capacity_factor or None,
                        aux_loss_weights=loss_weights(router, m, aux_scale), moe_layers=m.moe_layers,
                        activation=m.activation, arch=m.arch, router_options={**opts, **recipe_options(m)} or None)


def _outputs(model: SparseMoEMLP):
    """x -> (logits, the last MoE block's combine weights (N, E), if any): one forward."""
    def fn(x):
        logits, _, auxes = model.forward_with_aux(x)
        return (logits, auxes[-1].gates) if auxes else (logits,)
    return fn


def _predict(model: SparseMoEMLP, x: Tensor, bf16: bool, device) -> tuple[Tensor, Tensor | None]:
    """-> (probabilities (N, C), the last MoE block's combine weights (N, E) or None), on the host."""
    model.eval()
    logits, *gates = predict(_outputs(model), x, batch=2048, device=device, bf16=bf16)
    return torch.softmax(logits, -1), (gates[0] if gates else None)


@family("sparse_mlp", check=check_config, resumable=RESUMABLE, schema=Config)
def run(c: Config, run_ctx: Run) -> dict:
    with torch_threads(c.compute.threads):
        return _run(c, run_ctx)


def _train(run: Run, phase: str, model: SparseMoEMLP, t: Train, sp: Splits, bf16: bool) -> dict:
    """Train one network with the family's recipe -> its model row."""
    model.to(run.device)
    trainer = Trainer.from_recipe(run, phase, model, t, epochs=t.epochs, routing_lr_scale=t.routing_lr_scale,
                                  steps_per_epoch=math.ceil(len(sp.train_y) / t.batch_size), bf16=bf16,
                                  device=run.device, log_every=t.log_every)

    def loss(out, yb):
        logits, aux = out
        return F.cross_entropy(logits.float(), yb, label_smoothing=t.label_smoothing), aux

    def evaluate(epoch: int) -> dict:
        probs, gates = _predict(model, sp.val_x, bf16, run.device)
        row = {"val_err": error_pct(probs, sp.val_y)}
        if gates is not None:
            row["lead_max"] = round(float(torch.bincount(gates.argmax(1), minlength=gates.shape[1]).max())
                                    / len(sp.val_y), 4)
        return row

    trainer.fit(lambda epoch: sp.batches(run, phase, epoch, t.batch_size), model, loss, evaluate=evaluate)
    train_time = run.train_time(phase)
    probs, gates = _predict(model, sp.test_x, bf16, run.device)
    save_eval(run, phase, sp.test_y, probs, gates, class_names=sp.classes, latent=sp.test_latent)
    rep = model_report(sp.test_y, probs, gates, probs.shape[1], sp.test_latent, len(sp.latent_classes))
    rep.update(val_error_pct=error_pct(_predict(model, sp.val_x, bf16, run.device)[0], sp.val_y), epochs=t.epochs,
               train_time_s=train_time, **cost_row(model, sp.val_x[:512].to(run.device)))
    run.log(f"[{phase}] test err {rep['test_error_pct']:.2f}%, val err {rep['val_error_pct']:.2f}%, "
            f"{rep['params']} params, {rep['flops_per_example']:.0f} FLOPs/example, {train_time} s")
    return rep


def _run(c: Config, run: Run) -> dict:
    t, m, d = c.train, c.model, c.data
    ddp.require_single_process(f"{run.name} (family sparse_mlp)")
    t0 = time.perf_counter()
    data = load_data(d, run.seed, run.data_dir, batch_size=t.batch_size)
    n_cls, (h, w) = data["num_classes"], data["shape"]
    augment = Augment(data, t.shift, t.rotate, t.scale)
    sp = Splits(data, d.val_size, run.seed, d.standardize, augment if augment.active else None)
    bf16, in_dim = resolve_bf16(c.compute.bf16, run.device, key="compute.bf16"), h * w
    for note in data["notes"]:
        run.log(note)
    run.log(f"data: {data['dataset']} {h}x{w}, {len(sp.train_y)} train / {len(sp.val_y)} val / {len(sp.test_y)} test "
            f"images ({time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}")
    models: dict[str, dict] = {}
    seed_module_init(run, "moe")
    models["moe"] = rep = _train(run, "moe", build_model(m, in_dim, n_cls, aux_scale=t.aux_scale), t, sp, bf16)
    rep.update(num_experts=m.num_experts, router=m.router, k=m.k, hidden=m.hidden)
    if c.baselines.equal_cost:
        # matched to the trained mixture's counts: its active FLOPs on real validation images, router included
        def dense(hid: int) -> SparseMoEMLP:
            return build_model(m, in_dim, n_cls, hid, dense=True)

        def train_dense(phase: str, hid: int) -> dict:
            seed_module_init(run, phase)
            return {**_train(run, phase, dense(hid), t, sp, bf16), "hidden": hid}

        names = ("dense-equal-params",) * c.baselines.equal_params + ("dense-equal-flops",)
        models.update(dense_baselines(run, rep, dense, sp.val_x[:4], train_dense, names))
    run.log(f"moe lead share (test split): {format_lead(rep['lead_share'])}")
    return {"test_accuracy": rep["test_accuracy"], "models": models, "lead_share": rep["lead_share"],
            "lead_share_pct": rep["lead_share_pct"], "class_expert_matrix": rep["class_expert_matrix"],
            "protocol": {"val_size": len(sp.val_y), "selection": "last epoch; settings chosen on the validation split",
                         "dense_hidden": {n: r.get("hidden") for n, r in models.items() if n != "moe"},
                         "router": m.router, "k": m.k, "num_experts": m.num_experts,
                         **({"dataset": data["dataset"]} if d.folder else {})}}


__all__ = ["Config", "DEFAULTS", "ROUTERS", "build_model", "run", "MoelabError"]
