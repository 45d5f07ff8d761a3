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


@pytest.mark.slow
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
    p = subprocess.run([sys.executable, "-m", "moelab", "run", "whatever", "--nproc", "2", "--device", "cpu"], cwd=tmp_path,
                       env=_env(MOELAB_FAIL_RANK="1"), capture_output=True, text=True, timeout=90)
    took = time.monotonic() - t0
    assert p.returncode != 0
    assert "injected failure on rank 1 (MOELAB_FAIL_RANK=1)" in p.stderr
    assert "the 2-process run failed" in p.stderr
    assert took < 30, f"took {took:.1f} s"
    assert not any(tmp_path.iterdir()), "nothing may be written"


_TEARDOWN = """
import os
import torch
import torch.distributed as dist
from moelab.parallel import ddp
ddp.init("gloo", timeout_s=30)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))  # its first use imports torch._dynamo
model(torch.ones(2, 3)).sum().backward()
del model
dist.destroy_process_group()
print(sorted(n for n in (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
             if "gloo" in n))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_destroyed_group_leaves_no_gloo_thread():
    """Once the group is destroyed its gloo threads are gone, also after DDP's first use imported torch._dynamo
    (and with it torch.distributed.nn, whose ``group=group.WORLD`` defaults would hold the group for good). A
    gloo thread left running into the interpreter's shut-down aborts the process now and then."""
    from moelab.parallel.launch import free_port

    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    p = subprocess.run([sys.executable, "-c", _TEARDOWN], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "[]", p.stdout


# The balance loss is a batch statistic, computed per rank under DDP (as in every DDP code base): off here,
# so that the sharded run must equal the single-process one.
DIGITS = ["digits-jacobs", "--set", "train.epochs=2", "--set", "compute.bf16=false", "--set", "train.balance_weight=0",
          "--set", "compute.threads=1", "--quiet", "--device", "cpu"]  # gloo/CPU, also on a GPU machine


@pytest.mark.slow
def test_builtin_modern_jacobs_runs_data_parallel(tmp_path):
    """`moelab run digits-jacobs --nproc 2` trains with DDP on sharded batches: same result as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = subprocess.run([sys.executable, "-m", "moelab", "run", *DIGITS, "--out", str(one)], env=_env(),
                        capture_output=True, text=True, timeout=120)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = subprocess.run([sys.executable, "-m", "moelab", "run", *DIGITS, "--out", str(two), "--nproc", "2"],
                        env=_env(), capture_output=True, text=True, timeout=180)
    assert p2.returncode == 0, p2.stderr[-3000:]
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s1["protocol"]["world_size"], s2["protocol"]["world_size"]) == (1, 2)
    assert "data-parallel: 2 ranks" in (two / "run.log").read_text()
    for model in ("moe", "single"):
        assert s2["models"][model]["test_accuracy"] == pytest.approx(s1["models"][model]["test_accuracy"], abs=1e-9)
    m1, m2 = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert [(r["phase"], r["epoch"]) for r in m1] == [(r["phase"], r["epoch"]) for r in m2]
    for a, b in zip(m1, m2):  # epoch losses are means over the global batches, all-reduced over the ranks
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 wrote nothing


def test_single_process_experiment_refuses_nproc(tmp_path):
    p = subprocess.run([sys.executable, "-m", "moelab", "run", "mnist-jacobs-faithful", "--nproc", "2", "--device", "cpu",
                        "--out", str(tmp_path / "r")], env=_env(MOELAB_DATA_DIR=str(tmp_path)), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert "runs in one process only; it does not shard its work over the 2 ranks" in p.stderr
