"""Where an experiment computes: ``--device cpu | cuda | cuda:N | auto``.

The convention every experiment follows: data sets are loaded on the host (uint8 images, small tensors);
each training batch reaches the device through :mod:`moelab.data.feed` (small data sets live on a CUDA
device and their batches are gathered and augmented there; larger ones are gathered on the host into
pinned memory and copied asynchronously), each prediction batch through the experiment's predict
function, and model outputs come back to the host (:func:`to_host`) for metrics, reports and checkpoints.
Autocast runs on the device's type.

:func:`resolve_device` also sets torch's per-process CUDA options for a CUDA device (:func:`configure`):
TF32 matmuls and convolutions for fp32 work, cuDNN autotuning. A CPU run leaves them as they are.
"""

from __future__ import annotations

import os

import torch

from moelab.errors import MoelabError

__all__ = ["DEVICES", "TF32_ENV", "configure", "count_syncs", "resolve_device", "to_device", "to_host"]

DEVICES = ("auto", "cpu", "cuda")

#: ``MOELAB_TF32=0`` keeps fp32 matmuls and convolutions on CUDA in full fp32 (default: TF32)
TF32_ENV = "MOELAB_TF32"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA when it is available, else the CPU; ``"cuda"``: this process's GPU
    (``cuda:LOCAL_RANK`` under torchrun); ``"cuda:N"``: that GPU; ``"cpu"``. A CUDA device on a machine
    without one is refused with the reason, and so is ``"cuda"`` for a torchrun process whose LOCAL_RANK
    has no GPU of its own (NCCL refuses two ranks on one GPU). A CUDA result is :func:`configure`\\ d."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MoelabError(f"--device {spec}: no CUDA device is available here (torch {torch.__version__}, "
                              f"torch.cuda.is_available() is False); use --device cpu or --device auto.")
        count = torch.cuda.device_count()
        if name == "cuda":
            local = int(os.environ.get("LOCAL_RANK", 0))
            if local >= count:
                procs = os.environ.get("LOCAL_WORLD_SIZE", str(local + 1))
                raise MoelabError(f"--device {spec}: {procs} processes on this machine need one GPU each, but torch "
                                  f"sees {count} GPU(s) (this is LOCAL_RANK {local}); start at most {count} "
                                  f"processes per machine, or use --device cpu.")
            dev = torch.device("cuda", local)
        else:
            index = name[5:]
            if not index.isdigit() or int(index) >= count:
                raise MoelabError(f"--device {spec}: expected cuda:N with 0 <= N < {count} (the GPUs here).")
            dev = torch.device("cuda", int(index))
        configure(dev)
        return dev
    raise MoelabError(f"--device {spec!r}: expected one of auto, cpu, cuda or cuda:N.")


def configure(device: str | torch.device) -> None:
    """Per-process torch options for computing on ``device``; idempotent, and nothing for a CPU device.

    CUDA: fp32 matmuls (cuBLAS) and convolutions (cuDNN) in TF32 (10-bit mantissa products, fp32
    accumulation: the fp32 speed of Ampere and later GPUs; bf16 autocast runs are unaffected), unless
    ``MOELAB_TF32=0``; and ``cudnn.benchmark`` (cuDNN times its convolution algorithms once per input shape
    and keeps the fastest: the CNN families' fixed-shape batches; MLP-only models run no cuDNN convolution).
    Both trade bit-for-bit reproducibility between processes on CUDA (not on the CPU) for speed.

    Set through the long-standing flags (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``), which torch >= 2.9 mirrors into its ``fp32_precision`` settings."""
    if torch.device(device).type != "cuda":
        return
    tf32 = os.environ.get(TF32_ENV, "1").strip().lower() not in ("0", "false", "off", "no")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def to_device(obj, device: torch.device | None):
    """``obj`` (a tensor, or a tuple / list of tensors and other values) on ``device`` (None: as it is);
    host-to-GPU copies are asynchronous (they overlap with the host's work only from pinned memory: see
    :mod:`moelab.data.feed`)."""
    if device is None:
        return obj
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    return obj


def chunks_on(x: torch.Tensor, chunk: int, device: torch.device):
    """``x`` (on the host) in chunks of ``chunk`` rows on ``device``: for a GPU, pinned once and copied
    asynchronously, so the copy of the next chunk overlaps the work on this one; slices on the CPU."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    for i in range(0, x.shape[0], chunk):
        yield x[i:i + chunk].to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A model output on the CPU (a no-op there)."""
    return t if t.device.type == "cpu" else t.cpu()


SYNC_MESSAGE = "called a synchronizing CUDA operation"


def count_syncs(fn):
    """Run ``fn()`` with torch's CUDA sync debug mode at "warn": ``(fn's result, one line per host-device
    synchronisation it made)``, each line ``file:line`` of the Python code that called the synchronising op.

    A training step that reads nothing back to the host makes none (the sums of a logged metric, a shape
    read from a tensor, ``.item()``, ``.tolist()``, a blocking copy all do). Needs CUDA."""
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return out, [f"{w.filename}:{w.lineno}" for w in caught if SYNC_MESSAGE in str(w.message)]
