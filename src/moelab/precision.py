"""Whether bf16 autocast pays on this machine, and the ``bf16 = true | false | "auto"`` switch.

Why: bf16 autocast is fast only where the hardware computes in bf16. On a CPU with AMX or
AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later) oneDNN runs bf16 convolutions
and matmuls natively, up to ~9x faster than fp32 for large ones. On a CPU without them (AVX2 only)
PyTorch falls back to a reference convolution with bf16 emulated in software: measured on a 2-core
AMD EPYC (AVX2) VM, one seed-1 CIFAR CNN trained at 26 images/s in bf16 against 286 in fp32, and
inferred at 116 against 674. ``"auto"`` therefore means: bf16 where it is native, fp32 elsewhere.
"""

from __future__ import annotations

import functools
import logging

import torch

from moelab.errors import ConfigError

__all__ = ["AUTO", "cpu_bf16_isa", "fast_bf16", "resolve_bf16"]

log = logging.getLogger(__name__)
AUTO = "auto"


@functools.cache
def cpu_bf16_isa() -> str:
    """The best bf16 instruction set of this CPU: ``"amx"``, ``"avx512_bf16"`` or ``"none"``."""
    probes = (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, fn in probes:
        check = getattr(torch.cpu, fn, None)
        try:
            if check is not None and check():
                return name
        except RuntimeError:  # a torch built without the probe
            continue
    return "none"


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """True when bf16 autocast is expected to be faster than fp32 on ``device``."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_bf16_isa() != "none"
    return False


@functools.cache
def _warn_slow(device: str) -> None:
    log.warning("bf16 = true on a CPU without native bf16 (no AMX / AVX512-BF16): PyTorch emulates it, "
                "expect it several times slower than fp32; bf16 = \"auto\" picks fp32 here")


def resolve_bf16(value: bool | str, device: str | torch.device = "cpu", key: str = "bf16") -> bool:
    """``true``/``false`` as given (warning once when bf16 is slow here); ``"auto"``: :func:`fast_bf16`."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == AUTO:
            return fast_bf16(device)
        if v in ("true", "false"):
            value = v == "true"
        else:
            raise ConfigError(f"{key} must be true, false or \"auto\"; got {value!r}")
    if value and not fast_bf16(device):
        _warn_slow(str(torch.device(device).type))
    return bool(value)
