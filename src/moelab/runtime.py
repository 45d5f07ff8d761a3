"""Process-level CPU runtime settings: the heap allocator.

Why: glibc's malloc serves large blocks (above a threshold that adapts up to 32 MiB) with ``mmap``
and gives them back to the kernel on ``free``. A CPU training step allocates and frees the same
large activation and gradient tensors every step, so each step page-faults (and the kernel zeroes)
all of that memory again. Measured with ``moelab bench layer`` on the 2-core development VM, this
cost 20-45% of a forward + backward of an MoE layer with 33M expert parameters (d=512, h=2048,
E=16), more than the routing and dispatch together, and made timings vary by +-20% between runs.

:func:`tune_allocator` tells glibc to keep freed memory in the heap (no ``mmap`` for large blocks,
no trimming), as jemalloc or tcmalloc would: the process keeps its peak heap instead of returning
it between steps. The ``moelab`` command calls it at start-up; set ``MOELAB_MALLOC=default`` to
leave glibc's settings alone. Library users can call it themselves. A no-op off glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator", "allocator_state", "torch_threads", "MALLOC_ENV"]

MALLOC_ENV = "MOELAB_MALLOC"

# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_state = "default"


def tune_allocator() -> str:
    """Keep freed memory in the process heap (glibc only). Returns the resulting state: "tuned",
    "default" (``$MOELAB_MALLOC=default``) or "unsupported" (not Linux/glibc)."""
    global _state
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "default":
        return _state
    if _state == "tuned":
        return _state
    if not sys.platform.startswith("linux"):
        _state = "unsupported"
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        _state = "unsupported"
        return _state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all((
        mallopt(_M_MMAP_MAX, 0),  # large blocks come from the heap, not from mmap
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),  # never hand the top of the heap back
        mallopt(_M_TOP_PAD, 256 * 2**20),  # grow the heap in 256 MiB steps
    ))
    _state = "tuned" if ok else "unsupported"
    return _state


def allocator_state() -> str:
    """"tuned", "default" or "unsupported": what :func:`tune_allocator` left (for benchmark output)."""
    return _state


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` inside the block (``n`` = 0: leave torch's setting), restored after."""
    import torch

    before = torch.get_num_threads()
    try:
        if n > 0:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)
