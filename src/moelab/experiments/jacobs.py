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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import Choice, Float, Int, Switch, refuse
from moelab.cost import cost_row, count_params, flops_per_example
from moelab.data.augment import Augment
from moelab.errors import ConfigError, MoelabError
from moelab.experiments import family
from moelab.experiments.baselines import EQUAL_COST, dense_widths, equal_cost_rows
from moelab.models.mlp_mixture import (
    SeedMixture,
    SeedMLP,
    add_bias_column,
    mixture_log_gates,
    mixture_predict,
    mlp,
    mlp_mixture,
    seed_mixture_gradients,
    seed_mlp_gradients,
)
from moelab.moe import MoE
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.train.evaluation import accuracy, routing_stats, save_eval
from moelab.train.loop import optimizer_step, seed_module_init, train_phase
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
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "sigmoid")
GRAYSCALE = ("digits", "mnist", "fashion-mnist")

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


def check_sizes(cfg: dict, name: str, n_train: int, n_test: int) -> None:
    """The sizes that must fit the data set (``n_train`` / ``n_test`` images), before anything trains."""
    d = cfg["data"]
    for key, n, split in (("train_limit", n_train, "training"), ("test_limit", n_test, "test")):
        if d[key] > n:
            raise refuse(f"data.{key}", d[key], f"at most the {n} {split} images of {name} (0: all)")
    n_tr = min(n_train, d["train_limit"] or n_train)
    if d["val_size"] >= n_tr:
        raise refuse("data.val_size", d["val_size"], f"fewer than the {n_tr} training images of {name}")
    n_fit, bs = n_tr - d["val_size"], cfg["train"]["batch_size"]
    if cfg.get("mode", "modern") == "modern" and bs > n_fit:
        raise refuse("train.batch_size", bs, f"at most the {n_fit} training images left after "
                     f"data.val_size = {d['val_size']}")


# ======================================================================== data
def _grayscale(x: np.ndarray, name: str) -> np.ndarray:
    if x.shape[-1] != 1:
        raise ConfigError(f"jacobs experiments need grayscale images; data set '{name}' has {x.shape[-1]} channels.")
    return x[..., 0]


def load_data(cfg: dict, run_seed: int, data_dir: str | None) -> dict:
    """The experiment's images as float64 (N, H*W) in [0, 1] (the seed's scaling) and int64 labels."""
    from moelab.data import load_dataset
    from moelab.data.transforms import resize_cubic_half_like_seed

    d = cfg["data"]
    ds = load_dataset(d["dataset"], data_dir=data_dir)
    tr_x, te_x = _grayscale(ds.train_x, ds.name), _grayscale(ds.test_x, ds.name)
    tr_y, te_y = ds.train_y, ds.test_y
    check_sizes(cfg, ds.name, len(tr_y), len(te_y))
    if cfg["seed_protocol"]["shuffle_split"]:  # the seed: np.random.shuffle(ids) over all images, first 60000 train
        from moelab.train.run import seeded_generator

        all_x, all_y = np.concatenate([tr_x, te_x]), np.concatenate([tr_y, te_y])
        ids = torch.randperm(len(all_x), generator=seeded_generator(run_seed, "split")).numpy()
        tr_x, tr_y = all_x[ids[:len(tr_x)]], all_y[ids[:len(tr_x)]]
        te_x, te_y = all_x[ids[len(tr_x):]], all_y[ids[len(tr_x):]]
    if d["train_limit"] > 0:
        tr_x, tr_y = tr_x[:d["train_limit"]], tr_y[:d["train_limit"]]
    if d["test_limit"] > 0:
        te_x, te_y = te_x[:d["test_limit"]], te_y[:d["test_limit"]]
    train_raw = torch.from_numpy(np.ascontiguousarray(tr_x))  # before resizing: for augmentation
    if d["resize"] == "seed_half":
        tr_x, te_x = resize_cubic_half_like_seed(tr_x), resize_cubic_half_like_seed(te_x)
    h, w = tr_x.shape[1:]
    both = np.concatenate([tr_x, te_x]).reshape(-1, h * w).astype(np.float64)
    shift = float(both.min())
    both += shift  # the seed's normalisation, over the whole data set (sic: +=; the minimum is 0)
    scale = float(both.max())
    both /= scale
    return {
        "train_x": torch.from_numpy(both[:len(tr_x)]), "train_y": torch.from_numpy(np.asarray(tr_y)),
        "test_x": torch.from_numpy(both[len(tr_x):]), "test_y": torch.from_numpy(np.asarray(te_y)),
        "train_raw": train_raw, "pixel_affine": (shift, scale), "resize": d["resize"],
        "shape": (h, w), "classes": list(ds.classes), "num_classes": len(ds.classes),
    }


