"""The one trainer: every family's models train through :class:`Trainer` and predict through :func:`predict`.

One *phase* is one model trained for some epochs (an experiment may have several: the mixture, then the
single-network baseline). :meth:`Trainer.fit` is the whole loop, in order: restore the phase's checkpoint
(a finished phase is skipped), then per epoch train (minibatches, or one full-batch epoch of the family's
own), evaluate, log, checkpoint. The checkpoint (model, optimizer, scheduler, RNG state, epoch and the
phase clock) is written atomically at the end of an epoch; started again on the same run directory the
phase continues after the last finished epoch. Batch order must come from ``run.generator(phase, epoch)``
so a resumed epoch sees the same batches. Functions in :data:`moelab.train.callbacks.CALLBACKS` are
called at fixed points of the loop (the tests' kill-at-a-moment hook is one).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from moelab import kernels
from moelab.device import chunks_on, to_device, to_host
from moelab.errors import MoelabError
from moelab.moe.routers import bias_balanced, update_router_biases
from moelab.parallel import ddp
from moelab.train.callbacks import fire
from moelab.train.checkpoint import (
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from moelab.train.optim import Optim, make_optimizer, make_schedule, param_groups
from moelab.train.run import Run


class NonFiniteLoss(MoelabError):
    """Training produced a NaN/inf loss."""


def check_finite(loss: torch.Tensor, phase: str, epoch: int, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(
            f"phase '{phase}': the loss became {loss.item()} at epoch {epoch + 1}, step {step}; training stopped. "
            f"The last good checkpoint (end of the previous epoch) is kept. Lower the learning rate or check the data."
        )


def seed_module_init(run: Run, phase: str) -> None:
    """Seed torch's global RNG (used by nn.Module init) from the run seed and the phase name, so each
    phase's initial weights depend on (seed, phase) only, not on what ran before it."""
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=run.generator("init", phase))))


def optimizer_step(opt, sched, objective: torch.Tensor) -> None:
    """One optimiser and scheduler step on ``objective``."""
    opt.zero_grad(set_to_none=True)
    objective.backward()
    opt.step()
    if sched is not None:
        sched.step()


def minibatch_epoch(model: nn.Module, opt, sched, batches, forward: Callable, loss_fn: Callable, *,
                    bf16: bool = False, device: torch.device | None = None, progress=None,
                    meter: dict | None = None, on_step: Callable[[int], None] | None = None) -> dict:
    """One epoch of minibatch training: the loop every experiment shares.

    ``batches`` yields ``(xb, y, loss_weight)`` (``xb`` is whatever ``forward`` takes: a tensor, or the
    indices and flips of a batch that ``forward`` builds itself), moved with ``y`` to ``device`` (None:
    where they are; see :mod:`moelab.device`); ``forward(xb)`` runs under autocast (bf16 when asked) and
    ``loss_fn(out, y) -> (loss, aux or None)`` outside it; one optimiser + scheduler step per batch on
    ``(loss + aux) * loss_weight``. ``progress`` (:meth:`moelab.train.run.Run.progress`) counts the
    examples; ``meter`` accumulates ``images`` and ``seconds``. Returns the epoch's mean ``loss`` (and ``aux`` when there is one) over examples, summed
    over data-parallel ranks, the last learning rate and this process's examples per second. After each step
    the bias-balanced routers (``balance="bias"``) move their expert biases (:func:`update_router_biases`)
    and ``on_step(step)`` runs (the trainer's ``step`` callback point).

    Host syncs: none per step (the sums stay tensors); one at the end of the epoch."""
    model.train()
    balanced = bias_balanced(model)
    device_type = device.type if device is not None else "cpu"
    tot = None  # (sum of loss * n, sum of aux * n) on the loss's device: no host sync per step
    has_aux, seen, t0 = False, 0, time.perf_counter()
    with progress if progress is not None else contextlib.nullcontext():
        for step, (xb, yb, w) in enumerate(batches, 1):
            xb, yb = to_device(xb, device), to_device(yb, device)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(xb)
            loss, aux = loss_fn(out, yb)
            has_aux = has_aux or aux is not None
            aux = torch.zeros((), device=loss.device) if aux is None else aux
            optimizer_step(opt, sched, (loss + aux) * w)
            update_router_biases(balanced)
            batch_sums = torch.stack([loss.detach().double(), aux.detach().double()]) * len(yb)
            tot = batch_sums if tot is None else tot + batch_sums
            seen += len(yb)
            if on_step is not None:
                on_step(step)
            if progress is not None:
                progress.update(len(yb))
    sums = torch.zeros(2, dtype=torch.float64) if tot is None else tot.cpu()  # the epoch's one host sync
    tot = ddp.all_reduce_sum(torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64)]))
    dt = time.perf_counter() - t0
    if meter is not None:
        meter["images"] = meter.get("images", 0) + seen
        meter["seconds"] = meter.get("seconds", 0.0) + dt
    row = {"loss": float(tot[0] / tot[2])} if tot[2] else {}  # no batch (e.g. a step budget already spent)
    if has_aux and tot[2]:
        row["aux"] = float(tot[1] / tot[2])
    return {**row, "lr": opt.param_groups[0]["lr"], "img_per_s": round(seen / max(dt, 1e-9), 1)}


