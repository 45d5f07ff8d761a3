"""Seed experiment 2: a mixture of MLP experts with a softmax gate (Jacobs et al. 1991) on MNIST 14x14.

Two modes (``mode``):

``faithful`` (``mnist-jacobs-faithful``)
    The seed's NumPy script, exactly: MNIST 28x28 -> 14x14 by ``scipy.ndimage.zoom(img, 0.5, order=3)``
    (uint8, as the seed's uint8 images give), the seed's scaling over the whole data set
    (``x += x.min(); x /= x.max()``; the ``+=`` is the seed's, harmless because the minimum is 0),
    a bias column of ones; ten 196-25-10 sigmoid experts and a 196-25 sigmoid -> 10 softmax gate with
    weights uniform in [-0.5, 0.5); Jacobs' competitive loss ``0.5 * sum_i g_i ||y - o_i||^2`` (mean over
    examples), output ``sum_i g_i o_i``; full-batch gradient descent, learning rate 10, 3000 epochs.
    Baseline: one 196-25-10 sigmoid MLP, ``0.5 * sum (o - y)^2 / N``, full-batch GD, lr 10, 2000 epochs.
    The gradient is the seed's ``gradient_ME``, whose gate part is twice the gradient of its loss
    (``faithful.gate_grad_scale = 2.0``; 1.0 gives true gradient descent; see
    :mod:`moelab.models.mlp_mixture`), computed by hand in blocks (``faithful.chunk``) split over
    ``faithful.workers`` threads: the 3000 + 2000 full-batch epochs take about 6 minutes on 2 cores.
    Lead shares on the training split are logged every ``faithful.log_every`` epochs.

    Protocol: trained on the train split, evaluated on the test split. The seed's MoE loop trains on
    ``data_test`` (its 10000-image test split) and reports the error on that same split; set
    ``seed_protocol.train_on_test = true`` to do that (the baseline still trains on the train split, as in
    the seed) and the summary then also gives the MoE's error on the 60000 train images it never saw.
    ``seed_protocol.shuffle_split = true`` replaces the canonical 60000/10000 split by the seed's random
    split of all 70000 images.

``modern`` (``mnist-jacobs``, ``digits-jacobs``)
    The same parameter budget (E experts in-hidden-classes and an in-gate_hidden-E gate) trained the
    modern way: minibatches, AdamW or SGD with a one-cycle/cosine schedule, a mixture loss
    (``mixture_ce``: ``-log sum_i g_i softmax(z_i)[y]``; ``jacobs_loglik``; ``logit_mixture_ce``:
    cross-entropy of ``sum_i g_i z_i``; ``competitive``), label smoothing, an optional gate balance loss,
    random translations of the original images before the seed's zoom (:class:`Augment`), optional bf16
    autocast. The single-network baseline (one in-hidden-classes MLP) is trained the same way with
    cross-entropy. ``mnist-jacobs`` reaches about 1.8% test error against 3.6% for the single network
    (11x smaller) and 1.2% for the dense network of equal parameters and FLOPs (docs/results-jacobs.md).

Both train the mixture (phase ``moe``), the single network (phase ``single``: one expert's size, labelled
as the smaller network in its row) and, with ``baselines.equal_cost`` (default), the equal-cost baselines
``dense-equal-params`` / ``dense-equal-flops`` (:func:`equal_cost_rows`: one dense MLP of the single
network's kind and recipe, widened to the mixture's counted parameters / counted inference FLOPs; the
dense gate runs every expert, so both widths coincide and that network is trained once), and report
all under ``models`` with ``params``, ``flops_per_example`` and ``train_time_s``, with the mixture's lead share per expert (the fraction of test examples whose largest gate is
that expert: the seed's "% of examples where an expert was chosen as the lead") and the class x expert
lead-count matrix.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import Choice, Float, Int, Switch
from moelab.cost import cost_row
from moelab.data.augment import Augment
from moelab.errors import ConfigError
from moelab.experiments import family
from moelab.experiments.digit_common import (
    ACTIVATIONS,
    GRAYSCALE,
    Splits,
    dense_baselines,
    format_lead,
    label_single,
    lead_share,
    load_data,
    model_report,
)
from moelab.experiments.jacobs_faithful import run_faithful
from moelab.models.mlp_mixture import mixture_log_gates, mixture_predict, mlp, mlp_mixture
from moelab.moe import MoE
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.train.evaluation import error_pct, save_eval
from moelab.train.loop import minibatch_epoch, seed_module_init, train_phase
from moelab.train.optim import make_optimizer, make_schedule
from moelab.train.run import Run

DEFAULTS: dict = {
    "mode": "modern",  # "faithful" (the seed, exactly) | "modern"
    "threads": 0,  # torch.set_num_threads; 0 keeps torch's default
    "data": {
        "dataset": "digits",
        "resize": "none",  # "seed_half": the seed's cubic zoom 28 -> 14 | "none"
        "train_limit": 0,  # use only the first N training images (0: all)
        "test_limit": 0,  # use only the first N test images (0: all)
        "val_size": 0,  # modern: hold out this many training images (stratified) for validation
        "standardize": False,  # modern: (x - mean) / std with the training images' mean and std (scalars)
    },
    "model": {
        "num_experts": 10,
        "hidden": 25,  # each expert: in-hidden-classes
        "gate_hidden": 25,  # the gate: in-gate_hidden-E
        "activation": "gelu",  # modern only (faithful is sigmoid)
        "gate_temperature": 1.0,  # modern only
    },
    "faithful": {
        "lr": 10.0,
        "moe_epochs": 3000,
        "single_epochs": 2000,
        "gate_grad_scale": 2.0,  # the seed's gradient_ME doubles the gate's gradient; 1.0 = true gradient
        "dtype": "float32",  # "float32" | "float64" (the seed's NumPy precision)
        "chunk": 4096,  # examples per block of the full-batch gradient
        "workers": 2,  # threads splitting the blocks, each op single-threaded (see seed_mixture_gradients)
        "log_every": 100,
        "checkpoint_every": 100,
    },
    "baselines": {
        "equal_cost": True,  # also train dense-equal-params and dense-equal-flops (one dense MLP each, same recipe)
    },
    "seed_protocol": {
        "train_on_test": False,  # the seed's MoE loop: train (and report) on the test split
        "shuffle_split": False,  # the seed's random 60000/10000 split of all 70000 images
    },
    "train": {
        "epochs": 30,
        "single_epochs": 0,  # 0: same as epochs
        "batch_size": 128,
        "optimizer": "adamw",  # "adamw" | "sgd" (Nesterov momentum)
        "lr": 3e-3,
        "single_lr": 0.0,  # 0: same as lr
        "weight_decay": 0.0,
        "momentum": 0.9,
        "schedule": "onecycle",  # "onecycle" (linear warm-up, cosine decay) | "cosine" | "constant"
        "warmup_frac": 0.15,
        "loss": "mixture_ce",  # "mixture_ce" | "jacobs_loglik" | "logit_mixture_ce" | "competitive"
        "label_smoothing": 0.0,
        "balance": "none",  # "none" | "importance" | "switch" | "entropy" | "z"
        "balance_weight": 0.0,
        "shift": 0,  # random translation of the original images by up to this many pixels (0: off), see Augment
        "bf16": Switch("false"),  # torch.autocast bfloat16 for the forward pass; "auto": where the CPU has it natively
        "log_every": 1,
    },
}

LOSSES = ("mixture_ce", "jacobs_loglik", "logit_mixture_ce", "competitive")
BALANCES = ("none", "importance", "switch", "entropy", "z")

# What each key accepts (moelab.config rules); sizes that must fit the data are checked in load_data.
RULES: dict = {
    "mode": Choice("faithful", "modern"), "threads": Int(ge=0),
    "data.dataset": Choice(*GRAYSCALE), "data.resize": Choice("seed_half", "none"),
    "data.train_limit": Int(ge=0), "data.test_limit": Int(ge=0), "data.val_size": Int(ge=0),
    "model.num_experts": Int(ge=1), "model.hidden": Int(ge=1), "model.gate_hidden": Int(ge=1),
    "model.activation": Choice(*ACTIVATIONS), "model.gate_temperature": Float(gt=0),
    "faithful.lr": Float(gt=0), "faithful.moe_epochs": Int(ge=1), "faithful.single_epochs": Int(ge=1),
    "faithful.gate_grad_scale": Float(ge=0), "faithful.dtype": Choice("float32", "float64"),
    "faithful.chunk": Int(ge=1), "faithful.workers": Int(ge=1), "faithful.log_every": Int(ge=1),
    "faithful.checkpoint_every": Int(ge=1),
    "train.epochs": Int(ge=1), "train.single_epochs": Int(ge=0), "train.batch_size": Int(ge=1),
    "train.optimizer": Choice("adamw", "sgd"), "train.lr": Float(gt=0), "train.single_lr": Float(ge=0),
    "train.weight_decay": Float(ge=0), "train.momentum": Float(ge=0, lt=1),
    "train.schedule": Choice("onecycle", "cosine", "constant"), "train.warmup_frac": Float(ge=0, lt=1),
    "train.loss": Choice(*LOSSES), "train.label_smoothing": Float(ge=0, lt=1), "train.balance": Choice(*BALANCES),
    "train.balance_weight": Float(ge=0), "train.shift": Int(ge=0, le=8), "train.log_every": Int(ge=1),
}
RESUMABLE = ("threads", "train.log_every", "faithful.log_every", "faithful.checkpoint_every")


def check_config(cfg: dict) -> None:
    """Cross-key rules of the jacobs family."""
    if cfg["seed_protocol"]["train_on_test"] and cfg["mode"] != "faithful":
        raise ConfigError("seed_protocol.train_on_test = true applies to mode = \"faithful\" only "
                          f"(mode is {cfg['mode']!r}).")


# ======================================================================== modern
def _smooth_nll(logp: Tensor, y: Tensor, eps: float) -> Tensor:
    """Cross-entropy with label smoothing from log-probabilities (N, C)."""
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    if eps > 0:
        nll = (1 - eps) * nll - eps * logp.mean(1)
    return nll.mean()


def mixture_loss(kind: str, expert_logits: Tensor, log_gates: Tensor, y: Tensor, eps: float = 0.0) -> Tensor:
    """The modern task losses on (E, N, C) expert logits and (N, E) log gates."""
    from moelab.moe import losses as L

    if expert_logits.dtype != torch.float64:
        expert_logits = expert_logits.float()
    if kind == "mixture_ce":  # -log sum_i g_i p_i(y), all classes for label smoothing
        logp = torch.logsumexp(log_gates.T.unsqueeze(-1) + F.log_softmax(expert_logits, -1), dim=0)  # (N, C)
        return _smooth_nll(logp, y, eps)
    if kind == "logit_mixture_ce":
        mixed = torch.einsum("ne,enc->nc", log_gates.exp().to(expert_logits.dtype), expert_logits)
        return F.cross_entropy(mixed, y, label_smoothing=eps)
    c = expert_logits.shape[-1]
    target = F.one_hot(y, c).float() * (1 - eps) + eps / c
    probs = F.softmax(expert_logits, -1)
    if kind == "jacobs_loglik":
        return L.jacobs_loglik_loss(probs, target, log_gates=log_gates)
    if kind == "competitive":
        return L.jacobs_competitive_loss(probs, target, log_gates.exp(), half=True)
    raise ConfigError(f"train.loss must be one of {', '.join(LOSSES)}, got {kind!r}.")


def balance_loss(kind: str, gate_logits: Tensor, gates: Tensor) -> Tensor:
    from moelab.moe import losses as L

    if kind == "importance":
        return L.importance_loss(gates)
    if kind == "switch":
        return L.switch_balance_loss(gates, torch.bincount(gates.argmax(1), minlength=gates.shape[1]))
    if kind == "entropy":
        return L.gate_entropy(gates)
    if kind == "z":
        return L.router_z_loss(gate_logits)
    raise ConfigError(f"train.balance must be one of {', '.join(BALANCES)}, got {kind!r}.")


@torch.no_grad()
def _predict(model, x: Tensor, bf16: bool, chunk: int = 8192) -> tuple[Tensor, Tensor | None]:
    model.eval()
    probs, gates = [], []
    for i in range(0, x.shape[0], chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if isinstance(model, MoE):
                p, g = mixture_predict(model, x[i:i + chunk])
                gates.append(g.float())
            else:
                p = torch.softmax(model(x[i:i + chunk]).float(), -1)
        probs.append(p.float())
    return torch.cat(probs), (torch.cat(gates) if gates else None)


def _evaluator(model, sp: Splits, bf16: bool):
    """After-epoch metrics: error on the validation split (test without one), and lead shares for a mixture."""
    x, y, name = sp.eval_split

    def evaluate(epoch: int) -> dict:
        probs, gates = _predict(model, x, bf16)
        row = {name: error_pct(probs, y)}
        if gates is not None:
            row["lead_share"] = lead_share(torch.bincount(gates.argmax(1), minlength=gates.shape[1]))
            row["lead_max"] = max(row["lead_share"])
        return row
    return evaluate


def _fit(run: Run, phase: str, model, loss_fn, t: dict, sp: Splits, bf16: bool, epochs: int, lr: float) -> dict:
    """Train ``model`` (DDP-wrapped under torchrun) with the family's recipe, then its row on the test split."""
    steps = math.ceil(sp.train_x.shape[0] / t["batch_size"])
    opt = make_optimizer(t, model.parameters(), lr)
    sched = make_schedule(t, opt, epochs * steps)
    fwd = ddp.wrap_model(model)

    def epoch_fn(epoch: int) -> dict:
        return minibatch_epoch(model, opt, sched, sp.batches(run, phase, epoch, t["batch_size"]), fwd, loss_fn,
                               bf16=bf16)

    t0 = time.perf_counter()
    train_phase(run, phase, model, opt, epochs, epoch_fn, evaluate=_evaluator(model, sp, bf16), sched=sched,
                log_every=t["log_every"])
    probs, gates = _predict(model, sp.test_x, bf16)
    save_eval(run, phase, sp.test_y, probs, gates, class_names=sp.classes)
    rep = model_report(sp.test_y, probs, gates, probs.shape[1])
    rep.update(epochs=epochs, train_time_s=round(time.perf_counter() - t0, 1), **cost_row(model, sp.test_x[:256]))
    if sp.val_x is not None:
        rep["val_error_pct"] = error_pct(_predict(model, sp.val_x, bf16)[0], sp.val_y)
    return rep