def _lead(counts: Tensor) -> list[float]:
    return [round(float(c), 4) for c in (counts.float() / max(int(counts.sum()), 1))]


def model_report(labels: Tensor, probs: Tensor, gates: Tensor | None, num_classes: int) -> dict:
    acc = accuracy(probs, labels)
    out = {"test_accuracy": acc, "test_error_pct": round(100 * (1 - acc), 4)}
    if gates is not None:
        stats = routing_stats(labels, gates, num_classes)
        out.update(stats)
        out["lead_share_pct"] = [round(100 * s, 2) for s in stats["lead_share"]]
    return out


def format_lead(share: list[float]) -> str:
    return "  ".join(f"E{i + 1} {100 * s:.1f}%" for i, s in enumerate(share) if s > 0)


# ======================================================================== equal-cost baselines
def dense_baselines(run: Run, moe_row: dict, make_dense, probe: Tensor, train_dense,
                    names: tuple[str, ...] = EQUAL_COST) -> dict[str, dict]:
    """``dense-equal-params`` / ``dense-equal-flops`` (those in ``names``): ``make_dense(hidden)`` widened to the
    mixture's counted parameters / inference FLOPs (on ``probe``), trained by ``train_dense(phase, hidden)``."""
    widths = dense_widths(moe_row, lambda h: count_params(make_dense(h)),
                          lambda h: flops_per_example(make_dense(h), probe))
    return equal_cost_rows(run, widths, train_dense, names=names)


def _label_single(models: dict) -> None:
    """The single network is one expert's size: say so in its row."""
    s, moe = models["single"], models["moe"]
    if s.get("params") and moe.get("params"):
        s["note"] = (f"smaller network: one expert's size, {moe['params'] / s['params']:.1f}x fewer parameters "
                     f"than the mixture (compare with dense-equal-params / dense-equal-flops)")


# ======================================================================== faithful
def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]  # RULES: one of the two


@torch.no_grad()
def _seed_predict(model, x: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor | None]:
    """Faithful model on (N, 1 + D) -> (normalised outputs (N, C), gates (N, E) or None)."""
    outs, gates = [], []
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk]
        if isinstance(model, SeedMixture):
            g, o = model(xc)
            outs.append(SeedMixture.combine(g, o))
            gates.append(g)
        else:
            outs.append(model(xc))
    out = torch.cat(outs)
    probs = (out / out.sum(1, keepdim=True).clamp_min(1e-30)).float()  # sigmoid outputs -> a distribution
    return probs, (torch.cat(gates).float() if gates else None)


