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
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import Float, Int
from moelab.cost import cost_row
from moelab.data.augment import Augment
from moelab.errors import ConfigError
from moelab.experiments import family
from moelab.experiments.digit_common import (
    Activation,
    DigitData,
    Splits,
    dense_baselines,
    format_lead,
    label_single,
    lead_share,
    load_data,
    model_report,
)
from moelab.experiments.jacobs_faithful import run_faithful
from moelab.experiments.sections import Compute
from moelab.models.mlp_mixture import mixture_log_gates, mixture_predict, mlp, mlp_mixture
from moelab.moe import MoE
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.schema import defaults_of, rules_of
from moelab.train.evaluation import error_pct, save_eval
from moelab.train.optim import Optim
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict, seed_module_init

Loss = Literal["mixture_ce", "jacobs_loglik", "logit_mixture_ce", "competitive"]
Balance = Literal["none", "importance", "switch", "entropy", "z"]
LOSSES, BALANCES = get_args(Loss), get_args(Balance)


@dataclass(frozen=True)
class Model:
    num_experts: Annotated[int, Int(ge=1)] = 10
    hidden: Annotated[int, Int(ge=1)] = 25  # each expert: in-hidden-classes
    gate_hidden: Annotated[int, Int(ge=1)] = 25  # the gate: in-gate_hidden-E
    activation: Activation = "gelu"  # modern only (faithful is sigmoid)
    gate_temperature: Annotated[float, Float(gt=0)] = 1.0  # modern only


@dataclass(frozen=True)
class Faithful:
    lr: Annotated[float, Float(gt=0)] = 10.0
    moe_epochs: Annotated[int, Int(ge=1)] = 3000
    single_epochs: Annotated[int, Int(ge=1)] = 2000
    gate_grad_scale: Annotated[float, Float(ge=0)] = 2.0  # the seed's gradient_ME doubles the gate's gradient; 1.0 = true
    dtype: Literal["float32", "float64"] = "float32"  # float64: the seed's NumPy precision
    chunk: Annotated[int, Int(ge=1)] = 4096  # examples per block of the full-batch gradient
    workers: Annotated[int, Int(ge=1)] = 2  # threads splitting the blocks, each op single-threaded
    log_every: Annotated[int, Int(ge=1)] = 100
    checkpoint_every: Annotated[int, Int(ge=1)] = 100


@dataclass(frozen=True)
class Baselines:
    equal_cost: bool = True  # also train dense-equal-params and dense-equal-flops (one dense MLP each, same recipe)


@dataclass(frozen=True)
class SeedProtocol:
    train_on_test: bool = False  # the seed's MoE loop: train (and report) on the test split
    shuffle_split: bool = False  # the seed's random 60000/10000 split of all 70000 images


@dataclass(frozen=True)
class Train(Optim):
    epochs: Annotated[int, Int(ge=1)] = 30
    single_epochs: Annotated[int, Int(ge=0)] = 0  # 0: same as epochs
    batch_size: Annotated[int, Int(ge=1)] = 128
    single_lr: Annotated[float, Float(ge=0)] = 0.0  # 0: same as lr
    loss: Loss = "mixture_ce"
    label_smoothing: Annotated[float, Float(ge=0, lt=1)] = 0.0
    balance: Balance = "none"
    balance_weight: Annotated[float, Float(ge=0)] = 0.0
    shift: Annotated[int, Int(ge=0, le=8)] = 0  # random translation of the original images (pixels; 0: off)
    log_every: Annotated[int, Int(ge=1)] = 1


@dataclass(frozen=True)
class Config:
    """The ``jacobs`` family's config (``digits-jacobs``, ``mnist-jacobs``, ``mnist-jacobs-faithful``); sizes
    that must fit the data are checked in :func:`moelab.experiments.digit_common.load_data`."""

    mode: Literal["faithful", "modern"] = "modern"  # "faithful": the seed, exactly
    data: DigitData = field(default_factory=DigitData)
    model: Model = field(default_factory=Model)
    faithful: Faithful = field(default_factory=Faithful)
    baselines: Baselines = field(default_factory=Baselines)
    seed_protocol: SeedProtocol = field(default_factory=SeedProtocol)
    train: Train = field(default_factory=Train)
    compute: Compute = field(default_factory=Compute)  # bf16: modern only


DEFAULTS, RULES = defaults_of(Config), rules_of(Config)
RESUMABLE = ("compute.threads", "train.log_every", "faithful.log_every", "faithful.checkpoint_every")


def check_config(c: Config) -> None:
    """Cross-key rules of the jacobs family."""
    if c.seed_protocol.train_on_test and c.mode != "faithful":
        raise ConfigError("seed_protocol.train_on_test = true applies to mode = \"faithful\" only "
                          f"(mode is {c.mode!r}).")


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


