"""Sparse MoE MLPs on MNIST 14x14 against dense networks of equal cost (``mnist-sparse``).

The network (:class:`moelab.models.mlp_mixture.SparseMoEMLP`) is a residual MLP on the flat 14x14 image,
``Linear(196, dim) -> [z + FFN(LayerNorm(z))] x depth -> LayerNorm -> Linear(dim, 10)``, whose FFN is a
:class:`moelab.MoE` layer: E ``dim-hidden-dim`` GELU experts, each example routed to k of them by the router
``model.router`` (``topk``, ``noisy_topk``, ``switch``, ``expert_choice``, ``soft``; ``model.k``,
``model.capacity_factor``). The router's own auxiliary losses (its default weights times
``train.aux_scale``) are added to the cross-entropy.

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

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import Choice, Float, Int, refuse
from moelab.cost import count_params, flops_per_example
from moelab.data.augment import Augment
from moelab.errors import MoelabError
from moelab.experiments import family
from moelab.experiments.digit_common import (
    ACTIVATIONS,
    GRAYSCALE,
    Splits,
    dense_baselines,
    format_lead,
    load_data,
    model_report,
)
from moelab.models.mlp_mixture import SparseMoEMLP
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.runtime import torch_threads
from moelab.train.evaluation import error_pct, save_eval
from moelab.train.loop import minibatch_epoch, seed_module_init, train_phase
from moelab.train.optim import make_optimizer, make_schedule
from moelab.train.run import Run

ROUTERS = ("topk", "noisy_topk", "switch", "expert_choice", "soft")

DEFAULTS: dict = {
    "threads": 1,  # torch.set_num_threads; 0 keeps torch's default
    "data": {
        "dataset": "mnist",
        "resize": "seed_half",  # the seed's 28 -> 14 cubic zoom
        "train_limit": 0,  # use only the first N training images (0: all)
        "test_limit": 0,
        "val_size": 5000,  # held out from train (stratified): the split every choice is made on
        "standardize": True,
    },
    "model": {
        "arch": "residual",  # "residual": trunk + residual MoE FFN + head | "experts": experts are in-hidden-classes MLPs
        "dim": 64,  # residual width
        "hidden": 128,  # each expert's hidden width (dim-hidden-dim)
        "depth": 1,  # residual FFN blocks
        "moe_layers": "all",  # "all" | "last": which blocks are MoE
        "num_experts": 16,
        "router": "topk",  # topk | noisy_topk | switch | expert_choice | soft
        "k": 1,  # experts per example (topk, noisy_topk)
        "normalize": False,  # topk: renormalise the k gates to sum 1 (k = 1: every gate is 1, no router gradient)
        "capacity_factor": 0.0,  # 0: the router's default (none for topk; 1.25 switch; 2.0 expert_choice)
        "activation": "gelu",
    },
    "train": {
        "epochs": 20,
        "batch_size": 256,
        "optimizer": "adamw",
        "lr": 3e-3,
        "weight_decay": 0.05,
        "momentum": 0.9,
        "schedule": "onecycle",
        "warmup_frac": 0.15,
        "label_smoothing": 0.1,
        "aux_scale": 1.0,  # multiplies the router's default auxiliary-loss weights
        "shift": 1,  # random translation of the 28x28 images by up to this many pixels before the zoom
        "rotate": 0.0,  # random rotation of the 28x28 images by up to this many degrees (0: off)
        "scale": 0.0,  # random zoom of the 28x28 images by a factor in [1 - scale, 1 + scale] (0: off)
        "bf16": False,  # the sparse path is slower in bf16 on CPU (gather / scatter), see docs
        "log_every": 5,
    },
    "baselines": {"equal_cost": True, "equal_params": True},  # equal_params = false: only dense-equal-flops
}


RULES: dict = {
    "threads": Int(ge=0),
    "data.dataset": Choice(*GRAYSCALE), "data.resize": Choice("seed_half", "none"),
    "data.train_limit": Int(ge=0), "data.test_limit": Int(ge=0), "data.val_size": Int(ge=1),
    "model.arch": Choice("residual", "experts"), "model.dim": Int(ge=1), "model.hidden": Int(ge=1),
    "model.depth": Int(ge=1), "model.moe_layers": Choice("all", "last"), "model.num_experts": Int(ge=1),
    "model.router": Choice(*ROUTERS), "model.k": Int(ge=1), "model.capacity_factor": Float(gt=0, also=(0.0,)),
    "model.activation": Choice(*ACTIVATIONS),
    "train.epochs": Int(ge=1), "train.batch_size": Int(ge=1), "train.optimizer": Choice("adamw", "sgd"),
    "train.lr": Float(gt=0), "train.weight_decay": Float(ge=0), "train.momentum": Float(ge=0, lt=1),
    "train.schedule": Choice("onecycle", "cosine", "constant"), "train.warmup_frac": Float(ge=0, lt=1),
    "train.label_smoothing": Float(ge=0, lt=1), "train.aux_scale": Float(ge=0), "train.shift": Int(ge=0, le=8),
    "train.rotate": Float(ge=0, le=45), "train.scale": Float(ge=0, lt=0.5),
    "train.log_every": Int(ge=1),
}
RESUMABLE = ("threads", "train.log_every")


def check_config(cfg: dict) -> None:
    """Cross-key rules: k of E experts."""
    m = cfg["model"]
    if m["router"] in ("topk", "noisy_topk") and m["k"] > m["num_experts"]:
        raise refuse("model.k", m["k"], f"at most model.num_experts = {m['num_experts']} (experts per example)")


def build_model(m: dict, in_dim: int, num_classes: int, hidden: int | None = None, dense: bool = False,
                aux_scale: float = 1.0) -> SparseMoEMLP:
    """The mixture (``dense=False``) or the dense network with FFN width ``hidden``."""
    if dense:
        return SparseMoEMLP(in_dim, m["dim"], hidden or m["hidden"], num_classes, m["depth"], 0,
                            activation=m["activation"], arch=m["arch"])
    from moelab.moe.routers import resolve

    defaults = resolve(m["router"])[0].default_loss_weights
    weights = {name: aux_scale * w for name, w in defaults.items()}
    router = m["router"]
    model = SparseMoEMLP(in_dim, m["dim"], m["hidden"], num_classes, m["depth"], m["num_experts"], router,
                         k=m["k"], capacity_factor=m["capacity_factor"] or None, aux_loss_weights=weights,
                         moe_layers=m["moe_layers"], activation=m["activation"], arch=m["arch"])
    if router == "topk":
        for block in model.blocks:
            if hasattr(block, "router"):
                block.router.normalize = m["normalize"]
    return model


@torch.no_grad()
def _predict(model: SparseMoEMLP, x: Tensor, bf16: bool, chunk: int = 2048) -> tuple[Tensor, Tensor | None]:
    """-> (probabilities (N, C), the last MoE block's combine weights (N, E) or None)."""
    model.eval()
    probs, gates = [], []
    for i in range(0, x.shape[0], chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _, auxes = model.forward_with_aux(x[i:i + chunk])  # one forward: logits and gates
        if auxes:
            gates.append(auxes[-1].gates.float())
        probs.append(torch.softmax(logits.float(), -1))
    return torch.cat(probs), (torch.cat(gates) if gates else None)


@family("sparse_mlp", DEFAULTS, RULES, check_config, RESUMABLE)
def run(cfg: dict, run_ctx: Run) -> dict:
    with torch_threads(cfg["threads"]):
        return _run(cfg, run_ctx)


def _train(run: Run, phase: str, model: SparseMoEMLP, t: dict, sp: Splits, bf16: bool) -> dict:
    """Train one network with the family's recipe (:func:`moelab.train.loop.minibatch_epoch`) -> its model row."""
    steps = math.ceil(len(sp.train_y) / t["batch_size"])
    opt = make_optimizer(t, model.parameters(), t["lr"])
    sched = make_schedule(t, opt, t["epochs"] * steps)

    def loss_fn(out, yb):
        logits, aux = out
        return F.cross_entropy(logits.float(), yb, label_smoothing=t["label_smoothing"]), aux

    def epoch_fn(epoch: int) -> dict:
        return minibatch_epoch(model, opt, sched, sp.batches(run, phase, epoch, t["batch_size"]), model, loss_fn,
                               bf16=bf16)

    def evaluate(epoch: int) -> dict:
        probs, gates = _predict(model, sp.val_x, bf16)
        row = {"val_err": error_pct(probs, sp.val_y)}
        if gates is not None:
            row["lead_max"] = round(float(torch.bincount(gates.argmax(1), minlength=gates.shape[1]).max())
                                    / len(sp.val_y), 4)
        return row

    start = time.perf_counter()
    train_phase(run, phase, model, opt, t["epochs"], epoch_fn, evaluate=evaluate, sched=sched,
                log_every=t["log_every"])
    train_time = round(time.perf_counter() - start, 1)
    probs, gates = _predict(model, sp.test_x, bf16)
    save_eval(run, phase, sp.test_y, probs, gates, class_names=sp.classes)
    rep = model_report(sp.test_y, probs, gates, probs.shape[1])
    rep.update(val_error_pct=error_pct(_predict(model, sp.val_x, bf16)[0], sp.val_y), epochs=t["epochs"],
               train_time_s=train_time, params=count_params(model),
               flops_per_example=round(flops_per_example(model, sp.val_x[:512]), 1))
    run.log(f"[{phase}] test err {rep['test_error_pct']:.2f}%, val err {rep['val_error_pct']:.2f}%, "
            f"{rep['params']} params, {rep['flops_per_example']:.0f} FLOPs/example, {train_time} s")
    return rep


def _run(cfg: dict, run: Run) -> dict:
    t, m, d = cfg["train"], cfg["model"], cfg["data"]
    ddp.require_single_process(f"{run.name} (family sparse_mlp)")
    t0 = time.perf_counter()
    data = load_data({**cfg, "seed_protocol": {"shuffle_split": False}}, run.seed, run.data_dir)
    n_cls, (h, w) = data["num_classes"], data["shape"]
    augment = Augment(data, t["shift"], t["rotate"], t["scale"])
    sp = Splits(data, d["val_size"], run.seed, d["standardize"], augment if augment.active else None)
    bf16, in_dim = resolve_bf16(t["bf16"], key="train.bf16"), h * w
    run.log(f"data: {d['dataset']} {h}x{w}, {len(sp.train_y)} train / {len(sp.val_y)} val / {len(sp.test_y)} test "
            f"images ({time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}")
    models: dict[str, dict] = {}
    seed_module_init(run, "moe")
    models["moe"] = rep = _train(run, "moe", build_model(m, in_dim, n_cls, aux_scale=t["aux_scale"]), t, sp, bf16)
    rep.update(num_experts=m["num_experts"], router=m["router"], k=m["k"], hidden=m["hidden"])
    if cfg["baselines"]["equal_cost"]:
        # matched to the trained mixture's counts: its active FLOPs on real validation images, router included
        def dense(hid: int) -> SparseMoEMLP:
            return build_model(m, in_dim, n_cls, hid, dense=True)

        def train_dense(phase: str, hid: int) -> dict:
            seed_module_init(run, phase)
            return {**_train(run, phase, dense(hid), t, sp, bf16), "hidden": hid}

        names = ("dense-equal-params",) * cfg["baselines"]["equal_params"] + ("dense-equal-flops",)
        models.update(dense_baselines(run, rep, dense, sp.val_x[:4], train_dense, names))
    run.log(f"moe lead share (test split): {format_lead(rep['lead_share'])}")
    return {"test_accuracy": rep["test_accuracy"], "models": models, "lead_share": rep["lead_share"],
            "lead_share_pct": rep["lead_share_pct"], "class_expert_matrix": rep["class_expert_matrix"],
            "protocol": {"val_size": len(sp.val_y), "selection": "last epoch; settings chosen on the validation split",
                         "dense_hidden": {n: r.get("hidden") for n, r in models.items() if n != "moe"},
                         "router": m["router"], "k": m["k"], "num_experts": m["num_experts"]}}


__all__ = ["DEFAULTS", "ROUTERS", "build_model", "run", "MoelabError"]
