"""Seed experiment 1: ten CNN experts pretrained on pairs of similar CIFAR-10 classes, frozen, and a
CNN gate trained on top (four gating variants of the seed + ``expert-aware``), with baselines.

Pipeline (one ``moelab run cifar10-experts``):

0. Warm start (``cifar10-experts-warm``: ``experts.init`` / ``gate.init = "generalist"``): one CNN of
   the expert architecture is trained on all classes first (phase ``generalist``, cached by content);
   each expert then starts as a copy of it and is trained on its pair only (a specialist), and the
   gate's trunk starts from its trunk. ``baseline.epochs = 0`` gives the single-CNN baseline the
   mixture's whole measured training budget (``timings.mixture_budget_s``: generalist + experts +
   expert outputs + gate, cached phases at the time they took), converted to epochs at the
   generalist's measured speed: the comparison at equal wall-clock.
1. Data: CIFAR-10, ``data.val_size`` validation images carved from train (stratified).
2. Experts (phase ``expert<i>``): each a :class:`Seed1CNN` trained on its pair's images only (10-way
   softmax head, as in the seed), random shift + horizontal flip, Adam, learning rate halved on a
   validation plateau, early stopping, best checkpoint by validation accuracy. The ten trained experts
   are stacked into one :class:`ConvExperts` and cached by content (expert config + data checksum +
   seed) as ``<cache>/experts/<key>.safetensors``; a later run with the same key reuses them.
3. Expert outputs (softmax probabilities + pooled trunk features) for the plain and the flipped
   training images, the validation and the test images are computed once (bf16, channels_last) and
   cached too (``<cache>/expert-outputs/<key>.safetensors``): the gate phase never runs an expert.
4. Gate (phase ``gate``): the experts are frozen, so a gate step is one gate forward/backward. The
   gate sees a randomly flipped (and, with ``gate.shift``, shifted) image; the experts' outputs are
   the cached ones of the same image flipped the same way but not shifted (a shift moves an object
   by at most 3 pixels; it regularises the gate without running the experts).
   ``gate.kind = "hierarchical"`` (``cifar10-hierarchical``) trains no gate: the generalist's class
   probabilities weigh the experts by their pairs' mass and each expert decides within its pair
   (:func:`moelab.moe.hierarchical.combine_hierarchical`), so only the val/test outputs are computed.
5. Optional joint fine-tuning of experts + gate (``gate.finetune_epochs``).
6. Baselines (``baselines = true``): the uniform average of the experts (always reported: it is
   free), the gate trunk alone as a 10-way classifier (gate recipe), one CNN of the expert
   architecture trained on all ten classes (``baseline.*``).

``summary.json`` ``models``: every trained model's test accuracy, each expert's accuracy on its own
pair's test images, and the oracle-pair upper bound (each image routed to the experts of its class).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import Check, Choice, Float, Int, Switch, refuse
from moelab.cost import cost_row, count_params, flops_per_example
from moelab.data.location import cache_dir
from moelab.data.transforms import random_translate, train_val_split
from moelab.errors import ConfigError
from moelab.experiments import family
from moelab.experiments.baselines import dense_widths, equal_cost_rows
from moelab.models.cifar_cnn import Seed1CNN, conv_l2_penalty
from moelab.models.conv_experts import IMPLS, ConvExperts
from moelab.models.gating import GATE_KINDS, HIERARCHICAL, SEED_LR, GateNet, SeedCombine, num_heads, seed_moe
from moelab.moe.hierarchical import combine_hierarchical, hierarchical_weights, pair_cover
from moelab.moe.losses import oracle_routing_loss
from moelab.parallel import ddp
from moelab.precision import cpu_bf16_isa, resolve_bf16
from moelab.train.checkpoint import load_checkpoint, save_checkpoint
from moelab.train.evaluation import accuracy, routing_stats, save_eval
from moelab.train.loop import train_phase
from moelab.train.optim import onecycle_or_plateau
from moelab.train.run import Run

CACHE_VERSION = 1
# The seed's pairs: experts 0-4 as coded, experts 5-9 as intended (the seed's code gave them all class
# 5 as second class and never loaded them).
SEED_PAIRS = [[0, 8], [1, 9], [2, 6], [3, 5], [4, 7], [0, 9], [1, 8], [2, 7], [3, 6], [4, 5]]
INITS = ("scratch", "generalist")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

DEFAULTS = {
    "data": {
        "name": "cifar10",
        "val_size": 5000,  # validation images carved (stratified) from the training set
        "train_per_class": 0,  # >0: keep only this many training images per class (test slices)
        "test_per_class": 0,  # >0: likewise for the test set
        "pairs": SEED_PAIRS,  # one expert per pair of class indices
    },
    "augment": {"max_shift": 3, "hflip": True},  # random shift up to 3 px (10% of 32) + flip, as the seed
    "compute": {"bf16": Switch("auto"), "channels_last": True, "threads": 0, "eval_batch": 500, "impl": "auto"},
    "experts": {
        "epochs": 12,
        "batch": 128,
        "lr": 1e-3,
        "l2": 1e-4,  # Keras kernel_regularizer on the conv kernels
        "plateau_patience": 2,
        "plateau_factor": 0.5,
        "min_lr": 1e-6,
        "early_stop_patience": 10,
        "cache": True,
        "cache_flipped": True,  # also cache the experts' outputs for the mirrored training images
        "init": "scratch",  # scratch | generalist: start each expert from the generalist CNN, then train on its pair
    },
    # One CNN of the expert architecture trained on all classes first (only when experts.init or gate.init
    # is "generalist"): the specialists and the gate trunk start from it. Cached by content like the experts.
    "generalist": {"epochs": 20, "batch": 128, "lr": 2e-3, "schedule": "onecycle"},
    "gate": {
        "kind": "standard",  # standard | sparse | two-gates | two-gates-max | expert-aware | hierarchical | none
        "epochs": 10,
        "batch": 128,
        "lr": 0.0,  # 0: the seed's learning rate for this kind (standard 1e-3, sparse 1e-4, two gates 5e-4)
        "schedule": "onecycle",  # onecycle | plateau (the seed's: halve after 4 epochs without gain)
        "shift": True,  # gate-side random shift (the experts' cached outputs are of the unshifted image)
        "l2": 1e-4,
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "aux_weight": 0.0,  # weight of the oracle-pair routing loss (softmax of gate values vs. true pair)
        "top_k": 2,  # sparse gating
        "trunk": True,  # expert-aware: false = no conv trunk, the gate reads only the experts' outputs
        "hidden": 256,  # expert-aware: width of the layer reading the experts' outputs/features
        "extra_dropout": 0.3,
        "finetune_epochs": 0,  # >0: then fine-tune experts + gate jointly
        "finetune_lr": 1e-4,
        "init": "scratch",  # scratch | generalist: the gate trunk starts from the generalist CNN's trunk
        # hierarchical: logits = lerp(log generalist, log mixture, blend); < 0: fitted on the validation images
        "blend": -1.0,
    },
    "baselines": False,
    # baseline.epochs = 0: as many single-CNN epochs as fit the mixture's whole training budget (generalist +
    # experts + expert outputs + gate, measured in this run), i.e. the single CNN at equal wall-clock
    # equal_cost: also train dense-equal-params / dense-equal-flops (one Seed1CNN widened to the mixture's counted
    # parameters / inference FLOPs per example, this recipe); equal_cost_epochs: their epochs (0: the single CNN's)
    "baseline": {"epochs": 30, "batch": 128, "lr": 2e-3, "schedule": "onecycle", "trunk_epochs": 0,
                 "equal_cost": True, "equal_cost_epochs": 0},
}


# ----------------------------------------------------------------------------- helpers


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


class Images:
    """uint8 NHWC images on the CPU -> normalised float NCHW (channels_last) batches, augmented on the
    whole batch at once (no per-image Python work)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, channels_last: bool):
        self.x = torch.from_numpy(np.ascontiguousarray(x))  # (N, 32, 32, 3) uint8
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.channels_last = channels_last
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None, shift: int = 0,
              gen: torch.Generator | None = None) -> torch.Tensor:
        x = self.x[idx].permute(0, 3, 1, 2).float().div_(255.0)  # NCHW view of NHWC = channels_last
        x = (x - self.mean) / self.std
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if shift > 0:
            x = random_translate(x, shift, gen, fill="edge")
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x


