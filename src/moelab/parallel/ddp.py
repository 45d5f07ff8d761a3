"""Data-parallel training on torch.distributed: set-up from torchrun's environment and small helpers.

Launched by ``torchrun`` (or ``moelab run --nproc N``), every process runs the same experiment;
:func:`maybe_init_from_env` joins the process group (gloo on CPU, nccl on GPU, with a timeout so a
lost peer ends the job instead of hanging for gloo's default 30 minutes). An experiment then uses

    model = wrap_model(model)                          # DDP when world > 1, the model itself otherwise
    for idx, w in shard_indices(n, gen, batch_size=B, with_weights=True):  # this rank's share of each
        loss = F.cross_entropy(model(x[idx]), y[idx]) * w                  # global batch of B
    acc = all_reduce_mean(correct / total, weight=total)  # metrics over all ranks

so that the global batch, and the averaged gradient, are the single-process ones.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.errors import MoelabError

#: seconds a collective may wait for a peer before the job fails (MOELAB_DIST_TIMEOUT overrides)
DEFAULT_TIMEOUT_S = 300.0

__all__ = [
    "DistContext", "current", "maybe_init_from_env", "init", "default_device", "wrap_model", "unwrap",
    "shard_indices", "local_share", "loss_weight", "all_reduce_mean", "all_reduce_sum", "barrier",
]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current() -> DistContext:
    """The process's place in the job (rank 0 of 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def _timeout_s() -> float:
    return float(os.environ.get("MOELAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there, else cpu. A LOCAL_RANK without a GPU of its own is refused
    (MoelabError): two ranks on one GPU is an error in NCCL ("Duplicate GPU detected")."""
    if torch.cuda.is_available():
        local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= count:
            procs = os.environ.get("LOCAL_WORLD_SIZE", str(local + 1))
            raise MoelabError(f"{procs} processes on this machine need one GPU each, but torch sees {count} GPU(s) "
                              f"(this is LOCAL_RANK {local}); start at most {count} processes per machine, or "
                              f"run on the CPU (--device cpu, gloo).")
        return torch.device("cuda", local)
    return torch.device("cpu")


def init(backend: str | None = None, timeout_s: float | None = None, **kw) -> DistContext:
    """``init_process_group`` from the env (RANK, WORLD_SIZE, MASTER_ADDR/PORT) with a finite timeout.

    backend: "nccl" when CUDA is available, else "gloo". Under nccl each process first takes its own GPU
    (:func:`default_device`); a gloo job (a CPU run, even on a GPU machine) picks none."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    # torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, evaluated at its
    # first import (DDP pulls it in, through torch._dynamo). Imported after init_process_group, they would
    # hold the default group for good: destroy_process_group could not free it, gloo's worker threads would
    # outlive the interpreter, and one freeing a collective's tensor during shut-down aborts the process
    # ("terminate called without an active exception", SIGABRT, now and then). Imported first, they hold None.
    importlib.import_module("torch.distributed.nn")
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else _timeout_s())
    dist.init_process_group(backend=backend, timeout=timeout, **kw)
    return current()


@contextlib.contextmanager
def maybe_init_from_env(backend: str | None = None) -> Iterator[DistContext]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1), tear it down after;
    ``backend`` as in :func:`init` (a CPU run on a GPU machine passes "gloo").

    Test hook: ``MOELAB_FAIL_RANK=r`` makes rank r raise right after joining while the other ranks
    wait in a barrier, i.e. the situation where a launcher without failure handling would hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    ctx = init(backend)
    try:
        _maybe_inject_failure(ctx)
        yield ctx
        dist.barrier()  # no rank tears its process group down while another still talks to it
    finally:
        dist.destroy_process_group()


def _maybe_inject_failure(ctx: DistContext) -> None:
    fail = os.environ.get("MOELAB_FAIL_RANK")
    if fail is None:
        return
    if ctx.rank == int(fail):
        raise MoelabError(f"injected failure on rank {ctx.rank} (MOELAB_FAIL_RANK={fail})")
    dist.barrier()


# ------------------------------------------------------------------ model
def require_single_process(what: str) -> None:
    """Raise a MoelabError naming ``what`` when running under torch.distributed with world > 1: for
    experiments that do not shard their work (every rank would repeat the whole job)."""
    ctx = current()
    if ctx.enabled and ctx.world_size > 1:
        raise MoelabError(f"{what} runs in one process only; it does not shard its work over the "
                          f"{ctx.world_size} ranks (each would repeat the whole job). Run it without --nproc / "
                          f"torchrun. Data-parallel built-ins: the modern jacobs experiments (digits-jacobs, "
                          f"mnist-jacobs).")


