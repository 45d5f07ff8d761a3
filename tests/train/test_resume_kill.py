"""A real run SIGKILLed at exact moments resumes to the same result; CLI-level guards.

``MOELAB_TEST_KILL_AT="phase:epoch:point"`` (the test-only callback of ``tests/killhook.py``) makes
the run kill itself: ``mid_epoch`` (after one training step), ``checkpoint_write`` (temp file half
written, not renamed; ``eval-<model>:0`` for the test-prediction files), ``evaluate`` (inside the
validation pass). Each killed run is resumed with ``moelab run --resume`` and must end with exactly
the summary, metrics and saved test predictions of an uninterrupted run (deterministic CPU mode:
one thread), with no temp file left and every checkpoint loadable.
"""

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import killhook
import pytest
import torch

from moelab import experiments
from moelab.analysis.compare import compare_main
from moelab.analysis.report import write_report
from moelab.cli import main
from moelab.train.checkpoint import load_checkpoint, read_meta
from moelab.train.trainer import Trainer, check_finite

EXPERIMENT = ["digits-jacobs", "--set", "train.epochs=3", "--set", "data.train_limit=384", "--set", "compute.threads=1", "--quiet"]
KILLS = {
    "mid-epoch": "moe:2:mid_epoch",
    "checkpoint-write": "moe:3:checkpoint_write",  # the phase's final ("done") checkpoint
    "evaluate": "single:2:evaluate",
    "eval-file-write": "eval-single:0:checkpoint_write",  # after training, before summary.json
}


ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# The reference is a fresh `python -m moelab run`. The kill/resume steps run in forks of one
# interpreter that imported moelab, torch (with torch._dynamo) and sklearn once: each step is
# `moelab.cli.main(argv)` in a new child process (the code path of `python -m moelab`) without ~4 s
# of imports per step; torch is single-threaded, so forking is safe. After each step the server
# records what the run directory holds and finally prints {scenario: [state per step]} as JSON.
FORK_SERVER = r"""
import json, os, sys, traceback
from pathlib import Path
import killhook, moelab.cli, moelab.experiments.jacobs, sklearn.datasets, torch
from moelab.train.checkpoint import load_checkpoint, read_meta
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (seconds)

def step(argv, kill_at, log):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            if kill_at:
                os.environ["MOELAB_TEST_KILL_AT"] = kill_at
            code = moelab.cli.main(argv)
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

def state(d, status):
    ckpts = sorted(d.glob("ckpt/*.safetensors"))
    try:
        loads = all(load_checkpoint(p) for p in ckpts)
    except Exception:
        loads = False
    return {"status": status, "summary": (d / "summary.json").exists(), "tmp": [p.name for p in d.rglob("*.tmp")],
            "ckpts": {p.stem: read_meta(p) for p in ckpts}, "loads": loads}

jobs = json.loads(sys.argv[1])
print(json.dumps({name: [state(Path(d), step(argv, kill_at, log)) for argv, kill_at, log, d in steps]
                  for name, steps in jobs.items()}))
"""