def run_faithful(cfg: dict, run: Run, data: dict) -> dict:
    f, proto = cfg["faithful"], cfg["seed_protocol"]
    dt = _dtype(f["dtype"])
    m = cfg["model"]
    n_cls = data["num_classes"]

    def prep(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xb = add_bias_column(x.to(dt))
        return xb, xb.T.contiguous(), F.one_hot(y, n_cls).to(dt).T.contiguous()

    train_xb, train_xt, train_yt = prep(data["train_x"], data["train_y"])
    test_xb, test_xt, test_yt = prep(data["test_x"], data["test_y"])
    # Inputs that are 0 in every image (39 of MNIST 14x14's pixels) contribute exactly 0 to the forward pass
    # and get exactly 0 gradient: leave them out of the training GEMMs (the same update, 20% fewer FLOPs).
    rows = torch.cat([torch.ones(1, dtype=torch.bool),
                      (data["train_x"] != 0).any(0) | (data["test_x"] != 0).any(0)]).nonzero().squeeze(1)
    train_xt, test_xt = train_xt[rows].contiguous(), test_xt[rows].contiguous()
    in_dim = data["train_x"].shape[1]
    lr, chunk, workers = f["lr"], f["chunk"], f["workers"]
    if workers > 1:
        torch.set_num_threads(1)  # parallel over blocks instead (restored by run())
    models: dict[str, dict] = {}

    def err_pct(model, xb: Tensor, y: Tensor) -> float:
        return round(100 * float((_seed_predict(model, xb)[0].argmax(1) != y).float().mean()), 4)

    # ---- dense networks (the seed's benchmark NN: always trained on the train split)
    n_tr = train_xt.shape[1]

    def train_dense(phase: str, hidden: int) -> dict:
        """One SeedMLP in-hidden-classes trained like the seed's single network (full-batch GD, MSE)."""
        net = SeedMLP(in_dim, hidden, n_cls, generator=run.generator("init", phase), dtype=dt)
        opt = torch.optim.SGD(net.parameters(), lr=lr)

        def dense_epoch(epoch: int) -> dict:
            r = seed_mlp_gradients(net, train_xt, train_yt, chunk=chunk, rows=rows, workers=workers)
            opt.step()
            return {"loss": r["loss"], "train_err": round(100 * (1 - r["correct"] / n_tr), 4)}

        t0 = time.perf_counter()
        train_phase(run, phase, net, opt, f["single_epochs"], dense_epoch,
                    evaluate=lambda e: {"test_err": err_pct(net, test_xb, data["test_y"])},
                    log_every=f["log_every"], checkpoint_every=f["checkpoint_every"])
        probs, _ = _seed_predict(net, test_xb)
        save_eval(run, phase, data["test_y"], probs, class_names=data["classes"])
        return {**model_report(data["test_y"], probs, None, n_cls),
                "train_error_pct": err_pct(net, train_xb, data["train_y"]), "epochs": f["single_epochs"],
                "trained_on": "train", "train_time_s": round(time.perf_counter() - t0, 1), "hidden": hidden,
                **cost_row(net, test_xb[:64])}

    models["single"] = train_dense("single", m["hidden"])

    # ---- the mixture
    on_test = proto["train_on_test"]
    fit_xt, fit_yt = (test_xt, test_yt) if on_test else (train_xt, train_yt)
    moe = SeedMixture(m["num_experts"], in_dim, m["hidden"], n_cls, m["gate_hidden"],
                      generator=run.generator("init", "moe"), dtype=dt)
    opt = torch.optim.SGD(moe.parameters(), lr=lr)
    n_fit = fit_xt.shape[1]

    def moe_epoch(epoch: int) -> dict:
        r = seed_mixture_gradients(moe, fit_xt, fit_yt, gate_grad_scale=f["gate_grad_scale"], chunk=chunk,
                                   lead_counts=True, rows=rows, workers=workers)
        opt.step()
        share = _lead(r["lead_counts"])
        return {"loss": r["loss"], "fit_err": round(100 * (1 - r["correct"] / n_fit), 4),
                "lead_max": max(share), "lead_share": share}

    def moe_eval(epoch: int) -> dict:
        row = {"test_err": err_pct(moe, test_xb, data["test_y"])}
        if on_test:
            row["unseen_train_err"] = err_pct(moe, train_xb, data["train_y"])
        return row

    t0 = time.perf_counter()
    train_phase(run, "moe", moe, opt, f["moe_epochs"], moe_epoch, evaluate=moe_eval,
                log_every=f["log_every"], checkpoint_every=f["checkpoint_every"])
    probs, gates = _seed_predict(moe, test_xb)
    save_eval(run, "moe", data["test_y"], probs, gates, class_names=data["classes"])
    rep = model_report(data["test_y"], probs, gates, n_cls)
    rep.update(epochs=f["moe_epochs"], trained_on="test" if on_test else "train",
               train_time_s=round(time.perf_counter() - t0, 1), **cost_row(moe, test_xb[:256]))
    tr_probs, tr_gates = _seed_predict(moe, train_xb)
    rep["train_error_pct"] = round(100 * float((tr_probs.argmax(1) != data["train_y"]).float().mean()), 4)
    rep["train_lead_share"] = routing_stats(data["train_y"], tr_gates, n_cls)["lead_share"]
    if on_test:
        rep["note"] = ("trained on the test split (the seed's protocol): test_accuracy is accuracy on its own "
                       "training data; train_error_pct is the error on the train images it never saw")
        rep["unseen_error_pct"] = rep["train_error_pct"]
    models["moe"] = rep
    if cfg["baselines"]["equal_cost"]:
        models.update(dense_baselines(run, rep, lambda hid: SeedMLP(in_dim, hid, n_cls, dtype=dt),
                                      test_xb[:4], train_dense))
    _label_single(models)
    run.log(f"moe lead share (test split): {format_lead(rep['lead_share'])}")
    if on_test:
        run.log(f"moe trained on the test split: error {rep['test_error_pct']:.2f}% there, "
                f"{rep['train_error_pct']:.2f}% on the {len(data['train_y'])} train images it never saw")
    return {"test_accuracy": rep["test_accuracy"], "models": models, "lead_share": rep["lead_share"],
            "lead_share_pct": rep["lead_share_pct"], "class_expert_matrix": rep["class_expert_matrix"],
            "protocol": {"mode": "faithful", "moe_trained_on": rep["trained_on"],
                         "shuffle_split": proto["shuffle_split"], "gate_grad_scale": f["gate_grad_scale"],
                         "dtype": f["dtype"]}}


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


def minibatches(run: Run, phase: str, epoch: int, x: Tensor, y: Tensor, bs: int, norm: tuple[float, float],
             raw: Tensor | None = None, augment: Augment | None = None):
    """This epoch's shuffled minibatches (``run.generator(phase, epoch)`` orders and augments them): rows of
    ``x``, or, with ``augment``, the augmented ``raw`` images. Yields ``(x, y, loss_weight)``.

    Under torch.distributed every rank draws and augments the same global batch (so the data are those
    of one process) and keeps its contiguous part (``ddp.local_share``); ``loss_weight`` makes DDP's
    gradient average the gradient of the global-batch mean loss (1.0 in one process)."""
    g = run.generator(phase, epoch)
    perm = torch.randperm(y.shape[0], generator=g)
    for i in range(0, y.shape[0], bs):
        idx = perm[i:i + bs]
        xb = augment(raw.index_select(0, idx), g) if augment is not None else x.index_select(0, idx)
        xb, yb = ddp.local_share(xb), ddp.local_share(y.index_select(0, idx))
        yield (xb - norm[0]) / norm[1], yb, ddp.loss_weight(len(yb), len(idx))


def epoch_means(tot: Tensor) -> list[float]:
    """(k + 1,) sums of k per-example quantities and the example count, summed over ranks -> k means."""
    tot = ddp.all_reduce_sum(tot)
    return [float(v / tot[-1]) for v in tot[:-1]]


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


def run_modern(cfg: dict, run: Run, data: dict) -> dict:
    from moelab.data.transforms import train_val_split

    t, m, d = cfg["train"], cfg["model"], cfg["data"]
    n_cls = data["num_classes"]
    h, w = data["shape"]
    x_tr, y_tr, raw_tr = data["train_x"].float(), data["train_y"], data["train_raw"]
    x_val = y_val = None
    if d["val_size"] > 0:
        tr_idx, val_idx = train_val_split(y_tr.numpy(), d["val_size"], seed=run.seed)
        x_val, y_val = x_tr[val_idx], y_tr[val_idx]
        x_tr, y_tr, raw_tr = x_tr[tr_idx], y_tr[tr_idx], raw_tr[tr_idx]
    augment = Augment(data, t["shift"]) if t["shift"] > 0 else None
    norm = (float(x_tr.mean()), float(x_tr.std())) if d["standardize"] else (0.0, 1.0)
    x_te, y_te = (data["test_x"].float() - norm[0]) / norm[1], data["test_y"]
    if x_val is not None:
        x_val = (x_val - norm[0]) / norm[1]
    in_dim = h * w
    bs, bf16 = t["batch_size"], resolve_bf16(t["bf16"], key="train.bf16")
    steps = math.ceil(x_tr.shape[0] / bs)
    eval_x, eval_y, eval_name = (x_val, y_val, "val_err") if x_val is not None else (x_te, y_te, "test_err")
    models: dict[str, dict] = {}

    def evaluator(model):
        def evaluate(epoch: int) -> dict:
            probs, gates = _predict(model, eval_x, bf16)
            row = {eval_name: round(100 * float((probs.argmax(1) != eval_y).float().mean()), 4)}
            if gates is not None:
                row["lead_share"] = _lead(torch.bincount(gates.argmax(1), minlength=gates.shape[1]))
                row["lead_max"] = max(row["lead_share"])
            return row
        return evaluate

    # ---- the mixture
    seed_module_init(run, "moe")
    moe = mlp_mixture(m["num_experts"], in_dim, m["hidden"], n_cls, m["gate_hidden"], m["activation"],
                      m["gate_temperature"])
    opt = make_optimizer(t, moe.parameters(), t["lr"])
    sched = make_schedule(t, opt, t["epochs"] * steps)

    moe_ddp = ddp.wrap_model(moe)  # DDP under torchrun, else moe itself
    world = ddp.current().world_size
    if world > 1:
        run.log(f"data-parallel: {world} ranks, each trains on its part of every global batch of {bs}")

    def moe_epoch(epoch: int) -> dict:
        moe.train()
        tot = torch.zeros(3, dtype=torch.float64)
        for xb, yb, w in minibatches(run, "moe", epoch, x_tr, y_tr, bs, norm, raw_tr, augment):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, out = moe_ddp(xb)  # MoEAux: the experts' logits (E, N, C) and the gate's (N, E)
            logits, gate_logits = out.expert_outputs, out.logits
            lg = mixture_log_gates(moe, gate_logits)
            loss = mixture_loss(t["loss"], logits, lg, yb, t["label_smoothing"])
            aux = torch.zeros(())
            if t["balance"] != "none" and t["balance_weight"] != 0:
                aux = balance_loss(t["balance"], gate_logits.float(), lg.exp())
                loss = loss + t["balance_weight"] * aux
            optimizer_step(opt, sched, loss * w, tot, loss, aux, len(yb))
        mean_loss, mean_aux = epoch_means(tot)
        return {"loss": mean_loss, "aux": mean_aux, "lr": opt.param_groups[0]["lr"]}

    t0 = time.perf_counter()
    train_phase(run, "moe", moe, opt, t["epochs"], moe_epoch, evaluate=evaluator(moe), sched=sched,
                log_every=t["log_every"])
    probs, gates = _predict(moe, x_te, bf16)
    save_eval(run, "moe", y_te, probs, gates, class_names=data["classes"])
    rep = model_report(y_te, probs, gates, n_cls)
    rep.update(epochs=t["epochs"], train_time_s=round(time.perf_counter() - t0, 1), **cost_row(moe, x_te[:256]))
    if x_val is not None:
        vp, _ = _predict(moe, x_val, bf16)
        rep["val_error_pct"] = round(100 * float((vp.argmax(1) != y_val).float().mean()), 4)
    models["moe"] = rep

    # ---- dense networks (the single network, the equal-cost baselines), trained the same way
    s_epochs = t["single_epochs"] or t["epochs"]

    def train_dense(phase: str, hidden: int) -> dict:
        """One in-hidden-classes MLP with the single network's recipe (cross-entropy)."""
        seed_module_init(run, phase)
        net = mlp(in_dim, hidden, n_cls, m["activation"])
        opt = make_optimizer(t, net.parameters(), t["single_lr"] or t["lr"])
        sched = make_schedule(t, opt, s_epochs * steps)
        net_ddp = ddp.wrap_model(net)

        def dense_epoch(epoch: int) -> dict:
            net.train()
            tot = torch.zeros(2, dtype=torch.float64)
            for xb, yb, w in minibatches(run, phase, epoch, x_tr, y_tr, bs, norm, raw_tr, augment):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = net_ddp(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=t["label_smoothing"])
                opt.zero_grad(set_to_none=True)
                (loss * w).backward()
                opt.step()
                sched.step()
                tot += torch.stack([loss.detach().double() * len(yb),
                                    torch.tensor(float(len(yb)), dtype=torch.float64)])
            return {"loss": epoch_means(tot)[0], "lr": opt.param_groups[0]["lr"]}

        t0 = time.perf_counter()
        train_phase(run, phase, net, opt, s_epochs, dense_epoch, evaluate=evaluator(net), sched=sched,
                    log_every=t["log_every"])
        probs, _ = _predict(net, x_te, bf16)
        save_eval(run, phase, y_te, probs, class_names=data["classes"])
        r = model_report(y_te, probs, None, n_cls)
        r.update(epochs=s_epochs, train_time_s=round(time.perf_counter() - t0, 1), hidden=hidden,
                 **cost_row(net, x_te[:64]))
        if x_val is not None:
            vp, _ = _predict(net, x_val, bf16)
            r["val_error_pct"] = round(100 * float((vp.argmax(1) != y_val).float().mean()), 4)
        return r

    models["single"] = train_dense("single", m["hidden"])
    if cfg["baselines"]["equal_cost"]:
        models.update(dense_baselines(run, rep, lambda hid: mlp(in_dim, hid, n_cls, m["activation"]),
                                      x_te[:4], train_dense))
    _label_single(models)
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


# ======================================================================== gradient check
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

    name, cfg = resolve_config(experiment, overrides)
    if cfg.get("family") != "jacobs":
        raise MoelabError(f"gradcheck supports the jacobs experiments; '{name}' is family {cfg.get('family')!r}.")
    t0 = time.perf_counter()
    data = load_data(cfg, seed, data_dir)
    x = data["train_x"][:num_examples].double()
    y = data["train_y"][:num_examples]
    n_cls, m = data["num_classes"], cfg["model"]
    g = seeded_generator(seed, "gradcheck")
    if cfg["mode"] == "faithful":
        model = SeedMixture(m["num_experts"], x.shape[1], m["hidden"], n_cls, m["gate_hidden"], generator=g,
                            dtype=torch.float64)
        xin, target = add_bias_column(x), F.one_hot(y, n_cls).double()

        def loss_fn(params: dict[str, Tensor]) -> Tensor:
            return seed_loss(params, xin, target)
        what = "Jacobs competitive loss 0.5 * sum_i g_i ||y - o_i||^2 (the seed's mean_squared_error_ME)"
    else:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        model = mlp_mixture(m["num_experts"], x.shape[1], m["hidden"], n_cls, m["gate_hidden"], m["activation"],
                            m["gate_temperature"]).double()
        kind, eps = cfg["train"]["loss"], cfg["train"]["label_smoothing"]

        def loss_fn(params: dict[str, Tensor]) -> Tensor:
            out = functional_call(model, params, (x,))[1]
            return mixture_loss(kind, out.expert_outputs, mixture_log_gates(model, out.logits), y, eps)
        what = f"modern loss {kind!r}"
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    auto = dict(zip(leaves, torch.autograd.grad(loss_fn(leaves), list(leaves.values()))))
    # every element of a parameter with up to max_coords elements, else max_coords random ones
    coords = {k: (torch.arange(p.numel()) if p.numel() <= max_coords else
                  torch.randperm(p.numel(), generator=g)[:max_coords].sort().values) for k, p in params.items()}
    fd = finite_difference_grads(loss_fn, params, coords)
    print(f"gradcheck {name}: {what}; {num_examples} training images, float64; autograd vs central differences "
          f"(h = 1e-4); relative error = max |autograd - numeric| / max |gradient| per group")
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
    if cfg["mode"] == "faithful":
        # the hand-written full-batch gradient that training uses, against autograd
        seed_mixture_gradients(model, xin.T.contiguous(), target.T.contiguous(), gate_grad_scale=1.0, chunk=8)
        hand = max(relative_error(auto[k], p.grad) for k, p in model.named_parameters())
        print(f"  training gradient (hand-written, gate_grad_scale=1) vs autograd: max relative error {hand:.3e}")
        worst["hand-written"] = hand
    ok = all(v < tol for v in worst.values())
    print(f"{'OK: all' if ok else 'FAILED: not all'} below {tol:g} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


def seed_loss(p: dict[str, Tensor], x: Tensor, target: Tensor) -> Tensor:
    """The seed's forward and ``mean_squared_error_ME`` as a pure function of the parameters (vmappable)."""
    hg = torch.sigmoid(x @ p["gate_hidden"])
    gates = torch.softmax(hg @ p["gate_softmax"][1:] + p["gate_softmax"][0], dim=-1)  # (N, E)
    he = torch.sigmoid(torch.einsum("nd,edk->enk", x, p["expert_hidden"]))
    o = torch.sigmoid(he @ p["expert_output"][:, 1:] + p["expert_output"][:, :1])  # (E, N, C)
    err = ((o - target) ** 2).sum(-1)  # (E, N)
    return 0.5 * (gates.T * err).sum() / x.shape[0]