def _sched_state(sched) -> dict:
    if sched is None:
        return {}
    return {k: v for k, v in sched.state_dict().items() if _is_json(v)}


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def rng_states() -> dict[str, torch.Tensor]:
    """The global RNG state of every device this process draws from: the CPU's, and each CUDA device's
    once CUDA is initialised (dropout and noisy routing on a GPU draw from the device's generator)."""
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_states(tensors: dict[str, torch.Tensor], path) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if not cuda:
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() < len(cuda):
        raise MoelabError(f"checkpoint '{path}' holds the RNG state of {len(cuda)} CUDA device(s) and this machine "
                          f"has {torch.cuda.device_count() if torch.cuda.is_available() else 0}; resume it where "
                          f"it ran, or start a new run.")
    torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_phase(run: Run, phase: str, model: nn.Module, opt, sched, epoch: int, done: bool, extra: dict | None = None,
               times: dict | None = None):
    if not run.is_main:
        return
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    otensors, ometa = optimizer_to_tensors(opt) if opt is not None else ({}, {})
    tensors.update(otensors)
    tensors.update(rng_states())
    meta = {
        "phase": phase,
        "epoch": epoch,
        "done": done,
        "optim": ometa,
        "sched": _sched_state(sched),
        "metrics_lines": run.metrics_lines,
        "times": times or {},
        "extra": extra or {},
    }
    save_checkpoint(run.checkpoint_path(phase), tensors, meta)


def load_phase(run: Run, phase: str, model: nn.Module, opt, sched) -> dict | None:
    """Restore a phase's checkpoint into model/opt/sched; returns its meta, or None if there is none."""
    path = run.checkpoint_path(phase)
    if not path.is_file():
        return None
    tensors, meta = load_checkpoint(path)
    msd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(msd)
    except RuntimeError as e:
        raise MoelabError(f"checkpoint '{path}' does not fit this model (another config?): {e}") from None
    if opt is not None and meta.get("optim"):
        optimizer_from_tensors(opt, tensors, meta["optim"])
    if sched is not None and meta.get("sched"):
        sched.load_state_dict({**sched.state_dict(), **meta["sched"]})
    set_rng_states(tensors, path)
    return meta


PHASE_TIMES = ("train_s", "elapsed_s")
SPARSE_ROUTERS = ("topk", "noisy_topk", "switch", "hash")  # the routers whose path uses moelab.kernels


def load_kernels_for(model: nn.Module) -> None:
    """Build or load the fused CPU kernels now if ``model`` will use them (a CPU sparse MoE layer), so
    that the one-off build (tens of seconds, once per machine) never lands inside a timed phase."""
    from moelab.moe.layer import MoE

    sparse = any(isinstance(m, MoE) and getattr(m.router, "name", None) in SPARSE_ROUTERS for m in model.modules())
    if sparse and any(p.device.type == "cpu" for p in model.parameters()):
        kernels.load()


