"""MoE CNNs on CIFAR-10 against the dense CNN of equal cost (``cifar10-moe``, issue #16).

The dense reference is :class:`moelab.models.fast_cnn.FastCNN` (airbench-style) trained with airbench's
recipe (:class:`Recipe`: summed label-smoothed cross-entropy, Nesterov SGD with airbench's lr / wd
scaling, BN biases at ``bias_scaler`` x lr, a triangle schedule, flips and translations, flip +
translation TTA; no look-ahead averaging). ``model.moe`` puts a mixture in the blocks ``model.moe_blocks``:
``condconv`` (every 3x3 conv a :class:`moelab.moe.CondConv2d`) or ``blocks`` (each block a
:class:`moelab.MoE` of E expert blocks, every image routed to ``k`` of them by a linear gate on its
pooled features). Baselines in the same run, same recipe, every width counted (:mod:`moelab.cost`):
``dense-equal-flops``, ``dense-equal-params``, ``dense-equal-time`` (the equal-flops network given the
mixture's training time) and ``dense-reference``. All choices are made on ``data.val_size`` training
images held out (stratified); the test split is read once per model at the end. The design, the
recipe and the measured numbers: ``docs/results-cifar-moe.md``.
"""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from moelab.analysis.routing import latent_routing
from moelab.config import refuse
from moelab.cost import cost_row, count_params, flops_per_example
from moelab.errors import ConfigError
from moelab.experiments import family
from moelab.experiments.baselines import EQUAL_COST, dense_widths, equal_cost_rows
from moelab.experiments.cifar_common import Images, image_batches, limit_per_class
from moelab.experiments.cifar_moe_config import (  # noqa: F401 (re-exported)
    BLOCK_ROUTERS,
    DEFAULTS,
    MOES,
    RESUMABLE,
    RULES,
    Config,
    Model,
    Train,
    check_config,
)
from moelab.experiments.router_recipe import loss_weights, recipe_options
from moelab.models.fast_cnn import BlockThen, ConvBlock, FastCNN, batch_norm
from moelab.moe import CondConv2d, ConvBlockExperts, MoE, TokenMoE2d
from moelab.moe.routers import resolve
from moelab.moe.routers.base import zero_gate
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.runtime import torch_threads
from moelab.train.evaluation import error_pct, routing_stats, save_eval
from moelab.train.optim import routing_parameters
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict, seed_module_init

# ----------------------------------------------------------------------------- models


def block_widths(width: int) -> tuple[int, int, int]:
    return (max(1, width // 4), width, width)


def build_model(m: Model, width: int | None = None, dense: bool = False, aux_scale: float = 1.0,
                twin: bool = False, num_classes: int = 10) -> FastCNN:
    """The mixture of ``m`` (``dense=False``) or the dense FastCNN of block-3 width ``width``; ``twin=True``
    (``model.moe = "tokens"``): the mixture's dense twin, each token MoE one dense FFN of k x its hidden
    width, k the experts a token runs (``model.k``; 1 for switch): the same active FLOPs, router aside."""
    widths = block_widths(width or m.width)
    if dense or m.moe == "none":
        return FastCNN(widths, num_classes)
    blocks, e = set(m.moe_blocks), m.num_experts
    if m.moe == "condconv":
        def conv(name: str, c_in: int, c_out: int) -> nn.Module | None:
            if int(name[5]) not in blocks:  # "block{b}.conv{i}"
                return None
            cc = CondConv2d(c_in, c_out, 3, e, padding=1, bias=False, routing=m.routing, temperature=m.temperature)
            if m.router_init == "zeros":
                zero_gate("condconv", cc.routing_fn)
            return cc

        return FastCNN(widths, num_classes, conv_factory=conv)
    router_cls, options = resolve(m.router)[0], recipe_options(m)  # the router's options besides k
    weights = loss_weights(m.router, m, aux_scale)  # the router's defaults x aux_scale (no balance loss with bias)
    k = m.k if router_cls.takes_k else None
    if m.capacity_factor:
        options["capacity_factor"] = m.capacity_factor
    if m.moe == "tokens":
        k_active = k if k is not None else 1 if m.router == "switch" else e if m.router == "dense" else m.k  # per token

        def token_block(b: int, c_in: int, c_out: int) -> nn.Module | None:
            if b not in blocks:
                return None
            hidden = m.expert_hidden or 2 * c_out
            moe = TokenMoE2d(c_out, 1, k_active * hidden, router="dense", norm=batch_norm(c_out)) if twin else \
                TokenMoE2d(c_out, e, hidden, router=m.router, k=k, norm=batch_norm(c_out), aux_loss_weights=weights,
                           router_options=options or None)
            return BlockThen(ConvBlock(c_in, c_out), moe)

        return FastCNN(widths, num_classes, block_factory=token_block)

    def pooled_linear(c_in: int) -> nn.Sequential:  # (N, C, H, W) -> (N, E) logits
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, e, bias=False))

    def block(b: int, c_in: int, c_out: int) -> nn.Module | None:
        if b not in blocks:
            return None
        gate, block_options = pooled_linear(c_in), dict(options)
        for name in router_cls.extra_gates:  # noisy_topk's noise std: from the same pooled features, zero-initialised
            extra = pooled_linear(c_in)
            nn.init.zeros_(extra[-1].weight)
            block_options[name] = extra
        if m.expert_block == "resnet":
            experts = ConvBlockExperts(c_in, c_out, e, stride=2)
        else:  # E copies of the dense block it replaces (each run on exactly its images)
            experts = [ConvBlock(c_in, c_out) for _ in range(e)]
        return MoE(None, e, router=m.router, k=k, router_options=block_options, gate=gate, experts=experts,
                   aux_loss_weights=weights)

    return FastCNN(widths, num_classes, block_factory=block)