def _load() -> float:
    """The 1-minute load average (the CPU is shared: timings are only comparable at similar load)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return float("nan")


def _bf16(cfg: dict) -> bool:
    """``compute.bf16`` resolved: ``"auto"`` = bf16 only where this CPU computes it natively."""
    return resolve_bf16(cfg["compute"]["bf16"], key="compute.bf16")


def _autocast(cfg: dict):
    if _bf16(cfg):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_memory_format(model: nn.Module, cfg: dict) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if cfg["compute"]["channels_last"] else model


def limit_per_class(y: np.ndarray, classes: list[int], per_class: int) -> np.ndarray:
    keep = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        keep.append(idx[:per_class] if per_class > 0 else idx)
    return np.sort(np.concatenate(keep))


def _valid_pairs(pairs) -> bool:
    return bool(pairs) and all(isinstance(p, list) and len(p) == 2 and all(isinstance(c, int) and 0 <= c < 10 for c in p)
                               and p[0] != p[1] for p in pairs)


SCHEDULES = ("onecycle", "plateau")
# What each key accepts (moelab.config rules); sizes that must fit the data are checked in Data.
RULES: dict = {
    "data.name": Choice("cifar10"), "data.val_size": Int(ge=1), "data.train_per_class": Int(ge=0),
    "data.test_per_class": Int(ge=0),
    "data.pairs": Check(_valid_pairs, "a non-empty list of [a, b] pairs of distinct CIFAR-10 class indices 0..9"),
    "augment.max_shift": Int(ge=0, le=16),
    "compute.threads": Int(ge=0), "compute.eval_batch": Int(ge=1), "compute.impl": Choice(*IMPLS),
    "experts.epochs": Int(ge=1), "experts.batch": Int(ge=1), "experts.lr": Float(gt=0), "experts.l2": Float(ge=0),
    "experts.plateau_patience": Int(ge=1), "experts.plateau_factor": Float(gt=0, lt=1), "experts.min_lr": Float(ge=0),
    "experts.early_stop_patience": Int(ge=0), "experts.init": Choice(*INITS),
    "generalist.epochs": Int(ge=1), "generalist.batch": Int(ge=1), "generalist.lr": Float(gt=0),
    "generalist.schedule": Choice(*SCHEDULES),
    "gate.kind": Choice(*GATE_KINDS, HIERARCHICAL, "none"), "gate.epochs": Int(ge=1), "gate.batch": Int(ge=1),
    "gate.lr": Float(ge=0), "gate.schedule": Choice(*SCHEDULES), "gate.l2": Float(ge=0),
    "gate.weight_decay": Float(ge=0), "gate.label_smoothing": Float(ge=0, lt=1), "gate.aux_weight": Float(ge=0),
    "gate.top_k": Int(ge=1), "gate.hidden": Int(ge=1), "gate.extra_dropout": Float(ge=0, lt=1),
    "gate.finetune_epochs": Int(ge=0), "gate.finetune_lr": Float(gt=0), "gate.init": Choice(*INITS),
    "gate.blend": Float(le=1),  # < 0: fitted on the validation images
    "baseline.epochs": Int(ge=0), "baseline.batch": Int(ge=1), "baseline.lr": Float(gt=0),
    "baseline.schedule": Choice(*SCHEDULES), "baseline.trunk_epochs": Int(ge=0, also=(-1,)),
    "baseline.equal_cost_epochs": Int(ge=0),
}
RESUMABLE = ("compute.threads",)


def check_config(cfg: dict) -> None:
    """Cross-key rules of the cifar_experts family."""
    g = cfg["gate"]
    if g["kind"] == HIERARCHICAL and g["finetune_epochs"] > 0:
        raise refuse("gate.finetune_epochs", g["finetune_epochs"], "0 with gate.kind = \"hierarchical\" "
                     "(no gate network to fine-tune)")
    if g["kind"] == "expert-aware" and g["finetune_epochs"] > 0:
        raise refuse("gate.finetune_epochs", g["finetune_epochs"], "0 with gate.kind = \"expert-aware\" "
                     "(joint fine-tuning is not implemented for it)")
    if g["kind"] == "sparse" and g["top_k"] > len(cfg["data"]["pairs"]):
        raise refuse("gate.top_k", g["top_k"], f"at most the {len(cfg['data']['pairs'])} experts (data.pairs)")


def check_sizes(cfg: dict, train_per_class: dict[int, int], test_per_class: dict[int, int]) -> None:
    """The sizes that must fit the data set (images per used class), before anything trains."""
    d = cfg["data"]
    for key, counts, split in (("train_per_class", train_per_class, "training"), ("test_per_class", test_per_class, "test")):
        if d[key] > min(counts.values()):
            raise refuse(f"data.{key}", d[key], f"at most {min(counts.values())} (the fewest {split} images of "
                         f"a used class; 0: all)")
    n_train = sum(min(n, d["train_per_class"] or n) for n in train_per_class.values())
    if d["val_size"] >= n_train:
        raise refuse("data.val_size", d["val_size"], f"fewer than the {n_train} training images")
    n_fit = n_train - d["val_size"]
    for key in ("experts.batch", "generalist.batch", "gate.batch", "baseline.batch"):
        sec, name = key.split(".")
        if cfg[sec][name] > n_fit:
            raise refuse(key, cfg[sec][name], f"at most the {n_fit} training images left after data.val_size")


# ----------------------------------------------------------------------------- data


class Data:
    def __init__(self, cfg: dict, run: Run):
        from moelab.data import load_dataset

        ds = load_dataset(cfg["data"]["name"], data_dir=run.data_dir)
        self.classes = list(ds.classes)
        self.checksum = ds.checksum
        self.pairs = [list(p) for p in cfg["data"]["pairs"]]
        used = sorted({c for p in self.pairs for c in p})
        self.used_classes = used
        check_sizes(cfg, {c: int((ds.train_y == c).sum()) for c in used}, {c: int((ds.test_y == c).sum()) for c in used})
        tr_keep = limit_per_class(ds.train_y, used, cfg["data"]["train_per_class"])
        te_keep = limit_per_class(ds.test_y, used, cfg["data"]["test_per_class"])
        train_x, train_y = ds.train_x[tr_keep], ds.train_y[tr_keep]
        tr, va = train_val_split(train_y, cfg["data"]["val_size"], seed=run.seed, stratified=True)
        cl = cfg["compute"]["channels_last"]
        self.train = Images(train_x[tr], train_y[tr], cl)
        self.val = Images(train_x[va], train_y[va], cl)
        self.test = Images(ds.test_x[te_keep], ds.test_y[te_keep], cl)
        self.cover = pair_cover(self.pairs, len(self.classes))  # (K, E): class k is in expert e's pair
        self.key = {"checksum": self.checksum, "data": cfg["data"], "train": len(self.train), "val": len(self.val)}


# ----------------------------------------------------------------------------- generic training


def _epoch_batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch] for i in range(0, n, batch)]


def _train_epoch(n: int, batch: int, gen: torch.Generator, hflip: bool, loss_fn, opt, sched, state: dict,
                 progress) -> dict:
    """One epoch of Adam steps over shuffled batches: ``loss_fn(idx, flip) -> loss`` per batch (``flip``
    a random half of the batch when ``hflip``, else None); ``sched`` (or None) steps per batch.
    Adds the images and seconds to ``state``; reports to ``progress`` (``Run.progress``); returns the
    epoch's metrics."""
    t0, tot, seen = time.perf_counter(), 0.0, 0
    with progress:
        for idx in _epoch_batches(n, batch, gen):
            flip = torch.rand(len(idx), generator=gen) < 0.5 if hflip else None
            loss = loss_fn(idx, flip)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            tot += loss.item() * len(idx)
            seen += len(idx)
            progress.update(len(idx))
    dt = time.perf_counter() - t0
    state["images"] += seen
    state["seconds"] += dt
    return {"loss": tot / max(seen, 1), "lr": opt.param_groups[0]["lr"], "img_per_s": seen / dt}