def _mixture_loss_fn(moe: MoE, t: dict):
    """(MoE output, labels) -> (mixture loss, weighted balance loss or None)."""
    def loss_fn(out, yb):
        aux = out[1]  # MoEAux: the experts' logits (E, N, C) and the gate's (N, E)
        lg = mixture_log_gates(moe, aux.logits)
        loss = mixture_loss(t["loss"], aux.expert_outputs, lg, yb, t["label_smoothing"])
        if t["balance"] == "none" or t["balance_weight"] == 0:
            return loss, None
        return loss, t["balance_weight"] * balance_loss(t["balance"], aux.logits.float(), lg.exp())
    return loss_fn


def run_modern(cfg: dict, run: Run, data: dict) -> dict:
    t, m, d = cfg["train"], cfg["model"], cfg["data"]
    n_cls, (h, w) = data["num_classes"], data["shape"]
    in_dim, bf16 = h * w, resolve_bf16(t["bf16"], key="train.bf16")
    sp = Splits(data, d["val_size"], run.seed, d["standardize"], Augment(data, t["shift"]) if t["shift"] > 0 else None)
    world = ddp.current().world_size
    if world > 1:
        run.log(f"data-parallel: {world} ranks, each trains on its part of every global batch of {t['batch_size']}")
    models: dict[str, dict] = {}
    seed_module_init(run, "moe")
    moe = mlp_mixture(m["num_experts"], in_dim, m["hidden"], n_cls, m["gate_hidden"], m["activation"],
                      m["gate_temperature"])
    models["moe"] = rep = _fit(run, "moe", moe, _mixture_loss_fn(moe, t), t, sp, bf16, t["epochs"], t["lr"])

    # dense networks (the single network, the equal-cost baselines): cross-entropy, the single network's recipe
    def ce(logits, yb):
        return F.cross_entropy(logits.float(), yb, label_smoothing=t["label_smoothing"]), None

    def train_dense(phase: str, hidden: int) -> dict:
        seed_module_init(run, phase)
        net = mlp(in_dim, hidden, n_cls, m["activation"])
        return {**_fit(run, phase, net, ce, t, sp, bf16, t["single_epochs"] or t["epochs"], t["single_lr"] or t["lr"]),
                "hidden": hidden}

    models["single"] = train_dense("single", m["hidden"])
    if cfg["baselines"]["equal_cost"]:
        models.update(dense_baselines(run, rep, lambda hid: mlp(in_dim, hid, n_cls, m["activation"]),
                                      sp.test_x[:4], train_dense))
    label_single(models)
    run.log(f"moe lead share (test split): {format_lead(rep['lead_share'])}")
    return {"test_accuracy": rep["test_accuracy"], "models": models, "lead_share": rep["lead_share"],
            "lead_share_pct": rep["lead_share_pct"], "class_expert_matrix": rep["class_expert_matrix"],
            "protocol": {"mode": "modern", "loss": t["loss"], "balance": t["balance"],
                         "val_size": d["val_size"], "world_size": world}}


# ======================================================================== entry points
@family("jacobs", DEFAULTS, RULES, check_config, RESUMABLE)
def run(cfg: dict, run_ctx: Run) -> dict:
    if cfg["mode"] == "faithful":
        ddp.require_single_process(f"{run_ctx.name} (mode = \"faithful\": full-batch gradient descent)")
    threads = torch.get_num_threads()
    try:
        if cfg["threads"] > 0:
            torch.set_num_threads(cfg["threads"])
        t0 = time.perf_counter()
        data = load_data(cfg, run_ctx.seed, run_ctx.data_dir)
        run_ctx.log(f"data: {cfg['data']['dataset']} {data['shape'][0]}x{data['shape'][1]}, "
                    f"{len(data['train_y'])} train / {len(data['test_y'])} test images "
                    f"({time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}")
        if cfg["mode"] == "faithful":
            return run_faithful(cfg, run_ctx, data)
        return run_modern(cfg, run_ctx, data)
    finally:
        torch.set_num_threads(threads)
