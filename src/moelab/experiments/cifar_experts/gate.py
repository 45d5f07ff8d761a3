"""The CIFAR seed's gates and mixtures: the gate trained on the cached expert outputs, its predictions, the
hierarchical mixture, joint fine-tuning, and the counted cost of each mixture (equal-cost baselines)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moelab.cost import cost_row, count_params, flops_per_example
from moelab.data.feed import fits_on_device
from moelab.device import to_device
from moelab.errors import ConfigError
from moelab.experiments.baselines import dense_widths
from moelab.experiments.cifar import Images, image_batches, index_batches
from moelab.experiments.cifar_experts.common import Data, autocast_for, to_memory_format
from moelab.experiments.cifar_experts.config import Config
from moelab.experiments.cifar_experts.pretrain import expert_fn
from moelab.models.cifar_cnn import Seed1CNN, conv_l2_penalty
from moelab.moe.losses import oracle_routing_loss
from moelab.reproductions.conv_experts import ConvExperts
from moelab.reproductions.gating import HIERARCHICAL, SEED_LR, GateNet, SeedCombine, num_heads, seed_moe
from moelab.reproductions.hierarchical import combine_hierarchical, hierarchical_weights
from moelab.train.evaluation import accuracy
from moelab.train.optim import onecycle_or_plateau
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict

# ----------------------------------------------------------------------------- cost (equal-cost baselines)

COST_PROBE = 16  # real test images each counted forward runs on (a CNN's FLOPs do not depend on them)
MAX_DENSE_WIDTH = 4096  # the width search's upper end (the seed's ten experts + gate: ~106)


def cost_probe(data: Data) -> torch.Tensor:
    """The first test images, normalised, contiguous: the batch every model's FLOPs are counted on."""
    return data.test.batch(torch.arange(min(COST_PROBE, len(data.test)))).contiguous()


