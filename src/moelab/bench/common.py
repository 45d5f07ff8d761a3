"""Shared benchmark helpers: dtype contexts, interleaved timing, plain-text tables."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from moelab.errors import MoelabError

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def amp_context(dtype: str, device: str = "cpu") -> Callable[[], contextlib.AbstractContextManager]:
    """fp32 -> no autocast; bf16 -> ``torch.autocast(device, torch.bfloat16)`` (fp32 weights, mixed precision)."""
    if dtype not in DTYPES:
        raise MoelabError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    amp = DTYPES[dtype]
    if amp is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device, dtype=amp)


def sync(device: str | torch.device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 5,
                     device: str = "cpu", cpu_time: bool = False) -> dict[str, float]:
    """Median seconds per call of each fn. Calls are interleaved round-robin (one of each per repeat)
    so that a noisy, shared machine slows every implementation alike.

    cpu_time: measure this process's CPU time instead of wall time. On a machine shared with other
    jobs this excludes the time the process was descheduled; meaningful with one intra-op thread
    (with more, it also counts threads spinning at barriers)."""
    clock = time.process_time if cpu_time else time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec) -> aligned text table."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
