"""moelab.runtime: the heap allocator setting the CLI applies at start-up."""

import subprocess
import sys

import pytest

CHECK = r"""
import ctypes, sys
from moelab import runtime

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

before = runtime.allocator_state()
state = runtime.tune_allocator() if sys.argv[1] == "tune" else before
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
a = libc.malloc(64 << 20)  # 64 MiB: glibc's default serves this with mmap
mmapped = libc.mallinfo2().hblkhd >= 64 << 20
libc.free(a)
print(before, state, runtime.allocator_state(), "mmapped" if mmapped else "heap")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tune_allocator_keeps_large_blocks_in_the_heap():
    def check(*args, env=None):
        return subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True, check=True,
                              env=env).stdout.split()

    assert check("plain") == ["default", "default", "default", "mmapped"]  # glibc's own behaviour
    assert check("tune") == ["default", "tuned", "tuned", "heap"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_opt_out_by_environment():
    env = {"MOELAB_MALLOC": "default", "PATH": ""}
    res = subprocess.run([sys.executable, "-c", CHECK, "tune"], capture_output=True, text=True, check=True, env=env)
    assert res.stdout.split() == ["default", "default", "default", "mmapped"]


def test_bench_rows_record_the_allocator():
    from moelab.bench.layer import bench_layer

    rows = bench_layer([(16, 32, 4, 2, 64)], ["fp32"], repeats=1, warmup=0, verbose=False)
    assert rows[0]["allocator"] in ("tuned", "default", "unsupported")
