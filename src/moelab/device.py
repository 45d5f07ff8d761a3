"""Where an experiment computes: ``--device cpu | cuda | cuda:N | auto``.

The convention every experiment follows: data sets stay on the host (uint8 images, small tensors);
each training batch is moved to the device by :func:`moelab.train.loop.minibatch_epoch`, each
prediction batch by the experiment's predict function, and model outputs come back to the host
(:func:`to_host`) for metrics, reports and checkpoints. Autocast runs on the device's type.
"""

from __future__ import annotations

import os

import torch

from moelab.errors import MoelabError

__all__ = ["DEVICES", "resolve_device", "to_device", "to_host"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA when it is available, else the CPU; ``"cuda"``: this process's GPU
    (``cuda:LOCAL_RANK`` under torchrun); ``"cuda:N"``: that GPU; ``"cpu"``. A CUDA device on a machine
    without one is refused with the reason."""
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
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % count)
        index = name[5:]
        if not index.isdigit() or int(index) >= count:
            raise MoelabError(f"--device {spec}: expected cuda:N with 0 <= N < {count} (the GPUs here).")
        return torch.device("cuda", int(index))
    raise MoelabError(f"--device {spec!r}: expected one of auto, cpu, cuda or cuda:N.")


def to_device(obj, device: torch.device | None):
    """``obj`` (a tensor, or a tuple / list of tensors and other values) on ``device`` (None: as it is);
    host-to-GPU copies are asynchronous."""
    if device is None:
        return obj
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    return obj


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A model output on the CPU (a no-op there)."""
    return t if t.device.type == "cpu" else t.cpu()
