"""The ``cifar_moe`` family's recipe (airbench's): the optimiser, the step schedule, the loss, training one model
(the mixture and every dense baseline alike) and its row: test and validation error, counted cost, routing."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from moelab.analysis.routing import latent_routing
from moelab.cost import cost_row
from moelab.experiments.cifar import Images, image_batches
from moelab.experiments.cifar_moe.config import Config, Train
from moelab.experiments.cifar_moe.model import condconv_routing
from moelab.models.fast_cnn import FastCNN
from moelab.train.evaluation import error_pct, routing_stats, save_eval
from moelab.train.optim import routing_parameters
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict


def make_optimizer(model: FastCNN, t: Train, batch: int) -> torch.optim.SGD:
    """airbench's SGD: lr and weight decay per summed example, BN / whitening biases at ``bias_scaler`` x lr,
    the routing parameters (:func:`routing_parameters`) at ``routing_lr_scale`` x lr. airbench's lr suits
    convolutions followed by BatchNorm (scale-invariant); a router is not, and at that lr (its bias at 64x
    among the BN biases, as before this group existed) its softmax saturates onto one expert in the first
    epoch."""
    scale = 1024 * (1 + 1 / (1 - t.momentum))
    lr, wd = t.lr / scale, t.weight_decay * batch / scale
    routing = [p for p in routing_parameters(model) if p.requires_grad]
    routing_ids = {id(p) for p in routing}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in routing_ids]
    biases = [p for p in params if p.dim() == 1 and p is not model.whiten.bias]
    rest = [p for p in params if p.dim() != 1]
    groups = [{"params": rest, "lr": lr, "weight_decay": wd, "name": "weights"},
              {"params": routing, "lr": lr * t.routing_lr_scale, "weight_decay": wd, "name": "routing"},
              {"params": biases, "lr": lr * t.bias_scaler, "weight_decay": wd / t.bias_scaler, "name": "biases"},
              {"params": [model.whiten.bias], "lr": lr * t.bias_scaler, "weight_decay": wd / t.bias_scaler,
               "name": "whiten_bias"}]
    return torch.optim.SGD(groups, momentum=t.momentum, nesterov=t.momentum > 0)


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """airbench's triangle: 0.2 -> 1 at ``warmup_frac`` of the steps, then linearly to 0."""
    peak = warmup_frac * total
    return float(np.interp(step, [0, peak, total], [0.2, 1.0, 0.0]))


def make_schedule(opt: torch.optim.SGD, t: Train, total: int, steps_per_epoch: int) -> LambdaLR:
    """:func:`lr_factor` per step for every group; the whitening bias trains only for the first
    ``whiten_bias_epochs`` epochs (then its lr is 0)."""
    freeze = t.whiten_bias_epochs * steps_per_epoch

    def factor(frozen_after: int | None):
        return lambda step: 0.0 if frozen_after is not None and step >= frozen_after else \
            lr_factor(step, total, t.warmup_frac)

    return LambdaLR(opt, [factor(freeze if g["name"] == "whiten_bias" else None) for g in opt.param_groups])


def fit(run: Run, phase: str, model: FastCNN, t: Train, train: Images, total_steps: int, bf16: bool,
        evaluate=None) -> dict:
    """Train ``model`` with the recipe for ``total_steps`` steps (the last epoch cut short) -> the last
    epoch's row: :func:`make_optimizer`, the step-based :func:`make_schedule` (a checkpointed LambdaLR,
    so a resumed run continues it exactly), flips and translations, :func:`loss`."""
    steps_per_epoch = math.ceil(len(train) / t.batch_size)
    opt = make_optimizer(model, t, t.batch_size)
    trainer = Trainer(run, phase, model, opt, make_schedule(opt, t, total_steps, steps_per_epoch), bf16=bf16,
                      epochs=math.ceil(total_steps / steps_per_epoch), device=run.device, log_every=t.log_every)

    def steps(epoch: int) -> int:
        return max(0, min(steps_per_epoch, total_steps - epoch * steps_per_epoch))

    def batches(epoch: int):
        return image_batches(train, t.batch_size, run.generator(phase, epoch), t.flip, t.translate,
                             max_steps=steps(epoch), summed=True)

    return trainer.fit(batches, model.forward_with_aux, partial(loss, t), evaluate=evaluate,
                       progress=lambda epoch: min(len(train), steps(epoch) * t.batch_size))


