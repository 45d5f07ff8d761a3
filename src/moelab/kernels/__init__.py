"""Fused CPU kernels for the sparse MoE path, compiled on first use (``moe_cpu.cpp``).

The sparse layer's router epilogue, dispatch and combine are a few passes over small tensors; as
chains of ATen calls their per-call cost dominates at MoE shapes on a CPU. ``moe_cpu.cpp`` does each
in one pass. It is built with the system C++ compiler against the installed torch the first time a
fused path runs (about half a minute), cached by content (source, torch, compiler, CPU flags) under
``$MOELAB_CACHE_DIR/kernels`` (default ``~/.cache/moelab/kernels``), and loaded with
``torch.ops.load_library``. Every op has a pure-PyTorch twin (the reference the tests compare with),
used when the kernels are unavailable.

``MOELAB_KERNELS``: ``auto`` (default: build if needed, fall back to PyTorch with one warning if the
build fails), ``off`` (PyTorch only), ``on`` (raise if the kernels cannot be built).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from moelab.errors import MoelabError

__all__ = ["available", "enabled", "load", "status", "use"]

_SOURCE = Path(__file__).with_name("moe_cpu.cpp")
_MODES = ("auto", "on", "off")
_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "path": None}
_override = threading.local()  # use(False) switches the fused paths off in this thread


def _mode() -> str:
    mode = os.environ.get("MOELAB_KERNELS", "auto").strip().lower() or "auto"
    aliases = {"1": "on", "true": "on", "require": "on", "0": "off", "false": "off", "none": "off"}
    mode = aliases.get(mode, mode)
    if mode not in _MODES:
        raise MoelabError(f"MOELAB_KERNELS must be one of {', '.join(_MODES)}, got {os.environ['MOELAB_KERNELS']!r}")
    return mode


def _cache_dir() -> Path:
    from moelab.data.location import cache_dir

    return cache_dir() / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _flags() -> list[str]:
    torch_dir = Path(torch.__file__).parent
    inc = torch_dir / "include"
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{inc}", f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native")  # the library is built on (and keyed by the CPU of) the machine using it
    return flags


def _link_flags() -> list[str]:
    lib = Path(torch.__file__).parent / "lib"
    return [f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]


def _key(cxx: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), torch.__version__.encode(), version.encode(), _cpu_flags().encode(),
                 " ".join(_flags() + _link_flags()).encode(), sys.version.encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _library(cxx: str) -> Path:
    """Where the built library is (or will be) for this machine, compiler and torch."""
    return _cache_dir() / _key(cxx) / "moelab_cpu.so"


def _build(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:  # one build at a time (e.g. DDP ranks starting together)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cxx, *_flags(), str(_SOURCE), "-o", tmp, *_link_flags()]
        print(f"moelab: building the fused CPU kernels once for this machine and torch (~40 s) -> {target}",
              file=sys.stderr, flush=True)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise MoelabError(f"building {_SOURCE.name} failed (exit {res.returncode}): "
                                  f"{' '.join(cmd)}\n{res.stderr[-4000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def load() -> bool:
    """Build (if needed) and load the kernels; True when ``torch.ops.moelab`` is ready.

    Honours ``MOELAB_KERNELS``; in ``auto`` mode a failure warns once and returns False."""
    mode = _mode()
    if mode == "off":
        return False
    with _lock:
        if _state["loaded"]:
            return True
        if _state["error"] is not None and mode == "auto":
            return False
        try:
            if sys.platform == "win32":
                raise MoelabError("the fused kernels are built with a Unix C++ toolchain; not supported on Windows")
            cxx = _compiler()
            if cxx is None:
                raise MoelabError("no C++ compiler found (set CXX or install g++/clang++)")
            path = _library(cxx)
            if not path.exists():
                _build(cxx, path)
            torch.ops.load_library(str(path))
            _state.update(loaded=True, path=path, error=None)
            return True
        except Exception as err:  # noqa: BLE001 - any build/load failure falls back to PyTorch in auto mode
            _state["error"] = err
            if mode == "on":
                raise MoelabError(f"MOELAB_KERNELS=on but the fused CPU kernels are unavailable: {err}") from err
            warnings.warn(f"moelab: fused CPU kernels unavailable, using the PyTorch path ({err})", stacklevel=2)
            return False


def enabled(*tensors: torch.Tensor) -> bool:
    """Use the fused kernels for these tensors: all on CPU, not under torch.compile, kernels loaded."""
    if torch.compiler.is_compiling() or any(t.device.type != "cpu" for t in tensors):
        return False
    if not getattr(_override, "on", True):
        return False
    return _state["loaded"] or load()


@contextlib.contextmanager
def use(on: bool):
    """Context manager: ``with kernels.use(False):`` runs the PyTorch twins (tests, benchmarks)."""
    prev = getattr(_override, "on", True)
    _override.on = bool(on)
    try:
        yield
    finally:
        _override.on = prev


def available() -> bool:
    """The kernels are loaded or can be (builds them on first call)."""
    return load()


def status() -> str:
    """One line for logs and benchmark headers."""
    mode = _mode()
    if mode == "off":
        return "off (MOELAB_KERNELS=off)"
    if _state["loaded"]:
        return f"fused CPU kernels ({_state['path']})"
    if _state["error"] is not None:
        return f"PyTorch fallback ({_state['error']})"
    return "not loaded yet"