def moelab(*args):
    """`python -m moelab run ARGS` in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "MOELAB_TEST_KILL_AT"} | ENV
    return subprocess.run([sys.executable, "-m", "moelab", "run", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def kill_and_resume(root):
    """Per scenario: `moelab run EXPERIMENT --out D` killed at its moment, then `moelab run --resume D`."""
    # the resume names the experiment but repeats none of the overrides: the run's own config.toml holds
    # them (one scenario resumes with the bare `moelab run --resume D`)
    def resume(name):
        return ["run", *([] if name == "evaluate" else [EXPERIMENT[0]]), "--resume", str(root / name), "--quiet"]

    jobs = {name: [[["run", *EXPERIMENT, "--out", str(root / name)], at, str(root / f"{name}.log"), str(root / name)],
                   [resume(name), None, str(root / f"{name}.log"), str(root / name)]]
            for name, at in KILLS.items()}
    env = {k: v for k, v in os.environ.items() if k != "MOELAB_TEST_KILL_AT"} | ENV
    res = subprocess.run([sys.executable, "-c", FORK_SERVER, json.dumps(jobs)], env=killhook.env(env), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items()
                if not k.endswith("time_s") and k not in ("resumed", "img_per_s")}
    return obj


def metric_rows(run_dir):
    """metrics.jsonl without the measured speeds (each epoch's images/s differs between any two runs)."""
    return [without_timings(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_clean(run_dir):
    """No temp file left, every checkpoint and eval file loads."""
    assert sorted(p.name for p in run_dir.rglob("*.tmp")) == []
    for f in [*run_dir.glob("ckpt/*.safetensors"), *run_dir.glob("eval/*.safetensors")]:
        load_checkpoint(f)


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory):
    """The uninterrupted run (a fresh `python -m moelab`) and, beside it, the killed-and-resumed ones."""
    root = tmp_path_factory.mktemp("kill")
    with ThreadPoolExecutor(2) as pool:
        ref = pool.submit(moelab, *EXPERIMENT, "--out", str(root / "ref"))
        steps = pool.submit(kill_and_resume, root)
        assert ref.result().returncode == 0, ref.result().stderr[-2000:]
        return root, steps.result()


@pytest.mark.parametrize("name", list(KILLS))
def test_killed_run_resumes_to_identical_result(kill_runs, name):
    root, steps = kill_runs
    ref, run = root / "ref", root / name
    killed, resumed = steps[name]
    log = (root / f"{name}.log").read_text()
    assert killed["status"] == -signal.SIGKILL, log[-2000:]
    assert resumed["status"] == 0, log[-2000:]
    assert not killed["summary"] and killed["loads"]  # what a kill leaves in place is whole
    ckpts = killed["ckpts"]
    if name == "mid-epoch":  # killed in epoch 2 of moe: epoch 1's checkpoint is the newest
        assert ckpts["moe"]["epoch"] == 0 and "single" not in ckpts and not killed["tmp"]
    elif name == "checkpoint-write":  # the half-written final checkpoint never replaced epoch 2's
        assert killed["tmp"] and ckpts["moe"]["epoch"] == 1 and not ckpts["moe"]["done"]
    elif name == "evaluate":
        assert ckpts["moe"]["done"] and ckpts["single"]["epoch"] == 0
    else:  # killed writing eval/single.safetensors, the last file before summary.json
        assert killed["tmp"] and ckpts["single"]["done"]
    assert resumed["summary"] and resumed["loads"] and resumed["tmp"] == []

    summary, want = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert summary["resumed"] is True
    assert summary["test_accuracy"] == want["test_accuracy"]
    assert {m: r["test_accuracy"] for m, r in summary["models"].items()} == {
        m: r["test_accuracy"] for m, r in want["models"].items()}
    assert without_timings(summary) == without_timings(want)
    assert metric_rows(run) == metric_rows(ref) and len(metric_rows(ref)) > 0
    for model in ("moe", "single"):
        got, _ = load_checkpoint(run / "eval" / f"{model}.safetensors")
        exp, _ = load_checkpoint(ref / "eval" / f"{model}.safetensors")
        assert got.keys() == exp.keys() and all(torch.equal(got[k], exp[k]) for k in exp), model
    assert_clean(run)


def test_resume_with_another_config_is_refused(kill_runs, capsys):
    ref = kill_runs[0] / "ref"
    asked = [a.replace("train.epochs=3", "train.epochs=4") for a in EXPERIMENT]
    assert main(["run", *asked, "--resume", str(ref)]) == 2
    err = capsys.readouterr().err
    assert err == (f"moelab: error: cannot resume '{ref}': train.epochs cannot change on resume (train.epochs: "
                   f"run has 3, asked 4); the run continues with its own config.toml. Keys a resumed run may "
                   f"change: compute.threads, train.log_every, faithful.log_every, faithful.checkpoint_every. To train "
                   f"with other values, start a new run.\n")
    assert main(["run", "mnist-jacobs", "--resume", str(ref)]) == 2
    assert capsys.readouterr().err == (f"moelab: error: cannot resume '{ref}': it is a run of 'digits-jacobs', "
                                       f"not 'mnist-jacobs'.\n")


def test_report_and_compare_of_real_runs(kill_runs, capsys):
    root = kill_runs[0]
    html, md = write_report(root / "ref")
    text = html.read_text()
    for fig in ("training-curves", "routing-heatmap", "usage-chart", "confusion-moe", "confusion-single"):
        assert f'<img id="{fig}"' in text
    assert "| 9 |" in md.read_text()  # the 10 digit classes
    assert compare_main([root], csv_path=root / "compare.csv") == 0
    out = capsys.readouterr().out  # the reference and the resumed runs: one config, one seed, identical
    acc = json.loads((root / "ref" / "summary.json").read_text())["test_accuracy"]
    assert re.search(rf"digits-jacobs\s+moe\s+5\s+{100 * acc:.2f} \+- 0\.00", out), out


# ------------------------------------------------------------------ guards, at the CLI
GUARD_DEFAULTS = {"train": {"epochs": 3, "nan_at": 0}}


@experiments.family("guardtoy", GUARD_DEFAULTS)
def _run_guardtoy(cfg, run):
    torch.manual_seed(run.seed)
    x = torch.randn(32, 4, generator=run.generator("data"))
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def epoch_fn(epoch):
        for step in range(4):
            loss = torch.nn.functional.cross_entropy(model(x[step::4]), y[step::4])
            if cfg["train"]["nan_at"] == epoch + 1 and step == 2:
                loss = loss * float("inf")
            check_finite(loss, "guardtoy", epoch, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"loss": loss.item()}

    Trainer(run, "guardtoy", model, opt, epochs=cfg["train"]["epochs"]).fit(epoch_fn=epoch_fn)
    return {"test_accuracy": float((model(x).argmax(1) == y).float().mean())}


@pytest.fixture
def guard_config(tmp_path):
    path = tmp_path / "guard.toml"
    path.write_text('family = "guardtoy"\n')
    return path


def test_non_finite_loss_exits_2_naming_the_step(guard_config, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", str(guard_config), "--set", "train.nan_at=2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab: error: phase 'guardtoy': the loss became inf at epoch 2, step 2; training stopped.")
    assert "last good checkpoint (end of the previous epoch) is kept" in err and "Traceback" not in err
    assert read_meta(out / "ckpt" / "guardtoy.safetensors")["epoch"] == 0  # epoch 1's checkpoint
    assert not (out / "summary.json").exists()
    assert_clean(out)


def test_run_directory_in_use_is_refused(guard_config, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", str(guard_config), "--out", str(out), "--quiet"]) == 0
    holder = subprocess.Popen(  # another process holding the run's lock, as a running `moelab run` does
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.pwrite(fd, str(os.getpid()).encode(), 0); print('locked', flush=True); "
         "sys.stdin.read()", str(out / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", "--resume", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == (f"moelab: error: run directory '{out}' is in use by another moelab process (pid {holder.pid}); "
                       f"wait for it to finish or choose another --out.\n")
    finally:
        holder.communicate("", timeout=30)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # free again once the holder has gone