def _predict(model, x: Tensor, bf16: bool, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """-> (probabilities (N, C), the mixture's gates (N, E) or None), on the host."""
    model.eval()
    if isinstance(model, MoE):
        return tuple(predict(partial(mixture_predict, model), x, batch=8192, device=device, bf16=bf16))
    return predict(lambda xb: torch.softmax(model(xb).float(), -1), x, batch=8192, device=device, bf16=bf16)[0], None


def _evaluator(model, sp: Splits, bf16: bool, device: torch.device):
    """After-epoch metrics: error on the validation split (test without one), and lead shares for a mixture."""
    x, y, name = sp.eval_split

    def evaluate(epoch: int) -> dict:
        probs, gates = _predict(model, x, bf16, device)
        row = {name: error_pct(probs, y)}
        if gates is not None:
            row["lead_share"] = lead_share(torch.bincount(gates.argmax(1), minlength=gates.shape[1]))
            row["lead_max"] = max(row["lead_share"])
        return row
    return evaluate


def _fit(run: Run, phase: str, model, loss_fn, t: Train, sp: Splits, bf16: bool, epochs: int, lr: float) -> dict:
    """Train ``model`` (DDP-wrapped under torchrun) with the family's recipe, then its row on the test split."""
    model.to(run.device)
    trainer = Trainer.from_recipe(run, phase, model, t, epochs=epochs, lr=lr, bf16=bf16, device=run.device,
                                  steps_per_epoch=math.ceil(sp.train_x.shape[0] / t.batch_size), log_every=t.log_every)
    trainer.fit(lambda epoch: sp.batches(run, phase, epoch, t.batch_size), ddp.wrap_model(model), loss_fn,
                evaluate=_evaluator(model, sp, bf16, run.device))
    probs, gates = _predict(model, sp.test_x, bf16, run.device)
    save_eval(run, phase, sp.test_y, probs, gates, class_names=sp.classes, latent=sp.test_latent)
    rep = model_report(sp.test_y, probs, gates, probs.shape[1], sp.test_latent, len(sp.latent_classes))
    rep.update(epochs=epochs, train_time_s=run.train_time(phase), **cost_row(model, sp.test_x[:256].to(run.device)))
    if sp.val_x is not None:
        rep["val_error_pct"] = error_pct(_predict(model, sp.val_x, bf16, run.device)[0], sp.val_y)
    return rep


def _mixture_loss_fn(moe: MoE, t: Train):
    """(MoE output, labels) -> (mixture loss, weighted balance loss or None)."""
    def loss_fn(out, yb):
        aux = out[1]  # MoEAux: the experts' logits (E, N, C) and the gate's (N, E)
        lg = mixture_log_gates(moe, aux.logits)
        loss = mixture_loss(t.loss, aux.expert_outputs, lg, yb, t.label_smoothing)
        if t.balance == "none" or t.balance_weight == 0:
            return loss, None
        return loss, t.balance_weight * balance_loss(t.balance, aux.logits.float(), lg.exp())
    return loss_fn


def run_modern(c: Config, run: Run, data: dict) -> dict:
    t, m, d = c.train, c.model, c.data
    n_cls, (h, w) = data["num_classes"], data["shape"]
    in_dim, bf16 = h * w, resolve_bf16(c.compute.bf16, run.device, key="compute.bf16")
    sp = Splits(data, d.val_size, run.seed, d.standardize, Augment(data, t.shift) if t.shift > 0 else None)
    world = ddp.current().world_size
    if world > 1:
        run.log(f"data-parallel: {world} ranks, each trains on its part of every global batch of {t.batch_size}")
    models: dict[str, dict] = {}
    seed_module_init(run, "moe")
    moe = mlp_mixture(m.num_experts, in_dim, m.hidden, n_cls, m.gate_hidden, m.activation,
                      m.gate_temperature)
    models["moe"] = rep = _fit(run, "moe", moe, _mixture_loss_fn(moe, t), t, sp, bf16, t.epochs, t.lr)

    # dense networks (the single network, the equal-cost baselines): cross-entropy, the single network's recipe
    def ce(logits, yb):
        return F.cross_entropy(logits.float(), yb, label_smoothing=t.label_smoothing), None

    def train_dense(phase: str, hidden: int) -> dict:
        seed_module_init(run, phase)
        net = mlp(in_dim, hidden, n_cls, m.activation)
        return {**_fit(run, phase, net, ce, t, sp, bf16, t.single_epochs or t.epochs, t.single_lr or t.lr),
                "hidden": hidden}

    models["single"] = train_dense("single", m.hidden)
    if c.baselines.equal_cost:
        models.update(dense_baselines(run, rep, lambda hid: mlp(in_dim, hid, n_cls, m.activation),
                                      sp.test_x[:4], train_dense))
    label_single(models)
    run.log(f"moe lead share (test split): {format_lead(rep['lead_share'])}")
    return {"test_accuracy": rep["test_accuracy"], "models": models, "lead_share": rep["lead_share"],
            "lead_share_pct": rep["lead_share_pct"], "class_expert_matrix": rep["class_expert_matrix"],
            "protocol": {"mode": "modern", "loss": t.loss, "balance": t.balance,
                         "val_size": d.val_size, "world_size": world}}


# ======================================================================== entry points
@family("jacobs", check=check_config, resumable=RESUMABLE, schema=Config)
def run(c: Config, run_ctx: Run) -> dict:
    if c.mode == "faithful":
        ddp.require_single_process(f"{run_ctx.name} (mode = \"faithful\": full-batch gradient descent)")
    threads = torch.get_num_threads()
    try:
        if c.compute.threads > 0:
            torch.set_num_threads(c.compute.threads)
        t0 = time.perf_counter()
        data = load_data(c.data, run_ctx.seed, run_ctx.data_dir, shuffle_split=c.seed_protocol.shuffle_split,
                         batch_size=c.train.batch_size if c.mode == "modern" else None)
        for note in data["notes"]:
            run_ctx.log(note)
        run_ctx.log(f"data: {data['dataset']} {data['shape'][0]}x{data['shape'][1]}, "
                    f"{len(data['train_y'])} train / {len(data['test_y'])} test images "
                    f"({time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}")
        out = run_faithful(c, run_ctx, data) if c.mode == "faithful" else run_modern(c, run_ctx, data)
        if c.data.folder:
            out.setdefault("protocol", {})["dataset"] = data["dataset"]
        return out
    finally:
        torch.set_num_threads(threads)
