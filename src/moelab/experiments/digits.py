"""What the digit experiments share (the jacobs and sparse_mlp families): the grayscale data sets loaded the
seed's way, shuffled (and augmented) minibatches, one network trained with a family's recipe and its model row
with routing statistics (:func:`fit_model`), the equal-cost dense baselines."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from moelab.config import Float, Int, refuse
from moelab.cost import cost_row, count_params, flops_per_example
from moelab.data.augment import Augment
from moelab.errors import ConfigError
from moelab.experiments.baselines import EQUAL_COST, dense_widths, equal_cost_rows
from moelab.experiments.folder_data import FolderPath
from moelab.parallel import ddp
from moelab.train.evaluation import accuracy, error_pct, routing_stats, save_eval
from moelab.train.optim import Optim
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict

Dataset = Literal["digits", "mnist", "fashion-mnist"]
Activation = Literal["gelu", "relu", "silu", "tanh", "sigmoid"]
GRAYSCALE, ACTIVATIONS = get_args(Dataset), get_args(Activation)


@dataclass(frozen=True)
class DigitData:
    """The ``data`` section of the digit families (:mod:`moelab.schema`)."""

    dataset: Dataset = "digits"
    folder: FolderPath = ""  # any image folder / .tar(.gz) of one instead of dataset (folder_data); colour -> luma
    resize: Literal["seed_half", "none"] = "none"  # "seed_half": the seed's cubic zoom 28 -> 14
    train_limit: Annotated[int, Int(ge=0)] = 0  # use only the first N training images (0: all)
    test_limit: Annotated[int, Int(ge=0)] = 0  # use only the first N test images (0: all)
    val_size: Annotated[int, Int(ge=0)] = 0  # hold out this many training images (stratified) for validation
    standardize: bool = False  # (x - mean) / std with the training images' mean and std (scalars)
    # rotate: "rotated by rotate_deg or not"; tilt: "by -rotate_deg/2 or +rotate_deg/2" (no blur cue,
    # moelab.data.tasks); the class becomes the latent label
    task: Literal["classes", "rotate", "tilt"] = "classes"
    rotate_deg: Annotated[float, Float(gt=0, lt=180)] = 30.0  # task = rotate: the angle of the rotated half
    rotate_crop: Annotated[int, Int(ge=0)] = 0  # task = rotate: centre crop side (0: the largest with no empty corner)
    grayscale: bool = False  # colour -> luma before the task (the leak guard of moelab.data.tasks; digits are grey)


def check_sizes(d: DigitData, name: str, n_train: int, n_test: int, batch_size: int | None = None) -> None:
    """The sizes that must fit the data set (``n_train`` / ``n_test`` images), before anything trains;
    ``batch_size`` (minibatch training) must fit the training images left after the validation split."""
    for key, n, split in (("train_limit", n_train, "training"), ("test_limit", n_test, "test")):
        if getattr(d, key) > n:
            raise refuse(f"data.{key}", getattr(d, key), f"at most the {n} {split} images of {name} (0: all)")
    n_tr = min(n_train, d.train_limit or n_train)
    if d.val_size >= n_tr:
        raise refuse("data.val_size", d.val_size, f"fewer than the {n_tr} training images of {name}")
    n_fit = n_tr - d.val_size
    if batch_size is not None and batch_size > n_fit:
        raise refuse("train.batch_size", batch_size, f"at most the {n_fit} training images left after "
                     f"data.val_size = {d.val_size}")


def grayscale(x: np.ndarray, name: str) -> np.ndarray:
    if x.shape[-1] != 1:
        raise ConfigError(f"the digit experiments (jacobs, sparse_mlp) need grayscale images; data set '{name}' has "
                          f"{x.shape[-1]} channels (cifar10-moe takes colour images)")
    return x[..., 0]


def load_data(d: DigitData, run_seed: int, data_dir: str | None, *, batch_size: int | None = None,
              shuffle_split: bool = False) -> dict:
    """The experiment's images as float64 (N, H*W) in [0, 1] (the seed's scaling) and int64 labels.
    ``shuffle_split``: the seed's random split of all images (see ``seed_protocol``). ``data.task``
    (:func:`moelab.data.tasks.make_task`) is made of the images kept (after the split and the limits, so its
    labels are balanced in what trains), before the resize; ``train_latent`` / ``test_latent`` are then the
    original classes (None for ``classes``)."""
    from moelab.data import load_dataset
    from moelab.data.tasks import task_from_config
    from moelab.data.transforms import resize_cubic_half_like_seed
    from moelab.train.run import seeded_generator

    notes = []
    if d.folder:
        ds, notes = load_gray_folder(d)
    else:
        ds = load_dataset(d.dataset, data_dir=data_dir)
    tr_x, te_x, tr_y, te_y = ds.train_x, ds.test_x, ds.train_y, ds.test_y  # (N, H, W, C)
    check_sizes(d, ds.name, len(tr_y), len(te_y), batch_size)
    if shuffle_split:  # the seed: np.random.shuffle(ids) over all images, first 60000 train
        all_x, all_y = np.concatenate([tr_x, te_x]), np.concatenate([tr_y, te_y])
        ids = torch.randperm(len(all_x), generator=seeded_generator(run_seed, "split")).numpy()
        tr_x, tr_y = all_x[ids[:len(tr_x)]], all_y[ids[:len(tr_x)]]
        te_x, te_y = all_x[ids[len(tr_x):]], all_y[ids[len(tr_x):]]
    if d.train_limit > 0:
        tr_x, tr_y = tr_x[:d.train_limit], tr_y[:d.train_limit]
    if d.test_limit > 0:
        te_x, te_y = te_x[:d.test_limit], te_y[:d.test_limit]
    task = task_from_config(dataclasses.replace(ds, train_x=tr_x, train_y=tr_y, test_x=te_x, test_y=te_y), d,
                            int(seeded_generator(run_seed, "task").initial_seed()),
                            min_side=4 if d.resize == "seed_half" else 1, why="data.resize = \"seed_half\" halves it")
    tr_x, te_x = grayscale(task.train_x, ds.name), grayscale(task.test_x, ds.name)
    tr_y, te_y = task.train_y, task.test_y
    has_latent = getattr(task, "train_latent", None) is not None
    train_raw = torch.from_numpy(np.ascontiguousarray(tr_x))  # before resizing: for augmentation
    if d.resize == "seed_half":
        tr_x, te_x = resize_cubic_half_like_seed(tr_x), resize_cubic_half_like_seed(te_x)
    h, w = tr_x.shape[1:]
    both = np.concatenate([tr_x, te_x]).reshape(-1, h * w).astype(np.float64)
    shift = float(both.min())
    both += shift  # the seed's normalisation, over the whole data set (sic: +=; the minimum is 0)
    scale = float(both.max())
    both /= scale
    return {
        "train_x": torch.from_numpy(both[:len(tr_x)]), "train_y": torch.from_numpy(np.asarray(tr_y)),
        "test_x": torch.from_numpy(both[len(tr_x):]), "test_y": torch.from_numpy(np.asarray(te_y)),
        "train_raw": train_raw, "pixel_affine": (shift, scale), "resize": d.resize,
        "shape": (h, w), "classes": list(task.classes), "num_classes": len(task.classes),
        "train_latent": torch.from_numpy(task.train_latent) if has_latent else None,
        "test_latent": torch.from_numpy(task.test_latent) if has_latent else None,
        "latent_classes": list(task.latent_classes) if has_latent else None,
        "dataset": ds.name, "notes": notes,
    }


def load_gray_folder(d: DigitData) -> tuple:
    """``data.folder`` (:func:`moelab.experiments.folder_data.load_folder`) as one-channel images: a colour folder
    converted to luma (ITU-R 601), said in the returned notes; ``data.resize = "seed_half"`` (a cubic half-size
    zoom of any size) needs a side of at least 4 px."""
    from moelab.data.tasks import to_gray
    from moelab.experiments.folder_data import load_folder

    ds, notes = load_folder(d.folder), []
    h, w, c = ds.image_shape
    if d.resize == "seed_half" and min(h, w) < 4:
        raise ConfigError(f"data.resize = \"seed_half\" halves the images, but data.folder = {d.folder!r} holds "
                          f"{h}x{w} images (at least 4x4 needed): set data.resize = \"none\".")
    if c == 3:
        ds = dataclasses.replace(ds, train_x=to_gray(ds.train_x)[..., :1], test_x=to_gray(ds.test_x)[..., :1])
        notes.append(f"data: {ds.name} has colour images: converted to grayscale (ITU-R 601 luma), as the digit "
                     f"families read one channel")
    return ds, notes


def lead_share(counts: Tensor) -> list[float]:
    return [round(float(c), 4) for c in (counts.float() / max(int(counts.sum()), 1))]


def model_report(labels: Tensor, probs: Tensor, gates: Tensor | None, num_classes: int,
                 latent: Tensor | None = None, num_latent: int = 0) -> dict:
    """A model's test row; a mixture's with its routing, and with a task's ``latent`` classes (``num_latent``
    of them) ``latent_expert_info`` = I(latent class; lead expert) / H(latent class) and its count matrix."""
    from moelab.analysis.routing import latent_routing

    acc = accuracy(probs, labels)
    out = {"test_accuracy": acc, "test_error_pct": round(100 * (1 - acc), 4)}
    if gates is not None:
        stats = routing_stats(labels, gates, num_classes)
        out.update(stats)
        out["lead_share_pct"] = [round(100 * s, 2) for s in stats["lead_share"]]
        out.update(latent_routing(latent, gates, num_latent))
    return out


def fit_model(run: Run, phase: str, model: nn.Module, loss: Callable, t: Optim, sp: Splits, bf16: bool,
              outputs: Callable, *, epochs: int, lr: float, eval_batch: int, probe: Tensor,
              routing_lr_scale: float = 1.0) -> dict:
    """Train one network of a digit family (the mixture or a dense one) with the family's recipe -> its model row.

    The trainer (:class:`~moelab.train.trainer.Trainer`) takes ``t``'s optimiser and schedule at ``lr`` (the routing
    parameters at ``routing_lr_scale`` times it) for ``epochs`` epochs of ``sp``'s minibatches (``t.batch_size``),
    ``loss(out, y) -> (loss, aux or None)`` on the model's forward (DDP-wrapped under torchrun). ``outputs(x)`` is
    one evaluation forward -> class probabilities (N, C), and a mixture's gates (N, E) after them; it gives the
    after-epoch metrics (error on the validation split, on the test split without one, and the experts' lead
    shares) and the row: the test split's accuracy and routing (:func:`model_report`, its predictions saved as
    ``eval/<phase>``), the validation error, the training time and the counted cost on ``probe``
    (:func:`moelab.cost.cost_row`). ``eval_batch``: rows per evaluation forward."""
    model.to(run.device)
    trainer = Trainer.from_recipe(run, phase, model, t, epochs=epochs, lr=lr, routing_lr_scale=routing_lr_scale,
                                  steps_per_epoch=math.ceil(len(sp.train_y) / t.batch_size), bf16=bf16,
                                  device=run.device, log_every=t.log_every)

    def probs_gates(x: Tensor) -> tuple[Tensor, Tensor | None]:  # on the host
        model.eval()
        probs, *gates = predict(outputs, x, batch=eval_batch, device=run.device, bf16=bf16)
        return probs, (gates[0] if gates else None)

    def evaluate(epoch: int) -> dict:
        x, y, name = sp.eval_split
        probs, gates = probs_gates(x)
        row = {name: error_pct(probs, y)}
        if gates is not None:
            row["lead_share"] = lead_share(torch.bincount(gates.argmax(1), minlength=gates.shape[1]))
            row["lead_max"] = max(row["lead_share"])
        return row

    trainer.fit(lambda epoch: sp.batches(run, phase, epoch, t.batch_size), ddp.wrap_model(model), loss,
                evaluate=evaluate)
    probs, gates = probs_gates(sp.test_x)
    save_eval(run, phase, sp.test_y, probs, gates, class_names=sp.classes, latent=sp.test_latent)
    rep = model_report(sp.test_y, probs, gates, probs.shape[1], sp.test_latent, len(sp.latent_classes))
    if sp.val_x is not None:
        rep["val_error_pct"] = error_pct(probs_gates(sp.val_x)[0], sp.val_y)
    rep.update(epochs=epochs, train_time_s=run.train_time(phase), **cost_row(model, probe.to(run.device)))
    val = f", val err {rep['val_error_pct']:.2f}%" if "val_error_pct" in rep else ""
    run.log(f"[{phase}] test err {rep['test_error_pct']:.2f}%{val}, {rep['params']} params, "
            f"{rep['flops_per_example']:.0f} FLOPs/example, {rep['train_time_s']} s")
    return rep


def format_lead(share: list[float]) -> str:
    return "  ".join(f"E{i + 1} {100 * s:.1f}%" for i, s in enumerate(share) if s > 0)


# ======================================================================== equal-cost baselines
def dense_baselines(run: Run, moe_row: dict, make_dense, probe: Tensor, train_dense,
                    names: tuple[str, ...] = EQUAL_COST) -> dict[str, dict]:
    """``dense-equal-params`` / ``dense-equal-flops`` (those in ``names``): ``make_dense(hidden)`` widened to the
    mixture's counted parameters / inference FLOPs (on ``probe``), trained by ``train_dense(phase, hidden)``."""
    widths = dense_widths(moe_row, lambda h: count_params(make_dense(h)),
                          lambda h: flops_per_example(make_dense(h), probe))
    return equal_cost_rows(run, widths, train_dense, names=names, make_dense=make_dense)


