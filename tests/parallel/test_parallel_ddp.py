"""Data parallelism through the real launcher: torchrun (2 gloo/CPU processes) and ``moelab run --nproc``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _env(**kw) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MOELAB_DIST_TIMEOUT": "30", **kw}


def test_torchrun_ddp_equals_single_process(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", "--monitor-interval", "0.5", str(HERE / "ddp_script.py"), str(out)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["max_param_diff_all_ranks"] < 1e-10, r
    assert r["acc"] == pytest.approx(r["ref_acc"], abs=1e-12), r  # per-epoch training accuracy all-reduced over the ranks
    assert r["sum_of_ranks"] == 3.0 and r["mean_of_ranks"] == 0.5


def test_failing_rank_stops_the_job(tmp_path):
    """Rank 1 raises right after joining, rank 0 waits in a collective: the job must end within seconds."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "moelab", "run", "whatever", "--nproc", "2"], cwd=tmp_path,
                       env=_env(MOELAB_FAIL_RANK="1"), capture_output=True, text=True, timeout=90)
    took = time.monotonic() - t0
    assert p.returncode != 0
    assert "injected failure on rank 1 (MOELAB_FAIL_RANK=1)" in p.stderr
    assert "the 2-process run failed" in p.stderr
    assert took < 30, f"took {took:.1f} s"
    assert not any(tmp_path.iterdir()), "nothing may be written"
