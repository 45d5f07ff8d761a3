"""Fused CPU kernels for the sparse MoE path, compiled on first use (``moe_cpu.cpp``).

The sparse layer's router epilogue, dispatch and combine are a few passes over small tensors; as
chains of ATen calls their per-call cost dominates at MoE shapes on a CPU. ``moe_cpu.cpp`` does each
in one pass. It is built by :func:`torch.utils.cpp_extension.load` (ninja, the system C++ compiler,
torch's own include paths and ABI flags) the first time a fused path runs (about half a minute), in
``$MOELAB_CACHE_DIR/kernels/<key>`` (default ``~/.cache/moelab/kernels``; the key hashes source,
torch, compiler, CPU flags and Python, since ``-march=native`` ties the library to the CPU), and its
ops registered in ``torch.ops.moelab``. A build that fails leaves no library behind. Every op has a
pure-PyTorch twin (the reference the tests compare with), used when the kernels are unavailable.

``MOELAB_KERNELS``: ``auto`` (default: build if needed, fall back to PyTorch with one warning if the
build fails), ``off`` (PyTorch only), ``on`` (raise if the kernels cannot be built).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

from moelab.errors import MoelabError
from moelab.io import atomic_write_bytes

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


CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-w"]  # as torch: lets the loops with clamps vectorise
LDFLAGS = ["-fopenmp"]


def _flags() -> list[str]:
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        return [*CFLAGS, "-march=native"]  # the library is built on (and keyed by the CPU of) the machine using it
    return list(CFLAGS)


def _key(cxx: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    torch_install = str(Path(torch.__file__).resolve().parent)  # two venvs with one torch version: two builds
    for part in (_SOURCE.read_bytes(), torch.__version__.encode(), torch_install.encode(), version.encode(),
                 _cpu_flags().encode(), " ".join(_flags() + LDFLAGS).encode(), sys.version.encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the pip package's binary is not there in an unactivated venv."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # cpp_extension then says that ninja is required
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _build_and_load(cxx: str) -> Path:
    """Build (once per key; cpp_extension locks the build directory) and load; -> the library's path."""
    from torch.utils import cpp_extension

    build_dir = _cache_dir() / _key(cxx)
    build_dir.mkdir(parents=True, exist_ok=True)
    # Built from a copy inside the keyed folder: cpp_extension rebuilds whenever the source *path* changes,
    # so checkouts sharing the cache would otherwise rebuild each other's library on every switch.
    source = build_dir / _SOURCE.name
    if not source.is_file() or source.read_bytes() != _SOURCE.read_bytes():
        atomic_write_bytes(source, _SOURCE.read_bytes())
    if not any(build_dir.glob("*.so")):
        print(f"moelab: building the fused CPU kernels once for this machine and torch (~40 s) -> {build_dir}",
              file=sys.stderr, flush=True)
    os.environ.setdefault("CXX", cxx)
    _put_ninja_on_path()
    # is_python_module=False: the library is loaded with torch.ops.load_library; its path is returned
    path = cpp_extension.load(name="moelab_cpu", sources=[str(source)], extra_cflags=_flags(),
                              extra_ldflags=LDFLAGS, build_directory=str(build_dir), is_python_module=False,
                              verbose=False)
    return Path(path)


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
            path = _build_and_load(cxx)
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
    for t in tensors:
        if t.device.type != "cpu":
            return False
    if torch.compiler.is_compiling():
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