def label_single(models: dict) -> None:
    """The single network is one expert's size: say so in its row."""
    s, moe = models["single"], models["moe"]
    if s.get("params") and moe.get("params"):
        s["note"] = (f"smaller network: one expert's size, {moe['params'] / s['params']:.1f}x fewer parameters "
                     f"than the mixture (compare with dense-equal-params / dense-equal-flops)")


def minibatches(run: Run, phase: str, epoch: int, x: Tensor, y: Tensor, bs: int, norm: tuple[float, float],
             raw: Tensor | None = None, augment: Augment | None = None, feed: DigitFeed | None = None):
    """This epoch's shuffled minibatches (``run.generator(phase, epoch)`` orders and augments them): rows of
    ``x``, or, with ``augment``, the augmented ``raw`` images. Yields ``(x, y, loss_weight)``.

    ``feed`` (:class:`DigitFeed` over these ``x``, ``y``, ``raw``, ``augment``) gathers and augments each
    batch on its device, with the same draws (None: on the host, where the tensors are).

    Under torch.distributed every rank draws and augments the same global batch (so the data are those
    of one process) and keeps its contiguous part (``ddp.local_share``); ``loss_weight`` makes DDP's
    gradient average the gradient of the global-batch mean loss (1.0 in one process)."""
    g = run.generator(phase, epoch)
    perm = torch.randperm(y.shape[0], generator=g)
    for i in range(0, y.shape[0], bs):
        idx = perm[i:i + bs]
        if feed is not None:
            xb, yb = feed.take(idx, g)
        else:
            xb = augment(raw.index_select(0, idx), g) if augment is not None else x.index_select(0, idx)
            yb = y.index_select(0, idx)
        xb, yb = ddp.local_share(xb), ddp.local_share(yb)
        yield (xb - norm[0]) / norm[1], yb, ddp.loss_weight(len(yb), len(idx))