def _routing(model: FastCNN) -> list[Tensor]:
    """The per-image routing weights (N, E) of each CondConv2d in the last forward (in order)."""
    return [m.last_routing for m in model.modules() if getattr(m, "last_routing", None) is not None]


# ----------------------------------------------------------------------------- the recipe


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
                *_routing(model))  # a one-expert layer routes nothing
    return fn


def class_probs(model: FastCNN, images: Images, tta: int, bf16: bool, batch: int) -> tuple[Tensor, list[Tensor]]:
    """-> (class probabilities (N, C), per-image routing weights of each routing module on the plain images),
    on the host; test-time augmentation ``tta`` (:func:`moelab.train.trainer.predict`)."""
    model.eval()
    logits, *routes = predict(outputs(model), images, batch=batch, device=images.device, bf16=bf16, tta=tta)
    return torch.softmax(logits, -1), routes


# ----------------------------------------------------------------------------- the experiment


def load_images(cfg: Config, run: Run) -> dict:
    """The train / val / test :class:`Images` of ``data.task`` (:func:`moelab.data.tasks.task_from_config`, made
    of the images kept); a rotate task's crop runs through the CNN and its augmentation at its own size, and
    its original classes are ``test_latent`` (None for ``classes``), for the routing rows."""
    import dataclasses

    from moelab.data import load_dataset
    from moelab.data.tasks import task_from_config
    from moelab.data.transforms import train_val_split
    from moelab.train.run import seeded_generator

    d, cl = cfg.data, cfg.compute.channels_last
    ds = load_rgb_folder(d.folder, run) if d.folder else load_dataset(d.dataset, data_dir=run.data_dir)
    classes = list(range(len(ds.classes)))
    tr_keep = limit_per_class(ds.train_y, classes, d.train_per_class)
    te_keep = limit_per_class(ds.test_y, classes, d.test_per_class)
    ds = task_from_config(dataclasses.replace(ds, train_x=ds.train_x[tr_keep], train_y=ds.train_y[tr_keep],
                                              test_x=ds.test_x[te_keep], test_y=ds.test_y[te_keep]), d,
                          int(seeded_generator(run.seed, "task").initial_seed()), min_side=9,
                          why="the CNN's 2x2 whitening and three 2x poolings")
    x, y, latent = ds.train_x, ds.train_y, getattr(ds, "train_latent", None)
    if d.val_size >= len(y):
        raise refuse("data.val_size", d.val_size, f"fewer than the {len(y)} training images")
    if cfg.train.batch_size > len(y) - d.val_size:
        raise refuse("train.batch_size", cfg.train.batch_size,
                     f"at most the {len(y) - d.val_size} training images left after data.val_size")
    strata = y if latent is None else latent * len(ds.classes) + y  # a task: by (latent class, label)
    tr, va = train_val_split(strata, d.val_size, seed=run.seed, stratified=True)
    dev = run.device
    return {"train": Images(x[tr], y[tr], cl, dev), "val": Images(x[va], y[va], cl, dev),
            "test": Images(ds.test_x, ds.test_y, cl, dev), "classes": list(ds.classes),
            "test_latent": None if latent is None else torch.from_numpy(ds.test_latent),
            "latent_classes": list(getattr(ds, "latent_classes", [])), "dataset": ds.name}


MIN_FOLDER_SIDE = 17  # 16 after the 2x2 whitening, 2 after three 2x poolings