class ExpertProbs(nn.Module):
    """The frozen experts as one stack for :class:`moelab.MoE`: images -> every expert's class probabilities
    ``(E, N, K)`` (:func:`_expert_fn`)."""

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        self.experts, self.num_experts = experts, len(experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expert_fn(self.experts)(x)[0]


class MixtureForward(nn.Module):
    """The mixture as it runs at inference on a batch of images -> logits, for counting its cost.

    Every expert runs (as in :func:`expert_outputs`): the gate kinds all weigh the ten outputs, and
    ``sparse`` zeroes all but ``top_k`` gate values only *after* every expert has run, so it is charged
    for all of them. The seed's gate kinds are a :class:`moelab.MoE` (:func:`moelab.reproductions.gating.seed_moe`);
    ``expert-aware``: the gate also reads the experts' log-probabilities and pooled features (combined by
    :class:`~moelab.reproductions.gating.SeedCombine`, the same routers); ``hierarchical``: the generalist instead
    of a gate; ``gate=None``: the uniform average. Parameters are the modules'; shared ones are counted once."""

    def __init__(self, experts: nn.ModuleList, kind: str, gate: GateNet | None = None,
                 generalist: Seed1CNN | None = None, cover: torch.Tensor | None = None, top_k: int = 2,
                 blend: float = 1.0):
        super().__init__()
        self.experts, self.kind, self.gate, self.generalist = experts, kind, gate, generalist
        self.cover, self.top_k, self.blend = cover, top_k, blend
        self.moe = seed_moe(ExpertProbs(experts), gate, kind, top_k) if gate is not None and gate.extra is None \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.moe is not None:
            return self.moe(x)[0]
        probs, feats = expert_fn(self.experts)(x)
        if self.kind == HIERARCHICAL:
            r = torch.softmax(self.generalist(x).float(), dim=1)
            return combine_hierarchical(r, probs, self.cover, self.blend)
        if self.gate is None:
            return probs.mean(0)
        extra = torch.cat([probs.clamp_min(1e-6).log().permute(1, 0, 2).flatten(1), feats], dim=1)
        return SeedCombine(self.kind, probs.shape[0], self.top_k)(self.gate(x, extra), probs)[0]


def mixture_cost(probe: torch.Tensor, experts: ConvExperts, kind: str = "uniform", gate: GateNet | None = None,
                 generalist: Seed1CNN | None = None, cover: torch.Tensor | None = None, top_k: int = 2,
                 blend: float = 1.0) -> dict:
    """``{"params", "flops_per_example"}`` of the mixture (:class:`MixtureForward`), counted on ``probe``."""
    mods = experts.to_modules()
    return cost_row(MixtureForward(mods, kind, gate, generalist, cover, top_k, blend), probe)


def meta_cnn(num_classes: int, width: int) -> Seed1CNN:
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        return Seed1CNN(num_classes, width=width)


def seed_cnn_widths(num_classes: int, target: dict, probe: torch.Tensor) -> dict[str, int]:
    """The :class:`Seed1CNN` widths matching ``target``'s counted parameters / FLOPs per example (the
    candidates are built on the meta device: the same counts as a real network, without the memory)."""
    shape = (min(2, probe.shape[0]), *probe.shape[1:])
    return dense_widths(target, lambda w: count_params(meta_cnn(num_classes, w)),
                        lambda w: flops_per_example(meta_cnn(num_classes, w), torch.empty(shape, device="meta")),
                        hi=MAX_DENSE_WIDTH)


# ----------------------------------------------------------------------------- gate


def gate_extra(cache: dict, split: str, idx: torch.Tensor | None = None, flip: torch.Tensor | None = None) -> torch.Tensor:
    """The expert-aware gate's extra input: experts' log-probabilities and pooled features (N, E*K + E*C)."""

    def pick(name):
        t = cache[f"{split}.{name}"]
        if name == "probs":
            t = t[:, idx] if idx is not None else t
            return t.float().clamp_min(1e-6).log().permute(1, 0, 2).flatten(1)
        return (t[idx] if idx is not None else t).float()

    e = torch.cat([pick("probs"), pick("feats")], dim=1)
    if flip is not None and f"{split}_flip.probs" in cache:
        split_f = split + "_flip"
        ef = gate_extra(cache, split_f, idx)
        e = torch.where(flip.to(e.device).view(-1, 1), ef, e)
    return e


def cache_on(cache: dict, device: torch.device) -> dict:
    """The cached expert outputs where the gate trains: each tensor that fits moves to a GPU once
    (:func:`moelab.data.feed.fits_on_device`), so batches are gathered there, not on the host per step."""
    return {k: v.to(device) if torch.is_tensor(v) and fits_on_device(v, device) else v for k, v in cache.items()}


def gate_probs(cache: dict, split: str, idx: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    p = cache[f"{split}.probs"][:, idx].float()
    if flip is not None and f"{split}_flip.probs" in cache:  # else: the gate alone sees the mirrored image
        pf = cache[f"{split}_flip.probs"][:, idx].float()
        p = torch.where(flip.to(p.device).view(1, -1, 1), pf, p)
    return p


def train_gate(cfg: Config, run: Run, data: Data, cache: dict,
               generalist: Seed1CNN | None = None) -> tuple[GateNet, dict]:
    gc, kind = cfg.gate, cfg.gate.kind
    E, K = len(data.pairs), len(data.classes)
    extra_dim = E * K + cache["train.feats"].shape[1] if kind == "expert-aware" else 0
    torch.manual_seed(run.generator("init", "gate").initial_seed())
    use_trunk = gc.trunk or kind != "expert-aware"
    dev = data.device
    gate = to_memory_format(GateNet(E, num_heads(kind), extra_dim=extra_dim, hidden=gc.hidden,
                                     extra_dropout=gc.extra_dropout, trunk=use_trunk), cfg, dev)
    if gc.init == "generalist" and gate.trunk is not None:  # same architecture as the CNN's trunk
        gate.trunk.load_state_dict(generalist.trunk.state_dict())
    lr = gc.lr if gc.lr > 0 else SEED_LR[kind]
    opt = torch.optim.Adam(gate.parameters(), lr=lr, weight_decay=gc.weight_decay)
    steps = math.ceil(len(data.train) / gc.batch_size)
    sched = onecycle_or_plateau(gc.schedule, opt, lr, gc.epochs, steps, patience=4)
    trainer = Trainer(run, "gate", gate, opt, sched, epochs=gc.epochs)
    cover, mixer = data.cover, SeedCombine(kind, E, gc.top_k)
    shift = cfg.augment.max_shift if gc.shift else 0
    cache, labels = cache_on(cache, dev), cache_on({"y": data.train.y}, dev)["y"]

    def forward(x, split, idx, flip):  # this batch's cached expert outputs, gathered where they live
        extra = to_device(gate_extra(cache, split, idx, flip), dev) if extra_dim else None
        with autocast_for(cfg, dev):
            g = gate(x, extra)
        return mixer([t.float() for t in g], to_device(gate_probs(cache, split, idx, flip), dev))  # (logits, weights)

    def loss(out, y):
        logits, weights = out
        ce = F.cross_entropy(logits, y, label_smoothing=gc.label_smoothing) + conv_l2_penalty(gate, gc.l2)
        return ce, (gc.aux_weight * oracle_routing_loss(weights, y, cover) if gc.aux_weight > 0 else None)

    def batches(epoch: int):  # (indices, flips): the gate trains on the cached expert outputs of these images
        gen = run.generator("gate", epoch)
        for b in index_batches(len(data.train), gc.batch_size, gen, cfg.augment.hflip):
            yield (*b, gen), to_device(labels[b[0].to(labels.device)], dev), 1.0

    def batch_forward(b):
        idx, flip, gen = b
        return forward(data.train.batch(idx, flip, shift, gen) if use_trunk else None, "train", idx, flip)

    def evaluate(epoch: int) -> dict:
        logits, _ = gate_predict(cfg, gate, kind, data.val, cache, "val", extra_dim)
        acc = accuracy(logits, data.val.y)
        if gc.schedule == "plateau":
            sched.step(acc)
        return {"val_acc": acc}

    last = trainer.fit(batches, batch_forward, loss, evaluate=evaluate, progress=lambda epoch: len(data.train))
    gate.eval()
    return gate, {"last": last, "lr": lr, "train_img_per_s": trainer.img_per_s,
                  "train_s": run.phase_times["gate"]["train_s"]}


class Indexed:
    """``images`` as :class:`moelab.train.trainer.Batches` of ``(images or None, their indices)``: the gate
    reads the cached expert outputs by index, and the images themselves only if it has a trunk."""

    def __init__(self, images: Images, with_images: bool):
        self.images, self.with_images = images, with_images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor):
        return (self.images.batch(idx) if self.with_images else None), idx


def gate_predict(cfg, gate, kind, images: Images, cache, split, extra_dim, experts_fn=None):
    """Mixture logits and effective gate weights on ``images`` (cached expert outputs of ``split``,
    or ``experts_fn(x) -> probs`` when the experts were fine-tuned)."""
    gate.eval()
    dev = images.device
    mixer = SeedCombine(kind, gate.num_experts, cfg.gate.top_k)
    cache = cache_on({k: v for k, v in cache.items() if k.startswith(f"{split}.")}, dev)

    def fn(batch):
        x, idx = batch
        extra = to_device(gate_extra(cache, split, idx), dev) if extra_dim else None
        with autocast_for(cfg, dev):  # the gate and the experts; the combine in fp32
            g = [t.float() for t in gate(x, extra)]
            probs = experts_fn(x) if experts_fn is not None else to_device(cache[f"{split}.probs"][:, idx], dev)
        return mixer(g, probs.float())

    logits, weights = predict(fn, Indexed(images, gate.trunk is not None), batch=cfg.eval.batch_size, device=dev)
    return logits, weights


def hierarchical_mixture(cfg: Config, run: Run, data: Data, gen_probs: dict, cache: dict):
    """The two-level mixture (``gate.kind = "hierarchical"``, :func:`combine_hierarchical`): the
    generalist's class probabilities weigh the pair experts, each expert decides within its pair.
    ``gate.blend`` < 0: the blend with the generalist alone that minimises the validation
    cross-entropy (grid 0, 0.05, ..., 1). Returns test logits, expert weights and info."""
    probs = {split: cache[f"{split}.probs"].float() for split in ("val", "test")}
    blend = cfg.gate.blend
    if blend < 0:
        grid = [i / 20 for i in range(21)]
        nll = [F.cross_entropy(combine_hierarchical(gen_probs["val"], probs["val"], data.cover, b), data.val.y).item()
               for b in grid]
        blend = grid[int(np.argmin(nll))]
        run.log(f"[hierarchical] blend {blend:.2f} (validation cross-entropy {min(nll):.4f}; generalist alone "
                f"{nll[0]:.4f}, mixture alone {nll[-1]:.4f})")
    val_logits = combine_hierarchical(gen_probs["val"], probs["val"], data.cover, blend)
    val_acc = accuracy(val_logits, data.val.y)
    logits = combine_hierarchical(gen_probs["test"], probs["test"], data.cover, blend)
    return logits, hierarchical_weights(gen_probs["test"], data.cover), {"blend": blend, "val_acc": val_acc}


def finetune(cfg: Config, run: Run, data: Data, experts: ConvExperts, gate: GateNet, cache: dict) -> dict:
    """Experts and gate trained jointly (full augmentation; the experts run in every step)."""
    gc, kind = cfg.gate, cfg.gate.kind
    if kind == "expert-aware":
        raise ConfigError("gate.finetune_epochs: joint fine-tuning is not implemented for the expert-aware gate")
    dev = data.device
    gate, experts = gate.to(dev), experts.to(dev)
    params = list(gate.parameters()) + list(experts.parameters())
    opt = torch.optim.Adam(params, lr=gc.finetune_lr)
    steps = math.ceil(len(data.train) / gc.batch_size)
    sched = onecycle_or_plateau("onecycle", opt, gc.finetune_lr, gc.finetune_epochs, steps)
    both = nn.ModuleDict({"gate": gate, "experts": experts})
    trainer = Trainer(run, "finetune", both, opt, sched, epochs=gc.finetune_epochs, device=dev)
    mixer = SeedCombine(kind, len(data.pairs), gc.top_k)

    def forward(x):
        with autocast_for(cfg, dev):
            g = [t.float() for t in gate(x)]
            probs = torch.softmax(experts(x).float(), dim=-1)
        return mixer(g, probs)[0]  # the combine in fp32, outside autocast

    def loss(logits, y):
        return F.cross_entropy(logits, y) + conv_l2_penalty(both, gc.l2), None

    def batches(epoch: int):
        return image_batches(data.train, gc.batch_size, run.generator("finetune", epoch), True, cfg.augment.max_shift)

    def experts_fn(x):
        return torch.softmax(experts(x).float(), dim=-1)

    def evaluate(epoch: int) -> dict:
        experts.eval()
        logits, _ = gate_predict(cfg, gate, kind, data.val, cache, "val", 0, experts_fn)
        return {"val_acc": accuracy(logits, data.val.y)}

    last = trainer.fit(batches, forward, loss, evaluate=evaluate, progress=lambda epoch: len(data.train))
    both.eval()
    return {"last": last, "experts_fn": experts_fn, "train_img_per_s": trainer.img_per_s}
