"""The CIFAR seed pipeline's data and training helpers (``cifar10-experts`` and friends): the content keys of its
caches, the data splits, one classifier trained with the seed's recipe. The batches themselves come from
:mod:`moelab.experiments.cifar` (shared with ``cifar10-moe``)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import refuse
from moelab.data.transforms import train_val_split
from moelab.experiments.cifar import Images, Mirrored, image_batches, images_of, limit_per_class
from moelab.experiments.cifar_experts.config import Config
from moelab.models.cifar_cnn import conv_l2_penalty
from moelab.precision import resolve_bf16
from moelab.reproductions.hierarchical import pair_cover
from moelab.train.checkpoint import load_checkpoint, save_checkpoint
from moelab.train.evaluation import accuracy
from moelab.train.optim import onecycle_or_plateau
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict


def config_hash(obj) -> str:
    """A content key for the caches: config sections (typed dataclasses) hash as their dicts, so keys made
    before configs were typed stay valid."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_as_dict).encode()).hexdigest()[:24]


def section_dict(section) -> dict:
    """A config section as the dict its cache keys hash: keys under their names before the renames of
    :data:`moelab.config.RENAMED_KEYS` (``batch``, ``name``), so experts cached before them stay valid."""
    d = dataclasses.asdict(section)
    for new, old in (("batch_size", "batch"), ("dataset", "name")):
        if new in d:
            d[old] = d.pop(new)
    return d