#: buffers that hold this rank's own tallies: a bias-balanced router's ``expert_load`` (its tokens per expert
#: since the last optimiser step, summed over ranks by ``Router.update_bias``)
RANK_LOCAL_BUFFERS = ("expert_load",)


def wrap_model(model: nn.Module, *, ignore: list[str] | None = None, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` when world > 1, ``model`` itself otherwise.

    Parameters marked as expert shards (``param._moelab_expert_shard``, set by
    :class:`~moelab.parallel.expert_parallel.ExpertParallelMoE`) are left out of DDP's all-reduce,
    as are the names in ``ignore``; call :func:`~moelab.parallel.expert_parallel.sync_expert_grads`
    after ``backward`` for those. Rank-local buffers (:data:`RANK_LOCAL_BUFFERS`) are left out of DDP's
    broadcast from rank 0 before each forward. On GPU, ``device_ids`` defaults to the model's device. Let the DDP
    model go (return from the function holding it) before the process group is destroyed.
    """
    if not current().enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = [n for n, p in model.named_parameters() if getattr(p, "_moelab_expert_shard", False)]
    names += [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in RANK_LOCAL_BUFFERS]
    names += list(ignore or [])
    if names:
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda and "device_ids" not in ddp_kwargs:
        ddp_kwargs["device_ids"] = [p.device.index]
    return DDP(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for state_dict / checkpoints)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------- data
def shard_indices(
    n: int, generator: torch.Generator | None = None, *, batch_size: int | None = None,
    drop_last: bool = False, with_weights: bool = False, ctx: DistContext | None = None,
) -> list[Tensor] | list[tuple[Tensor, float]]:
    """This rank's indices of each global batch.

    The global order is ``randperm(n, generator)`` (``arange(n)`` without a generator), the same on
    every rank when the generator has the same seed; it is cut into global batches of ``batch_size``
    (one batch of ``n`` if None) and each batch into ``world`` contiguous parts (sizes differ by at
    most one). Concatenating the ranks' parts gives back the single-process batch.
    Returns a list of (n_local,) long tensors, one per global batch; with ``with_weights`` a list of
    ``(indices, loss_weight(len(indices), len(global batch)))`` pairs."""
    ctx = ctx or current()
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    bs = batch_size or n
    batches = list(order.split(bs))
    if drop_last and batches and batches[-1].numel() < bs:
        batches.pop()
    if with_weights:
        return [(local_share(b, ctx), loss_weight(len(local_share(b, ctx)), len(b), ctx)) for b in batches]
    return [local_share(b, ctx) for b in batches]


def local_share(batch: Tensor, ctx: DistContext | None = None) -> Tensor:
    """Rank r's contiguous part of a global batch (N, ...) -> (N_r, ...), N_r = N // W or N // W + 1."""
    ctx = ctx or current()
    return batch.tensor_split(ctx.world_size)[ctx.rank] if ctx.enabled else batch


def loss_weight(local_n: int, global_n: int, ctx: DistContext | None = None) -> float:
    """Factor for a rank's mean loss so that DDP's gradient average is the global-batch mean gradient:
    ``W * local_n / global_n`` (1.0 when the batch divides evenly or world == 1)."""
    ctx = ctx or current()
    return ctx.world_size * local_n / global_n if global_n else 0.0


# -------------------------------------------------------------- reductions
def all_reduce_sum(value: float | Tensor) -> float | Tensor:
    """Sum over ranks (a float comes back as a float); identity when not distributed."""
    if not current().enabled:
        return value
    t = value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(default_device())
    dist.all_reduce(t)
    return t.to(value.device) if torch.is_tensor(value) else float(t)


def all_reduce_mean(value: float | Tensor, weight: float | None = None) -> float | Tensor:
    """Mean over ranks; with ``weight`` (e.g. this rank's sample count) the weighted mean
    ``sum(w_r * v_r) / sum(w_r)``, which is the global metric when ranks hold unequal shares."""
    ctx = current()
    if not ctx.enabled:
        return value
    if weight is None:
        return all_reduce_sum(value) / ctx.world_size
    num = all_reduce_sum(value * weight if torch.is_tensor(value) else float(value) * weight)
    return num / all_reduce_sum(float(weight))


def barrier() -> None:
    if current().enabled:
        dist.barrier()
