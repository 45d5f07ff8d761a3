"""The training loop: plain epochs, a checkpoint after each, resumable.

One *phase* is one model trained for some epochs (an experiment may have several:
the mixture, then the single-network baseline). ``train_phase`` checkpoints the
model, optimizer, scheduler, RNG state and epoch atomically at the end of each
epoch; started again on the same run directory it continues after the last
finished epoch, and skips a phase that had finished. Batch order must come from
``run.generator(phase, epoch)`` so a resumed epoch sees the same batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moelab import kernels
from moelab.device import to_device
from moelab.errors import MoelabError
from moelab.moe.routers import bias_balanced, update_router_biases
from moelab.parallel import ddp
from moelab.train.checkpoint import (
    KILL_ENV,
    load_checkpoint,
    maybe_test_kill,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
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
                    meter: dict | None = None) -> dict:
    """One epoch of minibatch training: the loop every experiment shares.

    ``batches`` yields ``(xb, y, loss_weight)`` (``xb`` is whatever ``forward`` takes: a tensor, or the
    indices and flips of a batch that ``forward`` builds itself), moved with ``y`` to ``device`` (None:
    where they are; see :mod:`moelab.device`); ``forward(xb)`` runs under autocast (bf16 when asked) and
    ``loss_fn(out, y) -> (loss, aux or None)`` outside it; one optimiser + scheduler step per batch on
    ``(loss + aux) * loss_weight``. ``progress`` (:meth:`moelab.train.run.Run.progress`) counts the
    examples; ``meter`` accumulates ``images`` and ``seconds``. Returns the epoch's mean ``loss`` (and ``aux`` when there is one) over examples, summed
    over data-parallel ranks, the last learning rate and this process's examples per second. After each step
    the bias-balanced routers (``balance="bias"``) move their expert biases (:func:`update_router_biases`).

    Host syncs: none per step (the sums stay tensors); one at the end of the epoch."""
    model.train()
    balanced = bias_balanced(model)
    device_type = device.type if device is not None else "cpu"
    tot = None  # (sum of loss * n, sum of aux * n) on the loss's device: no host sync per step
    has_aux, seen, t0 = False, 0, time.perf_counter()
    with progress if progress is not None else contextlib.nullcontext():
        for xb, yb, w in batches:
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


def train_phase(
    run: Run,
    phase: str,
    model: nn.Module,
    opt: torch.optim.Optimizer | None,
    epochs: int,
    train_epoch: Callable[[int], dict],
    evaluate: Callable[[int], dict] | None = None,
    sched=None,
    log_every: int = 1,
    checkpoint_every: int = 1,
) -> dict:
    """Run ``train_epoch(epoch) -> metrics`` for ``epochs`` epochs with per-epoch checkpoints.

    ``evaluate(epoch) -> metrics`` (validation) runs after each epoch whose number is a multiple of
    ``log_every`` and after the last one; a checkpoint is written every ``checkpoint_every`` epochs and
    after the last (full-batch training, where an epoch is one step, sets it higher). Returns the last row.

    The phase's clock (:data:`PHASE_TIMES`: ``train_s``, the ``train_epoch`` calls; ``elapsed_s``, those
    plus the validation passes) is saved in every checkpoint and goes on from there on resume, so a
    resumed phase reports the time an uninterrupted one would; ``run.phase_times[phase]`` holds it. One-off
    costs (building the fused kernels, loading a checkpoint) happen before the clock starts.
    """
    meta = load_phase(run, phase, model, opt, sched) if run.resumed else None
    start = 0
    last: dict = {}
    times = dict.fromkeys(PHASE_TIMES, 0.0)
    if meta is not None:
        start = meta["epoch"] + 1
        last = meta.get("extra", {}).get("last", {})
        times.update({k: float(v) for k, v in meta.get("times", {}).items() if k in times})
        if meta.get("done"):
            run.log(f"[{phase}] already finished (epoch {meta['epoch'] + 1}); restored from checkpoint.")
            run.phase_times[phase] = times
            return last
        run.log(f"[{phase}] resuming after epoch {start}.")
    load_kernels_for(model)
    for epoch in range(start, epochs):
        row = {"phase": phase, "epoch": epoch + 1}
        t0 = time.perf_counter()
        with _kill_on_forward(model, phase, epoch + 1, "mid_epoch", nth=2):
            row.update(train_epoch(epoch))
        t_train = time.perf_counter()
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise NonFiniteLoss(
                    f"phase '{phase}': metric '{k}' became {v} at epoch {epoch + 1}; training stopped. "
                    f"The last good checkpoint (end of the previous epoch) is kept."
                )
        if evaluate is not None and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
            model.eval()
            with torch.no_grad(), _kill_on_forward(model, phase, epoch + 1, "evaluate", nth=1):
                row.update(evaluate(epoch))
        times["train_s"] += t_train - t0
        times["elapsed_s"] += time.perf_counter() - t0
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            run.metric(**row)
            run.log("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
        last = row
        if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs:
            save_phase(run, phase, model, opt, sched, epoch, done=epoch + 1 == epochs, extra={"last": row},
                       times=times)
    if start >= epochs:  # zero epochs asked for: still mark the phase done
        save_phase(run, phase, model, opt, sched, epochs - 1, done=True, extra={"last": last}, times=times)
    run.phase_times[phase] = times
    return last


PHASE_TIMES = ("train_s", "elapsed_s")
SPARSE_ROUTERS = ("topk", "noisy_topk", "switch", "hash")  # the routers whose path uses moelab.kernels


def load_kernels_for(model: nn.Module) -> None:
    """Build or load the fused CPU kernels now if ``model`` will use them (a CPU sparse MoE layer), so
    that the one-off build (tens of seconds, once per machine) never lands inside a timed phase."""
    from moelab.moe.layer import MoE

    sparse = any(isinstance(m, MoE) and getattr(m.router, "name", None) in SPARSE_ROUTERS for m in model.modules())
    if sparse and any(p.device.type == "cpu" for p in model.parameters()):
        kernels.load()


@contextlib.contextmanager
def _kill_on_forward(model: nn.Module, phase: str, epoch: int, point: str, nth: int):
    """Test hook (``$MOELAB_TEST_KILL_AT``, see ``checkpoint.maybe_test_kill``): die at the model's
    ``nth`` forward call inside the block, or at its end if there were fewer."""
    if os.environ.get(KILL_ENV) != f"{phase}:{epoch}:{point}":
        yield
        return
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] >= nth:
            maybe_test_kill(phase, epoch, point)

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    maybe_test_kill(phase, epoch, point)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
