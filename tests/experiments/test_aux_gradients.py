"""The router's balance loss reaches the router through every family's real training step.

Each test trains a family for one optimiser step (one epoch of one batch), through the family's own code
(config -> model -> its loss function -> :func:`moelab.train.trainer.minibatch_epoch`), twice from the same
initial weights and the same batch: once with the auxiliary loss weighted ``w > 0`` and once with weight 0.
The task gradient is the same in both, so the difference of the router's gradients left by the two steps
must be exactly the gradient of ``w * balance loss`` at the initial weights, which the test computes by hand
from the loss functions of :mod:`moelab.moe.losses` (jacobs) or the model's own auxiliary output
(sparse_mlp, cifar_moe). A balance loss that is detached in the loop, or dropped by a family's loss
function, leaves that difference at 0.

The trainer's ``minibatch_epoch`` is wrapped (not replaced): the wrapper records the batch and the initial
weights, calls the real loop, then keeps the gradients its one step left on the parameters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import moelab.train.trainer as trainer
from moelab.experiments.runner import run_experiment
from moelab.moe import MoE
from moelab.moe import losses as L


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("MOELAB_KERNELS", "off")  # the PyTorch paths: no 40 s kernel build
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class StepRecorder:
    """Wraps the trainer's ``minibatch_epoch``: for each call, the model, its forward, the first batch, the
    initial weights and (after the real loop ran) the gradients left by its last step."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = trainer.minibatch_epoch

        def wrapper(model, opt, sched, batches, forward, loss_fn, **kw):
            batches = list(batches)
            rec = {"model": model, "forward": forward, "batch": batches[0], "steps": len(batches),
                   "init": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            row = real(model, opt, sched, iter(batches), forward, loss_fn, **kw)
            rec["grads"] = {n: None if p.grad is None else p.grad.detach().clone()
                            for n, p in model.named_parameters()}
            self.calls.append(rec)
            return row

        monkeypatch.setattr(trainer, "minibatch_epoch", wrapper)

    def first(self, pred) -> dict:
        rec = next(c for c in self.calls if pred(c["model"]))
        assert rec["steps"] == 1, "the test needs an epoch of exactly one step"
        return rec


def reference_grads(rec: dict, names: list[str], aux_of) -> dict[str, torch.Tensor]:
    """d(loss weight * aux_of(forward(batch))) / d(router parameters) at the recorded initial weights, in train
    mode (the state the step ran in). Leaves the model at its initial weights."""
    model = rec["model"]
    model.load_state_dict(rec["init"])
    model.train()
    xb, _, w = rec["batch"]
    params = dict(model.named_parameters())
    aux = aux_of(rec["forward"](xb))
    grads = torch.autograd.grad(aux * w, [params[n] for n in names])
    return dict(zip(names, grads))


def assert_router_grad_is_task_plus_balance(with_aux: dict, without: dict, ref: dict[str, torch.Tensor]) -> None:
    """grad(step with the balance loss) - grad(step without) == the balance loss's own gradient, and that is
    not negligible next to the task's gradient (else the check would be empty)."""
    total = sum(float(g.norm()) ** 2 for g in ref.values()) ** 0.5
    task = sum(float(without["grads"][n].norm()) ** 2 for n in ref) ** 0.5
    assert total > 0.05 * task, f"the balance loss's gradient ({total:.3g}) is too small to test (task {task:.3g})"
    for n, g in ref.items():
        g_with, g_without = with_aux["grads"][n], without["grads"][n]
        assert g_with is not None and g_without is not None, n
        diff = g_with - g_without
        assert torch.allclose(diff, g, rtol=1e-3, atol=1e-4 * total), (
            f"{n}: the router's gradient from the balance loss is {float(diff.norm()):.4g} "
            f"after the training step, expected {float(g.norm()):.4g}")


# ----------------------------------------------------------------------------- jacobs (modern)
JACOBS = ["train.epochs=1", "data.train_limit=160", "data.test_limit=40", "train.batch_size=160",
          "baselines.equal_cost=false", "train.label_smoothing=0", "compute.threads=1"]


def _jacobs_step(monkeypatch, tmp_path, name: str, sets: list[str]) -> dict:

    rec = StepRecorder(monkeypatch)
    run_experiment("digits-jacobs", JACOBS + sets, out=tmp_path / name, quiet=True)
    return rec.first(lambda m: isinstance(m, MoE))


@pytest.mark.parametrize("balance", ["importance", "switch", "entropy", "z"])
def test_jacobs_balance_loss_reaches_the_gate(balance, monkeypatch, tmp_path):
    """digits-jacobs (modern): the gate's gradient after one step includes balance_weight x the balance loss."""
    weight = 2.0
    with_aux = _jacobs_step(monkeypatch, tmp_path, "w", [f"train.balance={balance}", f"train.balance_weight={weight}"])
    without = _jacobs_step(monkeypatch, tmp_path, "0", [f"train.balance={balance}", "train.balance_weight=0"])
    moe = with_aux["model"]
    names = [n for n, _ in moe.named_parameters() if n.startswith("router.")]
    assert names and all(n.startswith("router.gate") for n in names)  # the jacobs gate is the router's MLP

    def balance_of(out):
        logits = out[1].logits.float()
        gates = torch.softmax(logits / moe.router.temperature, dim=-1)
        if balance == "importance":
            b = L.importance_loss(gates)
        elif balance == "switch":
            b = L.switch_balance_loss(gates, torch.bincount(gates.argmax(1), minlength=gates.shape[1]))
        elif balance == "entropy":
            b = L.gate_entropy(gates)
        else:
            b = L.router_z_loss(logits)
        return weight * b

    assert_router_grad_is_task_plus_balance(with_aux, without, reference_grads(with_aux, names, balance_of))


# ----------------------------------------------------------------------------- sparse_mlp
SPARSE = ["data.dataset=digits", "data.resize=none", "data.train_limit=200", "data.val_size=40",
          "data.test_limit=40", "train.batch_size=160", "train.epochs=1", "train.shift=0", "train.label_smoothing=0",
          "model.dim=16", "model.hidden=32", "model.num_experts=4", "baselines.equal_cost=false"]


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_sparse_mlp_aux_loss_reaches_the_router(router, monkeypatch, tmp_path):
    """mnist-sparse (on the digits, same code): the router's gradient after one step includes aux_scale x
    the router's default auxiliary losses."""

    def step(name: str, scale: float) -> dict:
        rec = StepRecorder(monkeypatch)
        sets = SPARSE + [f"model.router={router}", "model.k=2", f"train.aux_scale={scale}"]
        run_experiment("mnist-sparse", sets, out=tmp_path / name, quiet=True)
        return rec.first(lambda m: True)

    with_aux, without = step("w", 10.0), step("0", 0.0)
    model = with_aux["model"]
    names = [n for n, _ in model.named_parameters() if ".router." in f".{n}"]
    assert names
    assert_router_grad_is_task_plus_balance(with_aux, without, reference_grads(with_aux, names, lambda out: out[1]))


# ----------------------------------------------------------------------------- cifar_moe
def _cifar_step(tmp_path, name: str, m, aux_scale: float) -> None:
    """One epoch of one step of the cifar_moe recipe (:func:`moelab.experiments.cifar_moe.fit`: its
    optimiser, schedule, augmentation, loss and the trainer's minibatch epoch) on 8 random images."""
    import moelab.experiments.cifar_moe as cm
    from moelab.experiments.cifar import Images
    from moelab.train.run import Run

    rng = np.random.default_rng(0)
    train = Images(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.arange(8) % 10, True, "cpu")
    t = dataclasses.replace(cm.Train(), batch_size=8, epochs=1.0)
    torch.manual_seed(0)
    model = cm.build_model(m, aux_scale=aux_scale).to(memory_format=torch.channels_last)
    model.init_whitening(train.batch(torch.arange(8)))
    run = Run(tmp_path / name, "aux-grad", {}, seed=0, quiet=True)
    try:
        cm.fit(run, "moe", model, t, train, 1, False)
    finally:
        run.close()


@pytest.mark.parametrize("moe, router", [("blocks", "topk"), ("blocks", "switch"), ("tokens", "topk")])
def test_cifar_moe_aux_loss_reaches_the_router(moe, router, monkeypatch, tmp_path):
    """cifar10-moe, expert blocks and token MoE: the router's gradient after one step of the recipe includes
    aux_scale x the routers' auxiliary losses (weighted, like the cross-entropy, by the batch size)."""
    import moelab.experiments.cifar_moe as cm

    m = cm.Model(width=8, moe=moe, moe_blocks=[3], num_experts=4, router=router, k=2, expert_hidden=8)
    rec = StepRecorder(monkeypatch)
    _cifar_step(tmp_path, "w", m, 20.0)
    _cifar_step(tmp_path, "0", m, 0.0)
    with_aux, without = rec.calls
    assert with_aux["steps"] == without["steps"] == 1
    model = with_aux["model"]
    routing = {id(p) for p in cm.routing_parameters(model)}
    names = [n for n, p in model.named_parameters() if id(p) in routing]
    assert names
    assert_router_grad_is_task_plus_balance(with_aux, without, reference_grads(with_aux, names, lambda out: out[1]))