class DigitFeed:
    """A digit experiment's training tensors batched on ``device`` (:mod:`moelab.data.feed`): the rows of
    ``x`` (or, with ``augment``, of ``raw``, augmented on the device by :class:`~moelab.data.feed.DeviceAugment`)
    and of ``y``, living on a CUDA device they fit on (``resident``; None: by size), else gathered on the host
    into pinned memory and sent asynchronously. ``take`` gives :func:`minibatches`' host batches, with the
    same draws from the generator."""

    def __init__(self, x: Tensor, y: Tensor, device: torch.device | str, raw: Tensor | None = None,
                 augment: Augment | None = None, resident: bool | None = None):
        from moelab.data.feed import DeviceAugment, Rows

        self.device = torch.device(device)
        self.rows = Rows(raw if augment is not None else x, self.device, resident)
        self.labels = Rows(y, self.device, self.rows.resident)
        self.augment = DeviceAugment(augment, self.device) if augment is not None else None

    def take(self, idx: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        from moelab.data.feed import send

        draws = self.augment.draw(len(idx), g) if self.augment is not None else []
        idx_d, *draws = send([idx, *draws], self.device)  # one asynchronous copy for the batch's numbers
        xb = self.rows.take(idx_d if self.rows.resident else idx)
        xb = self.augment(xb, draws) if self.augment is not None else xb
        return xb, self.labels.take(idx_d if self.labels.resident else idx)


class Splits:
    """Train / validation / test tensors of a digit experiment, standardised with the training mean and std.

    ``val_size`` training images (stratified, seeded by the run) are held out as the validation split
    (0: none; then ``val`` is None and ``eval_*`` is the test split). ``raw`` keeps the original training
    images for ``augment`` (:class:`moelab.data.augment.Augment`, or None). A task's latent classes
    (``data.task``) follow their images: ``val_latent`` / ``test_latent`` (None without), ``latent_classes``."""

    def __init__(self, data: dict, val_size: int, seed: int, standardize: bool, augment: Augment | None):
        from moelab.data.transforms import train_val_split

        x, y, raw = data["train_x"].float(), data["train_y"], data["train_raw"]
        latent = data.get("train_latent")
        self.val_x = self.val_y = self.val_latent = None
        if val_size > 0:
            strata = y if latent is None else latent * (int(y.max()) + 1) + y  # a task: by (latent class, label)
            tr_idx, val_idx = train_val_split(strata.numpy(), val_size, seed=seed)
            self.val_x, self.val_y = x[val_idx], y[val_idx]
            x, y, raw = x[tr_idx], y[tr_idx], raw[tr_idx]
            if latent is not None:
                self.val_latent, latent = latent[val_idx], latent[tr_idx]
        self.train_latent, self.test_latent = latent, data.get("test_latent")
        self.latent_classes = data.get("latent_classes") or []
        self.norm = (float(x.mean()), float(x.std())) if standardize else (0.0, 1.0)
        self.train_x, self.train_y, self.raw, self.augment = x, y, raw, augment
        self.classes = data["classes"]
        self.test_x, self.test_y = (data["test_x"].float() - self.norm[0]) / self.norm[1], data["test_y"]
        if self.val_x is not None:
            self.val_x = (self.val_x - self.norm[0]) / self.norm[1]

    @property
    def eval_split(self) -> tuple[Tensor, Tensor, str]:
        """(x, y, metric name) evaluated after epochs: validation, or test when there is none."""
        if self.val_x is not None:
            return self.val_x, self.val_y, "val_err"
        return self.test_x, self.test_y, "test_err"

    def batches(self, run: Run, phase: str, epoch: int, batch_size: int):
        """This epoch's shuffled (and augmented) minibatches, :func:`minibatches`; on a CUDA ``run.device``
        gathered (and augmented) there (:class:`DigitFeed`, made once per device)."""
        return minibatches(run, phase, epoch, self.train_x, self.train_y, batch_size, self.norm, self.raw,
                           self.augment, feed=self.feed(run.device))

    def feed(self, device: torch.device | str | None) -> DigitFeed | None:
        """The :class:`DigitFeed` of the training split on ``device``; None on the CPU (the host path)."""
        if device is None or torch.device(device).type == "cpu":
            return None
        feeds = self.__dict__.setdefault("_feeds", {})
        key = str(device)
        if key not in feeds:
            feeds[key] = DigitFeed(self.train_x, self.train_y, device, self.raw, self.augment)
        return feeds[key]
