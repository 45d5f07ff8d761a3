"""``mode = "faithful"`` of the jacobs family (``mnist-jacobs-faithful``): the seed's NumPy script exactly,
full-batch gradient descent with its hand-written gradient (see :mod:`moelab.experiments.jacobs`)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.cost import cost_row
from moelab.experiments.digit_common import (
    dense_baselines,
    format_lead,
    label_single,
    lead_share,
    model_report,
)
from moelab.models.mlp_mixture import (
    SeedMixture,
    SeedMLP,
    add_bias_column,
    seed_mixture_gradients,
    seed_mlp_gradients,
)
from moelab.train.evaluation import routing_stats, save_eval
from moelab.train.loop import train_phase
from moelab.train.run import Run


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
        share = lead_share(r["lead_counts"])
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
    label_single(models)
    run.log(f"moe lead share (test split): {format_lead(rep['lead_share'])}")
    if on_test:
        run.log(f"moe trained on the test split: error {rep['test_error_pct']:.2f}% there, "
                f"{rep['train_error_pct']:.2f}% on the {len(data['train_y'])} train images it never saw")
    return {"test_accuracy": rep["test_accuracy"], "models": models, "lead_share": rep["lead_share"],
            "lead_share_pct": rep["lead_share_pct"], "class_expert_matrix": rep["class_expert_matrix"],
            "protocol": {"mode": "faithful", "moe_trained_on": rep["trained_on"],
                         "shuffle_split": proto["shuffle_split"], "gate_grad_scale": f["gate_grad_scale"],
                         "dtype": f["dtype"]}}
