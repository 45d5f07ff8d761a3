"""The ``sparse_mlp`` family's recipe: one network trained (the mixture and each dense baseline alike), evaluated
on the validation split after epochs and on the test split at the end -> its model row."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.cost import cost_row
from moelab.experiments.digits import Splits, model_report
from moelab.experiments.sparse_mlp.config import Train
from moelab.models.mlp_mixture import SparseMoEMLP
from moelab.train.evaluation import error_pct, save_eval
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict


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


def train_model(run: Run, phase: str, model: SparseMoEMLP, t: Train, sp: Splits, bf16: bool) -> dict:
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