def _as_dict(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return section_dict(obj)
    raise TypeError(f"config_hash: cannot hash a {type(obj).__name__}")


def load_average() -> float:
    """The 1-minute load average (the CPU is shared: timings are only comparable at similar load)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return float("nan")


def use_bf16(cfg: Config, device: torch.device | str = "cpu") -> bool:
    """``compute.bf16`` resolved: ``"auto"`` = bf16 only where ``device`` computes it natively."""
    return resolve_bf16(cfg.compute.bf16, device, key="compute.bf16")


def autocast_for(cfg: Config, device: torch.device | str = "cpu"):
    if use_bf16(cfg, device):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_memory_format(model: nn.Module, cfg: Config, device: torch.device | str = "cpu") -> nn.Module:
    """``model`` on ``device``, channels_last when ``compute.channels_last``."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.compute.channels_last else model


def check_sizes(cfg: Config, train_per_class: dict[int, int], test_per_class: dict[int, int]) -> None:
    """The sizes that must fit the data set (images per used class), before anything trains."""
    d = cfg.data
    for key, counts, split in (("train_per_class", train_per_class, "training"), ("test_per_class", test_per_class, "test")):
        if getattr(d, key) > min(counts.values()):
            raise refuse(f"data.{key}", getattr(d, key), f"at most {min(counts.values())} (the fewest {split} images of "
                         f"a used class; 0: all)")
    n_train = sum(min(n, d.train_per_class or n) for n in train_per_class.values())
    if d.val_size >= n_train:
        raise refuse("data.val_size", d.val_size, f"fewer than the {n_train} training images")
    n_fit = n_train - d.val_size
    for key in ("experts.batch_size", "generalist.batch_size", "gate.batch_size", "baseline.batch_size"):
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value > n_fit:
            raise refuse(key, value, f"at most the {n_fit} training images left after data.val_size")


class Data:
    def __init__(self, cfg: Config, run: Run):
        from moelab.data import load_dataset

        ds = load_dataset(cfg.data.dataset, data_dir=run.data_dir)
        self.classes = list(ds.classes)
        self.checksum = ds.checksum
        self.pairs = [list(p) for p in cfg.data.pairs]
        used = sorted({c for p in self.pairs for c in p})
        self.used_classes = used
        check_sizes(cfg, {c: int((ds.train_y == c).sum()) for c in used}, {c: int((ds.test_y == c).sum()) for c in used})
        tr_keep = limit_per_class(ds.train_y, used, cfg.data.train_per_class)
        te_keep = limit_per_class(ds.test_y, used, cfg.data.test_per_class)
        train_x, train_y = ds.train_x[tr_keep], ds.train_y[tr_keep]
        tr, va = train_val_split(train_y, cfg.data.val_size, seed=run.seed, stratified=True)
        cl, self.device = cfg.compute.channels_last, run.device
        self.train = Images(train_x[tr], train_y[tr], cl, run.device)
        self.val = Images(train_x[va], train_y[va], cl, run.device)
        self.test = Images(ds.test_x[te_keep], ds.test_y[te_keep], cl, run.device)
        self.cover = pair_cover(self.pairs, len(self.classes))  # (K, E): class k is in expert e's pair
        self.key = {"checksum": self.checksum, "data": cfg.data, "train": len(self.train), "val": len(self.val)}


def outputs(fn, images: Images | Mirrored, cfg: Config) -> list[torch.Tensor]:
    """``fn``'s outputs on ``images`` (:func:`moelab.train.trainer.predict` in ``eval.batch_size`` batches,
    with ``compute.bf16``), on the host."""
    return predict(fn, images, batch=cfg.eval.batch_size, device=images.device, bf16=use_bf16(cfg, images.device))


def validation_accuracy(model: nn.Module, val: Images, cfg: Config, classes: list[int] | None = None) -> float:
    """Accuracy on ``val``; with ``classes``, the argmax over those classes only."""
    model.eval()
    logits = outputs(model, val, cfg)[0]
    if classes is not None:
        keep = torch.tensor(classes)
        return (keep[logits[:, keep].argmax(1)] == val.y).float().mean().item()
    return accuracy(logits, val.y)


def _start_as_best(run: Run, phase: str, model: nn.Module, acc0: float, best_path, state: dict) -> None:
    """A warm-started model's starting weights as the first best candidate (epoch 0)."""
    state["best"], state["best_epoch"] = acc0, -1
    save_checkpoint(best_path, model.state_dict(), {"best": acc0, "best_epoch": -1})
    run.metric(phase=phase, epoch=0, val_acc=acc0)
    run.log(f"phase={phase}  epoch=0  val_acc={acc0:.4g}  (the starting point)")


def _restore_best(model: nn.Module, best_path, state: dict) -> None:
    tensors, meta = load_checkpoint(best_path)
    model.load_state_dict(tensors)
    state["best"], state["best_epoch"] = meta["best"], meta["best_epoch"]


def train_classifier(run: Run, phase: str, model: nn.Module, images: Images, val: Images, cfg: Config, *,
                     epochs: int, batch: int, lr: float, schedule: str, l2: float, shift: int,
                     plateau_patience: int = 2, plateau_factor: float = 0.5, min_lr: float = 1e-6,
                     early_stop: int = 0, keep_best: bool = False, keep_start: bool = False,
                     val_classes: list[int] | None = None) -> dict:
    """The seed's recipe for a 10-way CNN classifier (an expert on its pair, or a baseline), run by the
    trainer: cross-entropy + conv L2, random shift + flip, Adam; one-cycle or plateau schedule; optional
    early stopping and best checkpoint by validation accuracy (kept in ``ckpt/<phase>-best.safetensors``).
    Returns speed + best stats.

    ``keep_start`` (a warm-started model): its starting weights are the first candidate (epoch 0): fine-tuning
    that never beats them on ``val`` leaves the model as it came. ``val_classes``: validation accuracy over
    these classes only (a warm-started specialist is judged on telling its pair apart)."""
    model = to_memory_format(model, cfg, images.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = math.ceil(len(images) / batch)
    sched = onecycle_or_plateau(schedule, opt, lr, epochs, steps, plateau_patience, plateau_factor, min_lr)
    trainer = Trainer(run, phase, model, opt, sched, epochs=epochs, bf16=use_bf16(cfg, images.device),
                      device=images.device)
    best_path = run.dir / "ckpt" / f"{phase}-best.safetensors"
    state = {"best": -1.0, "best_epoch": -1}
    if run.resumed and best_path.is_file():
        _, meta = load_checkpoint(best_path)
        state["best"], state["best_epoch"] = meta["best"], meta["best_epoch"]

    def val_acc() -> float:
        return validation_accuracy(model, val, cfg, val_classes)

    if keep_best and keep_start and not run.checkpoint_path(phase).is_file():  # the phase has not started
        _start_as_best(run, phase, model, val_acc(), best_path, state)

    def loss(out, y):
        return F.cross_entropy(out.float(), y) + conv_l2_penalty(model, l2), None

    def evaluate(epoch: int) -> dict:
        acc = val_acc()
        if schedule == "plateau":
            sched.step(acc)
        if keep_best and acc > state["best"]:
            state["best"], state["best_epoch"] = acc, epoch
            save_checkpoint(best_path, model.state_dict(), {"best": acc, "best_epoch": epoch})
        return {"val_acc": acc}

    last = trainer.fit(lambda epoch: image_batches(images, batch, run.generator(phase, epoch), cfg.augment.hflip, shift),
                       model, loss, evaluate=evaluate, progress=lambda epoch: len(images),
                       stopped=lambda epoch: bool(early_stop) and state["best"] >= 0
                       and epoch - state["best_epoch"] > early_stop)
    if keep_best and best_path.is_file():
        _restore_best(model, best_path, state)
    model.eval()
    return {"last": last, "best_val": state["best"], "best_epoch": state["best_epoch"] + 1,
            "train_img_per_s": trainer.img_per_s, "train_s": run.phase_times[phase]["train_s"]}


def full_classes(data: Data) -> Images:
    if len(data.used_classes) == len(data.classes):
        return data.train
    return images_of(data.train, data.used_classes)
