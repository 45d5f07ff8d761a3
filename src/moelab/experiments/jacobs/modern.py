"""``mode = "modern"`` of the jacobs family (``mnist-jacobs``, ``digits-jacobs``): the mixture, the single
network and the equal-cost baselines trained with minibatches and a modern recipe (see
:mod:`moelab.experiments.jacobs`)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.data.augment import Augment
from moelab.errors import ConfigError
from moelab.experiments.digits import Splits, dense_baselines, fit_model, format_lead, label_single
from moelab.experiments.jacobs.config import BALANCES, LOSSES, Config, Train
from moelab.models.mlp_mixture import mixture_log_gates, mixture_predict, mlp, mlp_mixture
from moelab.moe import MoE
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.train.run import Run
from moelab.train.trainer import seed_module_init


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


def _outputs(model, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """x -> class probabilities (N, C), and the mixture's gates (N, E) for a mixture."""
    if isinstance(model, MoE):
        return mixture_predict(model, x)
    return torch.softmax(model(x).float(), -1)


def _fit(run: Run, phase: str, model, loss_fn, t: Train, sp: Splits, bf16: bool, epochs: int, lr: float) -> dict:
    """Train ``model`` with the family's recipe -> its row on the test split (cost counted on 256 test images)."""
    return fit_model(run, phase, model, loss_fn, t, sp, bf16, partial(_outputs, model), epochs=epochs, lr=lr,
                     eval_batch=8192, probe=sp.test_x[:256])


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