@torch.no_grad()
def _predict(model_fn, images: Images, cfg: dict, flip: bool = False) -> list[torch.Tensor]:
    """Run ``model_fn(x) -> tensor or tuple`` over ``images`` in eval batches; concatenated float outputs."""
    bs = cfg["compute"]["eval_batch"]
    outs: list[list[torch.Tensor]] = []
    for i in range(0, len(images), bs):
        idx = torch.arange(i, min(i + bs, len(images)))
        x = images.batch(idx, flip=torch.ones(len(idx), dtype=torch.bool) if flip else None)
        with _autocast(cfg):
            o = model_fn(x)
        o = o if isinstance(o, tuple) else (o,)
        outs.append([t.float() for t in o])
    return [torch.cat(parts, dim=-2 if parts[0].dim() == 3 else 0) for parts in zip(*outs)]


def train_classifier(run: Run, phase: str, model: nn.Module, images: Images, val: Images, cfg: dict, *,
                     epochs: int, batch: int, lr: float, schedule: str, l2: float, shift: int,
                     plateau_patience: int = 2, plateau_factor: float = 0.5, min_lr: float = 1e-6,
                     early_stop: int = 0, keep_best: bool = False, keep_start: bool = False,
                     val_classes: list[int] | None = None) -> dict:
    """A 10-way CNN classifier (an expert on its pair, or a baseline): cross-entropy + conv L2, random
    shift + flip, Adam; one-cycle or plateau schedule; optional early stopping and best checkpoint
    by validation accuracy (kept in ``ckpt/<phase>-best.safetensors``). Returns speed + best stats.

    ``keep_start`` (a warm-started model): the starting weights are the first candidate (epoch 0), so
    fine-tuning that never beats them on ``val`` leaves the model as it came. ``val_classes``: the
    validation accuracy takes the argmax over these classes only (a warm-started specialist is
    judged on telling its pair apart: a 10-way generalist spreads mass over classes the pair's images
    never show, so its 10-way accuracy on them says little)."""
    model = _to_memory_format(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = math.ceil(len(images) / batch)
    sched = onecycle_or_plateau(schedule, opt, lr, epochs, steps, plateau_patience, plateau_factor, min_lr)
    best_path = run.dir / "ckpt" / f"{phase}-best.safetensors"
    state = {"best": -1.0, "best_epoch": -1, "images": 0, "seconds": 0.0}
    if run.resumed and best_path.is_file():
        _, meta = load_checkpoint(best_path)
        state["best"], state["best_epoch"] = meta["best"], meta["best_epoch"]

    def val_acc() -> float:
        model.eval()
        logits = _predict(model, val, cfg)[0]
        if val_classes is not None:
            keep = torch.tensor(val_classes)
            return (keep[logits[:, keep].argmax(1)] == val.y).float().mean().item()
        return accuracy(logits, val.y)

    if keep_best and keep_start and not run.checkpoint_path(phase).is_file():  # the phase has not started
        acc0 = val_acc()
        state["best"], state["best_epoch"] = acc0, -1
        save_checkpoint(best_path, model.state_dict(), {"best": acc0, "best_epoch": -1})
        run.metric(phase=phase, epoch=0, val_acc=acc0)
        run.log(f"phase={phase}  epoch=0  val_acc={acc0:.4g}  (the starting point)")

    def train_epoch(epoch: int) -> dict:
        if early_stop and state["best"] >= 0 and epoch - state["best_epoch"] > early_stop:
            return {"stopped": 1}
        model.train()
        gen = run.generator(phase, epoch)

        def loss_fn(idx, flip):
            x, y = images.batch(idx, flip, shift, gen), images.y[idx]
            with _autocast(cfg):
                out = model(x)
            return F.cross_entropy(out.float(), y) + conv_l2_penalty(model, l2)

        return _train_epoch(len(images), batch, gen, cfg["augment"]["hflip"], loss_fn, opt,
                            sched if schedule == "onecycle" else None, state,
                            run.progress(f"[{phase}] epoch {epoch + 1}", len(images)))

    def evaluate(epoch: int) -> dict:
        acc = val_acc()
        if schedule == "plateau":
            sched.step(acc)
        if keep_best and acc > state["best"]:
            state["best"], state["best_epoch"] = acc, epoch
            save_checkpoint(best_path, model.state_dict(), {"best": acc, "best_epoch": epoch})
        return {"val_acc": acc}

    last = train_phase(run, phase, model, opt, epochs, train_epoch, evaluate, sched=sched)
    if keep_best and best_path.is_file():
        tensors, meta = load_checkpoint(best_path)
        model.load_state_dict(tensors)
        state["best"], state["best_epoch"] = meta["best"], meta["best_epoch"]
    model.eval()
    speed = state["images"] / state["seconds"] if state["seconds"] else float("nan")
    return {"last": last, "best_val": state["best"], "best_epoch": state["best_epoch"] + 1, "train_img_per_s": speed,
            "train_s": state["seconds"]}


# ----------------------------------------------------------------------------- experts


def generalist_key(cfg: dict, data: Data, seed: int) -> str:
    return _hash({"v": CACHE_VERSION, "generalist": cfg["generalist"], "l2": cfg["experts"]["l2"],
                  "augment": cfg["augment"], "bf16": _bf16(cfg), "data": data.key, "seed": seed})


def expert_key(cfg: dict, data: Data, seed: int) -> str:
    ec = {k: v for k, v in cfg["experts"].items() if k not in ("cache", "cache_flipped")}
    if ec.get("init", "scratch") == "scratch":
        ec.pop("init", None)  # keys of experts trained before the option existed stay valid
    else:
        ec["generalist"] = generalist_key(cfg, data, seed)
        ec["keep_start"] = "pair"  # the generalist is a candidate for the best checkpoint, judged within the pair
    return _hash({"v": CACHE_VERSION, "experts": ec, "augment": cfg["augment"], "bf16": _bf16(cfg),
                  "data": data.key, "seed": seed})


def needs_generalist(cfg: dict) -> bool:
    return "generalist" in (cfg["experts"]["init"], cfg["gate"]["init"]) or cfg["gate"]["kind"] == HIERARCHICAL


def train_generalist(cfg: dict, run: Run, data: Data) -> tuple[Seed1CNN, dict]:
    """One expert-architecture CNN on all classes (phase ``generalist``), cached by content."""
    key = generalist_key(cfg, data, run.seed)
    path = cache_dir() / "generalist" / f"{key}.safetensors"
    model = Seed1CNN(len(data.classes))
    if cfg["experts"]["cache"] and path.is_file():
        tensors, meta = load_checkpoint(path)
        model.load_state_dict(tensors)
        run.log(f"[generalist] loaded from cache {path} (trained in {meta.get('train_s', 0):.0f} s)")
        return model.eval(), {"cached": True, "key": key, **meta}
    gc = cfg["generalist"]
    torch.manual_seed(run.generator("init", "generalist").initial_seed())
    t0 = time.perf_counter()
    info = train_classifier(run, "generalist", model, _full_classes(data), data.val, cfg, epochs=gc["epochs"],
                            batch=gc["batch"], lr=gc["lr"], schedule=gc["schedule"], l2=cfg["experts"]["l2"],
                            shift=cfg["augment"]["max_shift"], keep_best=gc["schedule"] == "plateau")
    model = model.to(memory_format=torch.contiguous_format)
    meta = {"train_s": time.perf_counter() - t0, "train_img_per_s": info["train_img_per_s"]}
    if cfg["experts"]["cache"]:
        save_checkpoint(path, model.state_dict(), meta)
        run.log(f"[generalist] cached as {path}")
    return model.eval(), {"cached": False, "key": key, **meta}


def pretrain_experts(cfg: dict, run: Run, data: Data, generalist: Seed1CNN | None = None) -> tuple[ConvExperts, dict]:
    """Train (or load from the cache) one expert per class pair -> (stacked ConvExperts, info).

    ``experts.init = "generalist"``: each expert starts as a copy of ``generalist`` (a specialist)."""
    key = expert_key(cfg, data, run.seed)
    path = cache_dir() / "experts" / f"{key}.safetensors"
    E = len(data.pairs)
    experts = ConvExperts(E, len(data.classes), impl=cfg["compute"]["impl"])
    if cfg["experts"]["cache"] and path.is_file():
        tensors, meta = load_checkpoint(path)
        experts.load_state_dict(tensors)
        run.log(f"[experts] loaded from cache {path} (trained in {meta.get('train_s', 0):.0f} s)")
        return experts.eval(), {"cached": True, "key": key, "path": str(path), **meta}
    ec = cfg["experts"]
    infos, t0 = [], time.perf_counter()
    for i, (a, b) in enumerate(data.pairs):
        tr = _subset(data.train, [a, b])
        va = _subset(data.val, [a, b])
        torch.manual_seed(run.generator("init", f"expert{i}").initial_seed())
        m = Seed1CNN(len(data.classes))
        if ec["init"] == "generalist":
            m.load_state_dict(generalist.state_dict())
        run.log(f"[expert{i}] pair ({data.classes[a]}, {data.classes[b]}): {len(tr)} train, {len(va)} val images")
        t_e = time.perf_counter()
        info = train_classifier(run, f"expert{i}", m, tr, va, cfg, epochs=ec["epochs"], batch=ec["batch"],
                                lr=ec["lr"], schedule="plateau", l2=ec["l2"], shift=cfg["augment"]["max_shift"],
                                plateau_patience=ec["plateau_patience"], plateau_factor=ec["plateau_factor"],
                                min_lr=ec["min_lr"], early_stop=ec["early_stop_patience"], keep_best=True,
                                keep_start=ec["init"] == "generalist",
                                val_classes=[a, b] if ec["init"] == "generalist" else None)
        experts.load_expert_state_dict(i, m.to(memory_format=torch.contiguous_format).state_dict())
        infos.append({**info, "wall_s": time.perf_counter() - t_e})
    train_s = time.perf_counter() - t0
    imgs = sum(i["train_img_per_s"] * i["train_s"] for i in infos)
    meta = {"train_s": train_s, "train_img_per_s": imgs / max(sum(i["train_s"] for i in infos), 1e-9),
            "best_val": [i["best_val"] for i in infos], "best_epoch": [i["best_epoch"] for i in infos],
            "expert_train_s": [round(i["wall_s"], 1) for i in infos]}
    if ec["cache"]:
        save_checkpoint(path, experts.state_dict(), meta)
        run.log(f"[experts] cached as {path}")
    return experts.eval(), {"cached": False, "key": key, "path": str(path), **meta}


def _subset(images: Images, classes: list[int]) -> Images:
    keep = torch.isin(images.y, torch.tensor(classes))
    out = Images.__new__(Images)
    out.x, out.y, out.channels_last = images.x[keep], images.y[keep], images.channels_last
    out.mean, out.std = images.mean, images.std
    return out


def _expert_fn(modules: nn.ModuleList):
    """x -> (probs (E, N, K), pooled features (N, E*C)). The experts run one after the other: the
    ``separate`` form of ConvExperts, the fastest measured in bf16 on this CPU (ConvExperts.AUTO_TABLE)."""

    def fn(x):
        probs, feats = [], []
        for m in modules:
            h = m.trunk(x)
            feats.append(h.float().mean((2, 3)))
            probs.append(torch.softmax(m.head(h.flatten(1)).float(), dim=1))
        return torch.stack(probs), torch.cat(feats, dim=1)

    return fn


def expert_outputs(cfg: dict, run: Run, data: Data, experts: ConvExperts, key: str,
                   eval_only: bool = False) -> tuple[dict, dict]:
    """Cached expert probabilities/features for train (plain + flipped), val and test; with
    ``eval_only`` (no gate is trained on them) val and test only, unless the full set is cached."""
    flipped = cfg["experts"]["cache_flipped"] and not eval_only
    root = cache_dir() / "expert-outputs"
    names = [f"{key}-eval", f"{key}-flip", key] if eval_only else [f"{key}-flip" if flipped else key]
    paths = [root / f"{n}.safetensors" for n in names]  # eval_only: any cached set holds val and test
    hit = next((p for p in paths if p.is_file()), None) if cfg["experts"]["cache"] else None
    if hit is not None:
        tensors, meta = load_checkpoint(hit)
        if eval_only and hit != paths[0] and meta.get("images"):  # a full set: count only the val + test share
            n = len(data.val) + len(data.test)
            meta = {**meta, "infer_s": meta["infer_s"] * n / meta["images"], "images": n}
        run.log(f"[experts] outputs loaded from cache {hit}")
        return tensors, {"cached": True, **meta}
    path = paths[0]
    modules = experts.to_modules().eval()
    for m in modules:
        _to_memory_format(m, cfg)
    fn = _expert_fn(modules)
    t0 = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    n = 0
    splits = [("train", data.train, False), ("val", data.val, False), ("test", data.test, False)][eval_only:]
    if flipped:
        splits.insert(1, ("train_flip", data.train, True))
    for name, images, flip in splits:
        probs, feats = _predict(fn, images, cfg, flip=flip)
        out[f"{name}.probs"], out[f"{name}.feats"] = probs.to(torch.bfloat16), feats.to(torch.bfloat16)
        n += len(images)
    dt = time.perf_counter() - t0
    meta = {"infer_s": dt, "infer_img_per_s": n / dt, "images": n}
    run.log(f"[experts] outputs of {n} images in {dt:.1f} s ({n / dt:.0f} images/s for the {experts.num_experts} experts)")
    if cfg["experts"]["cache"]:
        save_checkpoint(path, out, meta)
    return out, {"cached": False, **meta}


def expert_reports(data: Data, cache: dict) -> dict:
    """Each expert on its own pair's test images; uniform average; oracle pair routing."""
    probs = cache["test.probs"].float()  # (E, N, K)
    y = data.test.y
    models = {}
    for i, (a, b) in enumerate(data.pairs):
        m = (y == a) | (y == b)
        acc = accuracy(probs[i][m], y[m])
        models[f"expert{i}-{data.classes[a]}-{data.classes[b]}"] = {"test_accuracy": acc, "scope": "own pair"}
    uni = probs.mean(0)
    models["baseline-uniform"] = {"test_accuracy": accuracy(uni, y)}
    oracle = torch.einsum("ne,enk->nk", data.cover[y], probs)
    models["oracle-pair"] = {"test_accuracy": accuracy(oracle, y),
                             "scope": "upper bound: each image routed to the experts of its true class"}
    return models, uni


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
        return _expert_fn(self.experts)(x)[0]


class MixtureForward(nn.Module):
    """The mixture as it runs at inference on a batch of images -> logits, for counting its cost.

    Every expert runs (as in :func:`expert_outputs`): the gate kinds all weigh the ten outputs, and
    ``sparse`` zeroes all but ``top_k`` gate values only *after* every expert has run, so it is charged
    for all of them. The seed's gate kinds are a :class:`moelab.MoE` (:func:`moelab.models.gating.seed_moe`);
    ``expert-aware``: the gate also reads the experts' log-probabilities and pooled features (combined by
    :class:`~moelab.models.gating.SeedCombine`, the same routers); ``hierarchical``: the generalist instead
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
        probs, feats = _expert_fn(self.experts)(x)
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


def _meta_cnn(num_classes: int, width: int) -> Seed1CNN:
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        return Seed1CNN(num_classes, width=width)


def seed_cnn_widths(num_classes: int, target: dict, probe: torch.Tensor) -> dict[str, int]:
    """The :class:`Seed1CNN` widths matching ``target``'s counted parameters / FLOPs per example (the
    candidates are built on the meta device: the same counts as a real network, without the memory)."""
    shape = (min(2, probe.shape[0]), *probe.shape[1:])
    return dense_widths(target, lambda w: count_params(_meta_cnn(num_classes, w)),
                        lambda w: flops_per_example(_meta_cnn(num_classes, w), torch.empty(shape, device="meta")),
                        hi=MAX_DENSE_WIDTH)


# ----------------------------------------------------------------------------- gate


def _extra(cache: dict, split: str, idx: torch.Tensor | None = None, flip: torch.Tensor | None = None) -> torch.Tensor:
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
        ef = _extra(cache, split_f, idx)
        e = torch.where(flip.view(-1, 1), ef, e)
    return e


def _gate_probs(cache: dict, split: str, idx: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    p = cache[f"{split}.probs"][:, idx].float()
    if flip is not None and f"{split}_flip.probs" in cache:  # else: the gate alone sees the mirrored image
        pf = cache[f"{split}_flip.probs"][:, idx].float()
        p = torch.where(flip.view(1, -1, 1), pf, p)
    return p


def train_gate(cfg: dict, run: Run, data: Data, cache: dict,
               generalist: Seed1CNN | None = None) -> tuple[GateNet, dict]:
    gc, kind = cfg["gate"], cfg["gate"]["kind"]
    E, K = len(data.pairs), len(data.classes)
    extra_dim = E * K + cache["train.feats"].shape[1] if kind == "expert-aware" else 0
    torch.manual_seed(run.generator("init", "gate").initial_seed())
    use_trunk = gc["trunk"] or kind != "expert-aware"
    gate = _to_memory_format(GateNet(E, num_heads(kind), extra_dim=extra_dim, hidden=gc["hidden"],
                                     extra_dropout=gc["extra_dropout"], trunk=use_trunk), cfg)
    if gc["init"] == "generalist" and gate.trunk is not None:  # same architecture as the CNN's trunk
        gate.trunk.load_state_dict(generalist.trunk.state_dict())
    lr = gc["lr"] if gc["lr"] > 0 else SEED_LR[kind]
    opt = torch.optim.Adam(gate.parameters(), lr=lr, weight_decay=gc["weight_decay"])
    steps = math.ceil(len(data.train) / gc["batch"])
    sched = onecycle_or_plateau(gc["schedule"], opt, lr, gc["epochs"], steps, patience=4)
    cover, mixer = data.cover, SeedCombine(kind, E, gc["top_k"])
    shift = cfg["augment"]["max_shift"] if gc["shift"] else 0
    state = {"images": 0, "seconds": 0.0}

    def forward(x, split, idx, flip):
        extra = _extra(cache, split, idx, flip) if extra_dim else None
        with _autocast(cfg):
            g = gate(x, extra)
        return mixer([t.float() for t in g], _gate_probs(cache, split, idx, flip))  # (logits, weights)

    def train_epoch(epoch: int) -> dict:
        gate.train()
        gen = run.generator("gate", epoch)

        def loss_fn(idx, flip):
            x = data.train.batch(idx, flip, shift, gen) if use_trunk else None
            y = data.train.y[idx]
            logits, weights = forward(x, "train", idx, flip)
            loss = F.cross_entropy(logits, y, label_smoothing=gc["label_smoothing"]) + conv_l2_penalty(gate, gc["l2"])
            if gc["aux_weight"] > 0:
                loss = loss + gc["aux_weight"] * oracle_routing_loss(weights, y, cover)
            return loss

        return _train_epoch(len(data.train), gc["batch"], gen, cfg["augment"]["hflip"], loss_fn, opt,
                            sched if gc["schedule"] == "onecycle" else None, state,
                            run.progress(f"[gate] epoch {epoch + 1}", len(data.train)))

    def evaluate(epoch: int) -> dict:
        logits, _ = gate_predict(cfg, gate, kind, data.val, cache, "val", extra_dim)
        acc = accuracy(logits, data.val.y)
        if gc["schedule"] == "plateau":
            sched.step(acc)
        return {"val_acc": acc}

    last = train_phase(run, "gate", gate, opt, gc["epochs"], train_epoch, evaluate, sched=sched)
    gate.eval()
    speed = state["images"] / state["seconds"] if state["seconds"] else float("nan")
    return gate, {"last": last, "lr": lr, "train_img_per_s": speed, "train_s": state["seconds"]}


@torch.no_grad()
def gate_predict(cfg, gate, kind, images: Images, cache, split, extra_dim, experts_fn=None):
    """Mixture logits and effective gate weights on ``images`` (cached expert outputs of ``split``,
    or ``experts_fn(x) -> probs`` when the experts were fine-tuned)."""
    gate.eval()
    bs = cfg["compute"]["eval_batch"]
    mixer = SeedCombine(kind, gate.num_experts, cfg["gate"]["top_k"])
    logits, weights = [], []
    for i in range(0, len(images), bs):
        idx = torch.arange(i, min(i + bs, len(images)))
        x = images.batch(idx) if gate.trunk is not None else None
        extra = _extra(cache, split, idx) if extra_dim else None
        with _autocast(cfg):
            g = [t.float() for t in gate(x, extra)]
            probs = experts_fn(x) if experts_fn is not None else cache[f"{split}.probs"][:, idx].float()
        lg, w = mixer(g, probs.float())
        logits.append(lg)
        weights.append(w)
    return torch.cat(logits), torch.cat(weights)


def hierarchical_mixture(cfg: dict, run: Run, data: Data, gen_probs: dict, cache: dict):
    """The two-level mixture (``gate.kind = "hierarchical"``, :func:`combine_hierarchical`): the
    generalist's class probabilities weigh the pair experts, each expert decides within its pair.
    ``gate.blend`` < 0: the blend with the generalist alone that minimises the validation
    cross-entropy (grid 0, 0.05, ..., 1). Returns test logits, expert weights and info."""
    probs = {split: cache[f"{split}.probs"].float() for split in ("val", "test")}
    blend = cfg["gate"]["blend"]
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


def finetune(cfg: dict, run: Run, data: Data, experts: ConvExperts, gate: GateNet, cache: dict) -> dict:
    """Experts and gate trained jointly (full augmentation; the experts run in every step)."""
    gc, kind = cfg["gate"], cfg["gate"]["kind"]
    if kind == "expert-aware":
        raise ConfigError("gate.finetune_epochs: joint fine-tuning is not implemented for the expert-aware gate")
    params = list(gate.parameters()) + list(experts.parameters())
    opt = torch.optim.Adam(params, lr=gc["finetune_lr"])
    steps = math.ceil(len(data.train) / gc["batch"])
    sched = onecycle_or_plateau("onecycle", opt, gc["finetune_lr"], gc["finetune_epochs"], steps)
    both = nn.ModuleDict({"gate": gate, "experts": experts})
    mixer = SeedCombine(kind, len(data.pairs), gc["top_k"])
    state = {"images": 0, "seconds": 0.0}

    def train_epoch(epoch: int) -> dict:
        both.train()
        gen = run.generator("finetune", epoch)

        def loss_fn(idx, flip):
            x, y = data.train.batch(idx, flip, cfg["augment"]["max_shift"], gen), data.train.y[idx]
            with _autocast(cfg):
                g = [t.float() for t in gate(x)]
                probs = torch.softmax(experts(x).float(), dim=-1)
            return F.cross_entropy(mixer(g, probs)[0], y) + conv_l2_penalty(both, gc["l2"])

        return _train_epoch(len(data.train), gc["batch"], gen, True, loss_fn, opt, sched, state,
                            run.progress(f"[finetune] epoch {epoch + 1}", len(data.train)))

    def experts_fn(x):
        return torch.softmax(experts(x).float(), dim=-1)

    def evaluate(epoch: int) -> dict:
        experts.eval()
        logits, _ = gate_predict(cfg, gate, kind, data.val, cache, "val", 0, experts_fn)
        return {"val_acc": accuracy(logits, data.val.y)}

    last = train_phase(run, "finetune", both, opt, gc["finetune_epochs"], train_epoch, evaluate, sched=sched)
    both.eval()
    return {"last": last, "experts_fn": experts_fn, "train_img_per_s": state["images"] / max(state["seconds"], 1e-9)}


# ----------------------------------------------------------------------------- the experiment


@family("cifar_experts", DEFAULTS, RULES, check_config, RESUMABLE)
def run_cifar_experts(cfg: dict, run: Run) -> dict:
    ddp.require_single_process(run.name)
    if cfg["compute"]["threads"] > 0:
        torch.set_num_threads(cfg["compute"]["threads"])
    t_start = time.perf_counter()
    data = Data(cfg, run)
    run.log(f"data: {cfg['data']['name']} (checksum {data.checksum[:12]}), train {len(data.train)}, "
            f"val {len(data.val)}, test {len(data.test)}; {len(data.pairs)} experts; torch threads "
            f"{torch.get_num_threads()}; bf16 {_bf16(cfg)} (compute.bf16 = {cfg['compute']['bf16']}, CPU bf16: "
            f"{cpu_bf16_isa()}), channels_last {cfg['compute']['channels_last']}")
    generalist, ginit = (train_generalist(cfg, run, data) if needs_generalist(cfg) else (None, None))
    experts, einfo = pretrain_experts(cfg, run, data, generalist)
    kind = cfg["gate"]["kind"]
    cache, oinfo = expert_outputs(cfg, run, data, experts, einfo["key"], eval_only=kind == HIERARCHICAL)
    models, uniform = expert_reports(data, cache)
    y = data.test.y
    t0 = time.perf_counter()  # the hierarchical mixture's gate is the generalist: its inference is part of it
    splits = (("val", data.val), ("test", data.test)) if kind == HIERARCHICAL else (("test", data.test),)
    gen_probs = ({split: torch.softmax(_predict(_to_memory_format(generalist, cfg), images, cfg)[0], 1)
                  for split, images in splits} if generalist is not None else {})
    gen_infer_s = time.perf_counter() - t0
    if generalist is not None:
        models["generalist"] = {"test_accuracy": accuracy(gen_probs["test"], y),
                                "epochs": cfg["generalist"]["epochs"],
                                "scope": "the single CNN the specialists / gate trunk start from"}
    save_eval(run, "baseline-uniform", y, uniform, None, data.classes)
    timings = {"data_and_experts_s": round(time.perf_counter() - t_start, 1),
               "experts": {k: einfo.get(k) for k in ("cached", "train_s", "train_img_per_s")},
               "generalist": {k: ginit.get(k) for k in ("cached", "train_s", "train_img_per_s")} if ginit else None,
               "expert_outputs": {k: oinfo.get(k) for k in ("cached", "infer_s", "infer_img_per_s")},
               "load_1min_after_experts": _load(), "torch_threads": torch.get_num_threads()}
    # every row's cost: params and inference FLOPs per example counted (moelab.cost) on real test images,
    # outside the timed phases; train_time_s: the phases' wall-clock (cached ones: when they were computed)
    probe = cost_probe(data)
    one_cnn = cost_row(Seed1CNN(len(data.classes)), probe)  # an expert, the generalist, the single CNN
    gen_s = ginit["train_s"] if ginit else 0.0
    per_expert = einfo.get("expert_train_s") or [None] * len(data.pairs)  # caches older than the key: unknown
    for i, (a, b) in enumerate(data.pairs):
        models[f"expert{i}-{data.classes[a]}-{data.classes[b]}"].update(one_cnn, train_time_s=per_expert[i])
    experts_s = einfo["train_s"] + (gen_s if cfg["experts"]["init"] == "generalist" else 0.0)
    models["baseline-uniform"].update(mixture_cost(probe, experts), train_time_s=round(experts_s, 1))
    models["oracle-pair"].update(params=None, flops_per_example=None, train_time_s=None)  # needs the true label
    if generalist is not None:
        models["generalist"].update(one_cnn, train_time_s=round(gen_s, 1))
    summary: dict = {"dataset": "CIFAR-10 (JPEG-75 copy)" if cfg["data"]["name"] == "cifar10" else cfg["data"]["name"],
                     "expert_key": einfo["key"], "pairs": [[data.classes[a], data.classes[b]] for a, b in data.pairs]}
    if kind == HIERARCHICAL:
        t0 = time.perf_counter()
        logits, weights, hinfo = hierarchical_mixture(cfg, run, data, gen_probs, cache)
        acc = accuracy(logits, y)
        models[f"moe-{kind}"] = {"test_accuracy": acc, "val_accuracy": hinfo["val_acc"], "blend": hinfo["blend"],
                                 "scope": "the generalist as top-level gate, each expert within its pair"}
        save_eval(run, f"moe-{kind}", y, torch.softmax(logits, 1), weights, data.classes)
        summary["routing"] = routing_stats(y, weights, len(data.classes))
        timings["gate"] = {"train_s": round(time.perf_counter() - t0 + gen_infer_s, 1), "train_img_per_s": None,
                           "what": "generalist inference on val + test, blend fitted on val", "load_1min": _load()}
        models[f"moe-{kind}"].update(mixture_cost(probe, experts, kind, generalist=generalist, cover=data.cover,
                                                  blend=hinfo["blend"]))  # counted outside the timed phases
        summary["test_accuracy"] = acc
    elif kind != "none":
        t0 = time.perf_counter()
        gate, ginfo = train_gate(cfg, run, data, cache, generalist)
        extra_dim = gate.extra_dim
        logits, weights = gate_predict(cfg, gate, kind, data.test, cache, "test", extra_dim)
        acc = accuracy(logits, y)
        name = f"moe-{kind}"
        models[name] = {"test_accuracy": acc, "val_accuracy": ginfo["last"].get("val_acc")}
        save_eval(run, name, y, torch.softmax(logits, 1), weights, data.classes)
        summary["routing"] = routing_stats(y, weights, len(data.classes))
        timings["gate"] = {"train_s": round(time.perf_counter() - t0, 1), "train_img_per_s": ginfo["train_img_per_s"],
                           "lr": ginfo["lr"], "load_1min": _load()}
        models[name].update(mixture_cost(probe, experts, kind, gate, top_k=cfg["gate"]["top_k"]))
        if kind == "sparse":
            models[name]["note"] = (f"all experts run: the top-{cfg['gate']['top_k']} gate values weigh their "
                                    f"outputs (a routed implementation would run only those)")
        summary["test_accuracy"] = acc
        if cfg["gate"]["finetune_epochs"] > 0:
            t0 = time.perf_counter()
            finfo = finetune(cfg, run, data, experts, gate, cache)
            logits, weights = gate_predict(cfg, gate, kind, data.test, cache, "test", 0, finfo["experts_fn"])
            acc = accuracy(logits, y)
            models[f"{name}-finetuned"] = {"test_accuracy": acc}
            save_eval(run, f"{name}-finetuned", y, torch.softmax(logits, 1), weights, data.classes)
            timings["finetune"] = {"train_s": round(time.perf_counter() - t0, 1),
                                   "train_img_per_s": finfo["train_img_per_s"], "load_1min": _load()}
            models[f"{name}-finetuned"].update(mixture_cost(probe, experts, kind, gate, top_k=cfg["gate"]["top_k"]))
            summary["test_accuracy"] = acc
    if kind != "none":
        timings["pipeline_s"] = round(time.perf_counter() - t_start, 1)
        # the mixture's whole training budget, cached phases counted at the time they took when trained
        before = sum(t["train_s"] for t in (timings["generalist"], timings["experts"]) if t) \
            + (oinfo.get("infer_s") or 0.0) + timings["gate"]["train_s"]
        budget = before + timings.get("finetune", {}).get("train_s", 0)
        timings["mixture_budget_s"] = round(budget, 1)
        models[f"moe-{kind}"]["train_time_s"] = round(before, 1)
        if f"moe-{kind}-finetuned" in models:
            models[f"moe-{kind}-finetuned"]["train_time_s"] = round(budget, 1)
    ref = f"moe-{kind}" if kind != "none" else "baseline-uniform"  # what the equal-cost rows are matched to
    summary["cost"] = {"counted": "moelab.cost: FlopCounterMode on a real forward pass in eval mode, matmuls + "
                                  "convolutions, 2 FLOPs per multiply-add", "probe_images": int(probe.shape[0]),
                       "one_cnn": one_cnn, "reference": ref}
    if cfg["baselines"]:
        bc = cfg["baseline"]
        full = _full_classes(data)
        single_epochs = bc["epochs"]
        if single_epochs == 0:  # equal wall-clock: epochs at the generalist's (else a nominal) speed
            speed = (ginit or {}).get("train_img_per_s") or einfo.get("train_img_per_s")
            single_epochs = max(1, int(timings.get("mixture_budget_s", 0) * speed / len(full)))
            run.log(f"[baseline-single-cnn] {single_epochs} epochs: the mixture's budget of "
                    f"{timings.get('mixture_budget_s', 0):.0f} s at {speed:.0f} images/s")

        def train_dense(name: str, width: int = 32, epochs: int = single_epochs, is_trunk: bool = False) -> dict:
            """One Seed1CNN of ``width`` on all classes: the single-CNN recipe (``baseline.*``), or the gate's
            (``is_trunk``: the gate trunk as a 10-way classifier). Its row: accuracy, counted cost, time."""
            lr, schedule = (SEED_LR["standard"], cfg["gate"]["schedule"]) if is_trunk else (bc["lr"], bc["schedule"])
            t0 = time.perf_counter()
            torch.manual_seed(run.generator("init", name).initial_seed())
            m = Seed1CNN(len(data.classes), width=width)
            shift = (cfg["augment"]["max_shift"] if cfg["gate"]["shift"] else 0) if is_trunk else cfg["augment"]["max_shift"]
            info = train_classifier(run, name, m, full, data.val, cfg, epochs=epochs,
                                    batch=cfg["gate"]["batch"] if is_trunk else bc["batch"], lr=lr, schedule=schedule,
                                    l2=cfg["experts"]["l2"], shift=shift, keep_best=schedule == "plateau",
                                    early_stop=cfg["experts"]["early_stop_patience"] if schedule == "plateau" else 0)
            logits = _predict(m, data.test, cfg)[0]
            acc = accuracy(logits, y)
            save_eval(run, name, y, torch.softmax(logits, 1), None, data.classes)
            timings[name] = {"train_s": round(time.perf_counter() - t0, 1), "train_img_per_s": info["train_img_per_s"],
                             "load_1min": _load()}
            return {"test_accuracy": acc, "epochs": epochs, **cost_row(m, probe), "train_time_s": timings[name]["train_s"]}

        if bc["trunk_epochs"] >= 0:  # -1: skip it
            models["baseline-gate-trunk"] = train_dense("baseline-gate-trunk", is_trunk=True,
                                                        epochs=bc["trunk_epochs"] or cfg["gate"]["epochs"])
        models["baseline-single-cnn"] = single = train_dense("baseline-single-cnn")
        single["note"] = (f"smaller network: one expert's size, {models[ref]['params'] / single['params']:.1f}x fewer "
                          f"parameters than {ref}" + ("; given its training wall-clock (dense-equal-time)"
                                                       if bc["epochs"] == 0 and kind != "none" else ""))
        if bc["epochs"] == 0 and "mixture_budget_s" in timings:  # the single CNN had the mixture's budget
            models["dense-equal-time"] = {**models["baseline-single-cnn"], "same_model_as": "baseline-single-cnn",
                                          "matched_to": "train_time_s", "matched_to_model": ref,
                                          "target_train_time_s": timings["mixture_budget_s"]}
        if bc["equal_cost"]:
            widths = seed_cnn_widths(len(data.classes), models[ref], probe)
            summary["cost"]["dense_widths"] = widths
            epochs = bc["equal_cost_epochs"] or single_epochs
            target = {"matched_to_model": ref, "target_params": models[ref]["params"],
                      "target_flops_per_example": models[ref]["flops_per_example"]}
            models.update(equal_cost_rows(run, widths, lambda name, w: train_dense(name, w, epochs=epochs), target))
        if kind == "none":
            summary["test_accuracy"] = models["baseline-single-cnn"]["test_accuracy"]
    if "test_accuracy" not in summary:
        summary["test_accuracy"] = models["baseline-uniform"]["test_accuracy"]
    summary["models"] = models
    summary["timings"] = timings
    run.log("timings: " + json.dumps(timings, default=str))
    return summary


def _full_classes(data: Data) -> Images:
    if len(data.used_classes) == len(data.classes):
        return data.train
    return _subset(data.train, data.used_classes)


__all__ = ["DEFAULTS", "run_cifar_experts"]