def loss(t: Train, out, y: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy (batch mean) and the routers' auxiliary loss; weighted by the batch size in the step,
    as airbench sums its loss over the batch."""
    logits, aux, _ = out
    return F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing), aux  # weights: build_model


def per_image(gates: Tensor, n: int) -> Tensor:
    """Gates (N*P, E) of P tokens per image (P = 1 for per-image routing) -> (N, E), averaged over each image's
    tokens: the share of the image's positions (weighted by gate) each expert takes."""
    return gates.view(n, -1, gates.shape[-1]).mean(1)


def outputs(model: FastCNN):
    """x -> (logits, per-image routing weights of each MoE module of 2+ experts and of each CondConv2d): one
    forward."""
    def fn(x):
        logits, _, auxes = model.forward_with_aux(x)
        return (logits, *[per_image(a.gates.float(), len(x)) for a in auxes if len(a.expert_counts) > 1],
                *condconv_routing(model))  # a one-expert layer routes nothing
    return fn


def class_probs(model: FastCNN, images: Images, tta: int, bf16: bool, batch: int) -> tuple[Tensor, list[Tensor]]:
    """-> (class probabilities (N, C), per-image routing weights of each routing module on the plain images),
    on the host; test-time augmentation ``tta`` (:func:`moelab.train.trainer.predict`)."""
    model.eval()
    logits, *routes = predict(outputs(model), images, batch=batch, device=images.device, bf16=bf16, tta=tta)
    return torch.softmax(logits, -1), routes


def train_model(cfg: Config, run: Run, data: dict, bf16: bool, phase: str, model: FastCNN, epochs: float) -> dict:
    """``model`` on the run's device, its whitening from the training images, trained with the recipe for
    ``epochs`` (whole steps) -> its row: test and validation error (with ``eval.tta``), counted cost and,
    for a mixture, routing statistics; its test predictions saved (``eval/<phase>.safetensors``)."""
    t, ev, val, test = cfg.train, cfg.eval, data["val"], data["test"]
    model = model.to(run.device)
    if cfg.compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.init_whitening(data["train"].batch(torch.arange(min(len(data["train"]), 5000))))
    steps_per_epoch = math.ceil(len(data["train"]) / t.batch_size)
    total = max(1, round(epochs * steps_per_epoch))

    def val_row(epoch: int) -> dict:
        """Validation error, and how routing evolves: each expert's share of the largest gate."""
        probs, routes = class_probs(model, val, 0, bf16, ev.batch_size)
        row = {"val_err": error_pct(probs, val.y, 3)}
        if routes:
            lead = torch.bincount(routes[-1].argmax(1), minlength=routes[-1].shape[1]) / len(val)
            row["val_lead_share"] = [round(float(v), 4) for v in lead]
        return row

    fit(run, phase, model, t, data["train"], total, bf16, evaluate=val_row)  # the optimiser: after .to(device)
    train_time = run.train_time(phase)
    val_probs, _ = class_probs(model, val, ev.tta, bf16, ev.batch_size)
    probs, routes = class_probs(model, test, ev.tta, bf16, ev.batch_size)
    gates = routes[-1] if routes else None
    save_eval(run, phase, test.y, probs, gates, class_names=data["classes"], latent=data["test_latent"])
    err = error_pct(probs, test.y, 3)
    row = {"test_accuracy": round(1 - err / 100, 5), "test_error_pct": err,
           "val_error_pct": error_pct(val_probs, val.y, 3), "epochs": round(total / steps_per_epoch, 3),
           "train_time_s": train_time, **cost_row(model, probe(data)), "widths": list(model.widths)}
    if gates is not None:
        row["routing"] = {**routing_stats(test.y, gates, len(data["classes"])),
                          **latent_routing(data["test_latent"], gates, len(data["latent_classes"]))}
    run.log(f"[{phase}] test acc {100 * row['test_accuracy']:.2f}% (val err {row['val_error_pct']:.2f}%), "
            f"{row['params']:,} params, {row['flops_per_example'] / 1e6:.1f} MFLOPs/image, {train_time} s")
    return row


def probe(data: dict) -> Tensor:
    """The first validation images: the batch every model's cost is counted on."""
    return data["val"].batch(torch.arange(min(len(data["val"]), 8)))