def load_rgb_folder(folder: str, run: Run):
    """``data.folder`` (:func:`moelab.experiments.folder_data.load_folder`) as RGB images: a grayscale folder's one
    channel repeated three times (said in the log); sides under :data:`MIN_FOLDER_SIDE` px refused (the CNN pools
    globally, so any larger size runs, at a cost that grows with the pixels)."""
    import dataclasses

    from moelab.experiments.folder_data import load_folder

    ds = load_folder(folder)
    h, w, c = ds.image_shape
    if min(h, w) < MIN_FOLDER_SIDE:
        raise ConfigError(f"data.folder = {folder!r} holds {h}x{w} images; cifar10-moe needs a side of at least "
                          f"{MIN_FOLDER_SIDE} px (after the CNN's 2x2 whitening and three 2x poolings its last block "
                          f"must see 2x2 positions: a block expert given one image of 1x1 cannot batch-normalise).")
    if c == 1:
        ds = dataclasses.replace(ds, train_x=ds.train_x.repeat(3, axis=-1), test_x=ds.test_x.repeat(3, axis=-1))
        run.log(f"data: {ds.name} has grayscale images: their channel repeated as R, G and B")
    run.log(f"data: {ds.name}, {h}x{w} images, {len(ds.classes)} classes ({', '.join(ds.classes)})")
    return ds


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


@family("cifar_moe", check=check_config, resumable=RESUMABLE, schema=Config)
def run(cfg: Config, run_ctx: Run) -> dict:
    with torch_threads(cfg.compute.threads):
        return _run(cfg, run_ctx)


def _run(cfg: Config, run: Run) -> dict:
    ddp.require_single_process(f"{run.name} (family cifar_moe)")
    t, m = cfg.train, cfg.model
    t0 = time.perf_counter()
    data = load_images(cfg, run)
    bf16 = resolve_bf16(cfg.compute.bf16, run.device, key="compute.bf16")
    run.log(f"data: {len(data['train'])} train / {len(data['val'])} val / {len(data['test'])} test images "
            f"({time.perf_counter() - t0:.1f} s); device {run.device}, bf16 {bf16}, torch threads {torch.get_num_threads()}")
    fit = partial(train_model, cfg, run, data, bf16)
    models: dict[str, dict] = {}
    seed_module_init(run, "moe")
    n_cls = len(data["classes"])
    moe = fit("moe", build_model(m, aux_scale=t.aux_scale, num_classes=n_cls), t.epochs)
    moe.update(moe=m.moe, num_experts=m.num_experts, moe_blocks=m.moe_blocks)
    models["moe"] = moe
    if cfg.baselines.equal_cost and m.moe != "none":
        models.update(_equal_cost(cfg, run, moe, fit, data))
    if cfg.baselines.dense_twin and m.moe == "tokens":
        seed_module_init(run, "dense-twin")
        models["dense-twin"] = {**fit("dense-twin", build_model(m, twin=True, num_classes=n_cls), t.epochs),
                                "matched_to": "architecture"}
    if cfg.baselines.reference and m.moe != "none":
        seed_module_init(run, "dense-reference")
        models["dense-reference"] = {**fit("dense-reference", build_model(m, dense=True, num_classes=n_cls),
                                           t.epochs), "width": m.width}
    return {"test_accuracy": moe["test_accuracy"], "models": models,
            "protocol": {"val_size": len(data["val"]), "selection": "last step; settings chosen on the validation split",
                         "tta": cfg.eval.tta, "bf16": bf16, **({"dataset": data["dataset"]} if cfg.data.folder else {})}}


def _equal_cost(cfg: Config, run: Run, moe: dict, fit, data: dict) -> dict[str, dict]:
    m, t, x = cfg.model, cfg.train, probe(data)[:2]

    def dense(w: int) -> FastCNN:
        return build_model(m, w, dense=True, num_classes=len(data["classes"]))

    widths = dense_widths(moe, lambda w: count_params(dense(w)), lambda w: flops_per_example(dense(w), x),
                          hi=8 * m.width)

    def train_dense(phase: str, w: int) -> dict:  # a dense baseline: its initial weights seeded by its name
        seed_module_init(run, phase)
        return fit(phase, dense(w), t.epochs)

    names = EQUAL_COST if cfg.baselines.equal_params else ("dense-equal-flops",)
    rows = equal_cost_rows(run, widths, train_dense, names=names, make_dense=dense)
    if cfg.baselines.equal_time:
        ref = rows["dense-equal-flops"]
        epochs = t.epochs * moe["train_time_s"] / max(ref["train_time_s"], 1e-9)
        run.log(f"[dense-equal-time] the dense-equal-flops network for {epochs:.2f} epochs: the mixture's "
                f"{moe['train_time_s']} s of training at its measured speed")
        seed_module_init(run, "dense-equal-time")
        rows["dense-equal-time"] = {**fit("dense-equal-time", dense(ref["width"]), epochs), "width": ref["width"],
                                    "matched_to": "train_time_s"}
    return rows


__all__ = ["DEFAULTS", "MOES", "build_model", "class_probs", "fit", "lr_factor", "make_optimizer", "routing_parameters", "run"]
