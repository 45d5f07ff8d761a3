"""The ``sparse_mlp`` family's recipe: the loss, the evaluation forward and the settings with which one network
(the mixture and each dense baseline alike) trains through :func:`moelab.experiments.digits.fit_model`."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.experiments.digits import Splits, fit_model
from moelab.experiments.sparse_mlp.config import Train
from moelab.models.mlp_mixture import SparseMoEMLP
from moelab.train.run import Run


def loss(t: Train, out: tuple[Tensor, Tensor | None], y: Tensor) -> tuple[Tensor, Tensor | None]:
    """Cross-entropy (label smoothing ``t.label_smoothing``) and the routers' weighted auxiliary loss."""
    logits, aux = out
    return F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing), aux


def outputs(model: SparseMoEMLP, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """x -> class probabilities (N, C), and the last MoE block's combine weights (N, E) if there is one."""
    logits, _, auxes = model.forward_with_aux(x)
    probs = torch.softmax(logits.float(), -1)
    return (probs, auxes[-1].gates) if auxes else probs


def train_model(run: Run, phase: str, model: SparseMoEMLP, t: Train, sp: Splits, bf16: bool) -> dict:
    """Train one network with the family's recipe -> its model row (cost counted on 512 validation images)."""
    return fit_model(run, phase, model, partial(loss, t), t, sp, bf16, partial(outputs, model), epochs=t.epochs,
                     lr=t.lr, routing_lr_scale=t.routing_lr_scale, eval_batch=2048, probe=sp.val_x[:512])
