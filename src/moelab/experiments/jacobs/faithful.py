"""``mode = "faithful"`` of the jacobs family (``mnist-jacobs-faithful``): the seed's NumPy script exactly,
full-batch gradient descent with its hand-written gradient (see :mod:`moelab.experiments.jacobs`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.cost import cost_row
from moelab.experiments.digits import (
    dense_baselines,
    format_lead,
    label_single,
    lead_share,
    model_report,
)
from moelab.experiments.jacobs.config import Config, Faithful, Model
from moelab.models.mlp_mixture import (
    SeedMixture,
    SeedMLP,
    add_bias_column,
    seed_mixture_gradients,
    seed_mlp_gradients,
)
from moelab.train.evaluation import routing_stats, save_eval
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]  # RULES: one of the two


def _seed_predict(model, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Faithful model on (N, 1 + D) -> (normalised outputs (N, C), gates (N, E) or None)."""
    def normalised(out: Tensor) -> Tensor:  # sigmoid outputs -> a distribution
        return out / out.sum(1, keepdim=True).clamp_min(1e-30)

    if isinstance(model, SeedMixture):
        def fn(xc):
            g, o = model(xc)
            return normalised(SeedMixture.combine(g, o)), g
        return tuple(predict(fn, x, batch=8192))
    return predict(lambda xc: normalised(model(xc)), x, batch=8192)[0], None