class Trainer:
    """Trains one model of a run (a *phase*): its optimiser and schedule, the epoch loop, evaluation,
    checkpoints and resume (:meth:`fit`).

    ``opt`` / ``sched``: the family's recipe (:meth:`from_recipe` builds the :class:`Optim` one); the
    schedule steps after every optimiser step, except a ``ReduceLROnPlateau``, which the family's
    ``evaluate`` steps on its validation metric;
    ``bf16`` / ``device``: the minibatch forward's autocast and where batches go; ``log_every``: the
    validation pass and the logged metric row every that many epochs (and after the last);
    ``checkpoint_every``: likewise for checkpoints (full-batch training, an epoch a step, sets it
    higher). ``meter`` counts the ``images`` and ``seconds`` of the minibatch epochs this process ran."""

    def __init__(self, run: Run, phase: str, model: nn.Module, opt: torch.optim.Optimizer | None = None,
                 sched=None, *, epochs: int, bf16: bool = False, device: torch.device | None = None,
                 log_every: int = 1, checkpoint_every: int = 1):
        self.run, self.phase, self.model, self.opt, self.sched = run, phase, model, opt, sched
        self.epochs, self.bf16, self.device = epochs, bf16, device
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.meter = {"images": 0, "seconds": 0.0}

    @classmethod
    def from_recipe(cls, run: Run, phase: str, model: nn.Module, t: Optim, *, epochs: int, steps_per_epoch: int,
                    lr: float | None = None, routing_lr_scale: float = 1.0, **kw) -> Trainer:
        """A trainer whose optimiser and per-step schedule are ``t``'s (:mod:`moelab.train.optim`), at ``lr``
        (default ``t.lr``), the routing parameters at ``routing_lr_scale`` times it."""
        lr = t.lr if lr is None else lr
        opt = make_optimizer(t, param_groups(model, lr, routing_lr_scale), lr)
        return cls(run, phase, model, opt, make_schedule(t, opt, epochs * steps_per_epoch), epochs=epochs, **kw)

    @property
    def img_per_s(self) -> float:
        """Training speed of the minibatch epochs this process ran (nan: none)."""
        return self.meter["images"] / self.meter["seconds"] if self.meter["seconds"] else float("nan")

    def fit(self, batches: Callable[[int], Iterable] | None = None, forward: Callable | None = None,
            loss: Callable | None = None, *, epoch_fn: Callable[[int], dict] | None = None,
            evaluate: Callable[[int], dict] | None = None, progress: Callable[[int], int] | None = None,
            stopped: Callable[[int], bool] | None = None) -> dict:
        """Train the epochs a checkpoint has not done yet -> the last epoch's row.

        An epoch trains on the minibatches ``batches(epoch)`` (:func:`minibatch_epoch` with ``forward``
        and ``loss``; a bar counts ``progress(epoch)`` examples), or runs ``epoch_fn(epoch) -> row`` (a
        full-batch epoch: the family's own update); one for which ``stopped(epoch)`` (early stopping)
        trains nothing and logs ``stopped = 1``. ``evaluate(epoch) -> row`` (eval mode, no gradients)
        runs on the logged epochs.

        The phase's clock (:data:`PHASE_TIMES`: ``train_s``, the training; ``elapsed_s``, that plus the
        validation passes) is saved in every checkpoint and goes on from there on resume, so a resumed
        phase reports the time an uninterrupted one would; ``run.phase_times[phase]`` holds it. One-off
        costs (building the fused kernels, loading a checkpoint) happen before the clock starts."""
        run, phase, model = self.run, self.phase, self.model
        meta = load_phase(run, phase, model, self.opt, self.sched) if run.resumed else None
        start, last, times = 0, {}, dict.fromkeys(PHASE_TIMES, 0.0)
        if meta is not None:
            start, last = meta["epoch"] + 1, meta.get("extra", {}).get("last", {})
            times.update({k: float(v) for k, v in meta.get("times", {}).items() if k in times})
            if meta.get("done"):
                run.log(f"[{phase}] already finished (epoch {meta['epoch'] + 1}); restored from checkpoint.")
                run.phase_times[phase] = times
                return last
            run.log(f"[{phase}] resuming after epoch {start}.")
        load_kernels_for(model)
        for epoch in range(start, self.epochs):
            logged = (epoch + 1) % self.log_every == 0 or epoch + 1 == self.epochs
            fire("epoch_start", run=run, phase=phase, epoch=epoch, model=model)
            t0 = time.perf_counter()
            row = {"phase": phase, "epoch": epoch + 1}
            if stopped is not None and stopped(epoch):
                row["stopped"] = 1
            elif epoch_fn is not None:
                row.update(epoch_fn(epoch))
            else:
                row.update(self.minibatch(epoch, batches(epoch), forward, loss,
                                          progress(epoch) if progress is not None else None))
            t_train = time.perf_counter()
            fire("train_end", phase=phase, epoch=epoch)
            check_finite_row(row, phase, epoch)
            if evaluate is not None and logged:
                fire("evaluate", phase=phase, epoch=epoch)
                model.eval()
                with torch.no_grad():
                    row.update(evaluate(epoch))
            times["train_s"] += t_train - t0
            times["elapsed_s"] += time.perf_counter() - t0
            if logged:
                run.metric(**row)
                run.log("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
            last = row
            if (epoch + 1) % self.checkpoint_every == 0 or epoch + 1 == self.epochs:
                save_phase(run, phase, model, self.opt, self.sched, epoch, done=epoch + 1 == self.epochs,
                           extra={"last": row}, times=times)
            fire("epoch_end", phase=phase, epoch=epoch, row=row)
        if start >= self.epochs:  # zero epochs asked for: still mark the phase done
            save_phase(run, phase, model, self.opt, self.sched, self.epochs - 1, done=True, extra={"last": last},
                       times=times)
        run.phase_times[phase] = times
        return last

    def minibatch(self, epoch: int, batches: Iterable, forward: Callable, loss: Callable,
                  examples: int | None = None) -> dict:
        """One minibatch epoch (:func:`minibatch_epoch`) with the trainer's optimiser, schedule and meter."""
        bar = self.run.progress(f"[{self.phase}] epoch {epoch + 1}", examples) if examples is not None else None

        def on_step(step: int) -> None:
            fire("step", phase=self.phase, epoch=epoch, step=step)

        per_step = None if isinstance(self.sched, ReduceLROnPlateau) else self.sched  # plateau: the family's evaluate
        return minibatch_epoch(self.model, self.opt, per_step, batches, forward, loss, bf16=self.bf16,
                               device=self.device, progress=bar, meter=self.meter, on_step=on_step)


def check_finite_row(row: dict, phase: str, epoch: int) -> None:
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise NonFiniteLoss(
                f"phase '{phase}': metric '{k}' became {v} at epoch {epoch + 1}; training stopped. "
                f"The last good checkpoint (end of the previous epoch) is kept."
            )


class Batches(Protocol):
    """Examples that build their own batches on their device (:class:`moelab.experiments.cifar.Images`)."""

    def __len__(self) -> int: ...

    def batch(self, idx: Tensor) -> Any: ...


@torch.no_grad()
def predict(fn: Callable, inputs: Tensor | Batches, *, batch: int, device: torch.device | None = None,
            bf16: bool = False, tta: int = 0) -> list[Tensor]:
    """``fn`` over ``inputs`` in batches -> each of its outputs, float, on the host, concatenated over the
    examples (dim 0; dim 1 of a 3-D ``(E, N, ...)`` stack of per-expert outputs).

    ``inputs``: a host tensor, sent to ``device`` in chunks of ``batch`` rows (:func:`chunks_on`; None:
    used where it is), or :class:`Batches`. ``fn(x)`` returns a tensor or a tuple of them and runs under
    bf16 autocast when ``bf16`` (on ``device``, else the CPU). ``tta`` (test-time augmentation of NCHW
    images): 1 averages the first output (the scores) with that of the mirrored images; 2 then averages
    that with the mean over two 1-pixel diagonal shifts (reflect padding), each itself flip-averaged.
    The other outputs come from the plain images. Put the model in eval mode first."""
    if torch.is_tensor(inputs):
        xs = chunks_on(inputs, batch, device) if device is not None else inputs.split(batch)
    else:
        xs = (inputs.batch(torch.arange(i, min(i + batch, len(inputs)))) for i in range(0, len(inputs), batch))
    device_type = device.type if device is not None else "cpu"
    outs: list[list[Tensor]] = []
    for x in xs:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            o = fn(x)
            o = list(o) if isinstance(o, tuple | list) else [o]
            if tta >= 1:
                o[0] = 0.5 * o[0].float() + 0.5 * _first(fn(x.flip(3))).float()
            if tta >= 2:
                pad = F.pad(x, (1, 1, 1, 1), mode="reflect")
                shifted = [pad[:, :, :-2, :-2], pad[:, :, 2:, 2:]]  # any image size (a rotate task's crop)
                t = torch.stack([0.5 * _first(fn(s)).float() + 0.5 * _first(fn(s.flip(3))).float() for s in shifted])
                o[0] = 0.5 * o[0] + 0.5 * t.mean(0)
        outs.append([to_host(t.float()) for t in o])
    return [torch.cat(parts, dim=1 if parts[0].dim() == 3 else 0) for parts in zip(*outs, strict=True)]


def _first(out) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