class FullBatch:
    """The faithful mode's tensors: biased inputs ``(N, 1 + D)`` for prediction, their transposes restricted
    to the pixels that are non-zero somewhere (``rows``) and one-hot targets, for the hand-written
    full-batch gradients."""

    def __init__(self, data: dict, dt: torch.dtype):
        n_cls = data["num_classes"]

        def prep(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            xb = add_bias_column(x.to(dt))
            return xb, xb.T.contiguous(), F.one_hot(y, n_cls).to(dt).T.contiguous()

        self.train_xb, train_xt, self.train_yt = prep(data["train_x"], data["train_y"])
        self.test_xb, test_xt, self.test_yt = prep(data["test_x"], data["test_y"])
        # Inputs that are 0 in every image (39 of MNIST 14x14's pixels) contribute exactly 0 to the forward pass
        # and get exactly 0 gradient: leave them out of the training GEMMs (the same update, 20% fewer FLOPs).
        self.rows = torch.cat([torch.ones(1, dtype=torch.bool),
                               (data["train_x"] != 0).any(0) | (data["test_x"] != 0).any(0)]).nonzero().squeeze(1)
        self.train_xt, self.test_xt = train_xt[self.rows].contiguous(), test_xt[self.rows].contiguous()
        self.train_y, self.test_y, self.classes = data["train_y"], data["test_y"], data["classes"]
        self.in_dim, self.num_classes, self.dt = data["train_x"].shape[1], n_cls, dt
        self.test_latent, self.num_latent = data.get("test_latent"), len(data.get("latent_classes") or [])


def _err_pct(model, xb: Tensor, y: Tensor) -> float:
    return round(100 * float((_seed_predict(model, xb)[0].argmax(1) != y).float().mean()), 4)


def _train_seed_mlp(run: Run, f: Faithful, fb: FullBatch, phase: str, hidden: int) -> dict:
    """One SeedMLP in-hidden-classes trained like the seed's single network (full-batch GD, MSE, train split)."""
    net = SeedMLP(fb.in_dim, hidden, fb.num_classes, generator=run.generator("init", phase), dtype=fb.dt)
    opt = torch.optim.SGD(net.parameters(), lr=f.lr)
    n_tr = fb.train_xt.shape[1]

    def dense_epoch(epoch: int) -> dict:
        r = seed_mlp_gradients(net, fb.train_xt, fb.train_yt, chunk=f.chunk, rows=fb.rows, workers=f.workers)
        opt.step()
        return {"loss": r["loss"], "train_err": round(100 * (1 - r["correct"] / n_tr), 4)}

    Trainer(run, phase, net, opt, epochs=f.single_epochs, log_every=f.log_every,
            checkpoint_every=f.checkpoint_every).fit(
        epoch_fn=dense_epoch, evaluate=lambda e: {"test_err": _err_pct(net, fb.test_xb, fb.test_y)})
    probs, _ = _seed_predict(net, fb.test_xb)
    save_eval(run, phase, fb.test_y, probs, class_names=fb.classes)
    return {**model_report(fb.test_y, probs, None, fb.num_classes),
            "train_error_pct": _err_pct(net, fb.train_xb, fb.train_y), "epochs": f.single_epochs,
            "trained_on": "train", "train_time_s": run.train_time(phase), "hidden": hidden,
            **cost_row(net, fb.test_xb[:64])}


def _train_seed_mixture(run: Run, f: Faithful, m: Model, fb: FullBatch, on_test: bool) -> dict:
    """The seed's mixture, full-batch GD with its gradient, on the train split (or the test split, as the seed)."""
    fit_xt, fit_yt = (fb.test_xt, fb.test_yt) if on_test else (fb.train_xt, fb.train_yt)
    moe = SeedMixture(m.num_experts, fb.in_dim, m.hidden, fb.num_classes, m.gate_hidden,
                      generator=run.generator("init", "moe"), dtype=fb.dt)
    opt = torch.optim.SGD(moe.parameters(), lr=f.lr)
    n_fit = fit_xt.shape[1]

    def moe_epoch(epoch: int) -> dict:
        r = seed_mixture_gradients(moe, fit_xt, fit_yt, gate_grad_scale=f.gate_grad_scale, chunk=f.chunk,
                                   lead_counts=True, rows=fb.rows, workers=f.workers)
        opt.step()
        share = lead_share(r["lead_counts"])
        return {"loss": r["loss"], "fit_err": round(100 * (1 - r["correct"] / n_fit), 4),
                "lead_max": max(share), "lead_share": share}

    def moe_eval(epoch: int) -> dict:
        row = {"test_err": _err_pct(moe, fb.test_xb, fb.test_y)}
        if on_test:
            row["unseen_train_err"] = _err_pct(moe, fb.train_xb, fb.train_y)
        return row

    Trainer(run, "moe", moe, opt, epochs=f.moe_epochs, log_every=f.log_every,
            checkpoint_every=f.checkpoint_every).fit(epoch_fn=moe_epoch, evaluate=moe_eval)
    probs, gates = _seed_predict(moe, fb.test_xb)
    save_eval(run, "moe", fb.test_y, probs, gates, class_names=fb.classes, latent=fb.test_latent)
    rep = model_report(fb.test_y, probs, gates, fb.num_classes, fb.test_latent, fb.num_latent)
    rep.update(epochs=f.moe_epochs, trained_on="test" if on_test else "train",
               train_time_s=run.train_time("moe"), **cost_row(moe, fb.test_xb[:256]))
    tr_probs, tr_gates = _seed_predict(moe, fb.train_xb)
    rep["train_error_pct"] = round(100 * float((tr_probs.argmax(1) != fb.train_y).float().mean()), 4)
    rep["train_lead_share"] = routing_stats(fb.train_y, tr_gates, fb.num_classes)["lead_share"]
    if on_test:
        rep["note"] = ("trained on the test split (the seed's protocol): test_accuracy is accuracy on its own "
                       "training data; train_error_pct is the error on the train images it never saw")
        rep["unseen_error_pct"] = rep["train_error_pct"]
    return rep


def run_faithful(c: Config, run: Run, data: dict) -> dict:
    f, proto, m = c.faithful, c.seed_protocol, c.model
    if run.device.type != "cpu":
        run.log(f"--device {run.device}: the faithful mode computes on the CPU (the seed's hand-written "
                f"full-batch gradients are CPU code, threaded over blocks)")
    fb = FullBatch(data, _dtype(f.dtype))
    if f.workers > 1:
        torch.set_num_threads(1)  # parallel over blocks instead (restored by run())
    on_test = proto.train_on_test
    models = {"single": _train_seed_mlp(run, f, fb, "single", m.hidden)}
    models["moe"] = rep = _train_seed_mixture(run, f, m, fb, on_test)
    if c.baselines.equal_cost:
        models.update(dense_baselines(run, rep, lambda hid: SeedMLP(fb.in_dim, hid, fb.num_classes, dtype=fb.dt),
                                      fb.test_xb[:4], lambda phase, hid: _train_seed_mlp(run, f, fb, phase, hid)))
    label_single(models)
    run.log(f"moe lead share (test split): {format_lead(rep['lead_share'])}")
    if on_test:
        run.log(f"moe trained on the test split: error {rep['test_error_pct']:.2f}% there, "
                f"{rep['train_error_pct']:.2f}% on the {len(fb.train_y)} train images it never saw")
    return {"test_accuracy": rep["test_accuracy"], "models": models, "lead_share": rep["lead_share"],
            "lead_share_pct": rep["lead_share_pct"], "class_expert_matrix": rep["class_expert_matrix"],
            "protocol": {"mode": "faithful", "moe_trained_on": rep["trained_on"],
                         "shuffle_split": proto.shuffle_split, "gate_grad_scale": f.gate_grad_scale,
                         "dtype": f.dtype, "device": "cpu"}}
