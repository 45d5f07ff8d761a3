"""Results survive faults: a refused or finished resume changes nothing, phase times survive resumes,
the global RNG (noisy routing) resumes exactly, the kernel build is never training time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import killhook
import pytest
import torch

import moelab.experiments.cifar_moe.experiment as cifar_moe  # the module whose _run seeds each phase
import moelab.train.trainer as trainer
from moelab.cli import main
from moelab.experiments.runner import run_experiment
from moelab.train.checkpoint import read_meta

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MOELAB_KERNELS": "off"}
# mnist-sparse on the embedded 8x8 digits (no download), noisy top-2: its noise comes from torch's global RNG
SPARSE = ["mnist-sparse", "--set", "data.dataset=digits", "--set", "data.resize=none", "--set", "data.val_size=200",
          "--set", "model.router=noisy_topk", "--set", "train.epochs=3", "--set", "train.log_every=1",
          "--set", "baselines.equal_cost=false", "--set", "compute.threads=1", "--quiet"]


def moelab(*args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True, env=env or ENV)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file of a run directory (hidden ones included) -> its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def without_timings(summary: dict) -> dict:
    if isinstance(summary, dict):
        return {k: without_timings(v) for k, v in summary.items()
                if not k.endswith("time_s") and k not in ("resumed", "img_per_s", "wall_time_s")}
    return summary


@pytest.fixture(scope="module")
def sparse_runs(tmp_path_factory):
    """The uninterrupted run, and one SIGKILLed in epoch 2 (before it is resumed)."""
    root = tmp_path_factory.mktemp("sparse")
    env = {**ENV, "MOELAB_CACHE_DIR": str(root / "cache")}
    moelab("run", *SPARSE, "--out", str(root / "ref"), env=env)
    killed = subprocess.run([sys.executable, *killhook.CLI, "run", *SPARSE, "--out", str(root / "killed")],
                            capture_output=True, text=True, env=killhook.env({**env, killhook.KILL_ENV: "moe:2:mid_epoch"}))
    assert killed.returncode == -9, killed.stderr[-2000:]
    return root, env


def test_refused_resume_leaves_every_byte(sparse_runs, capsys):
    """An unreadable checkpoint or another config: exit 2, one line naming it, the directory untouched."""
    root, _ = sparse_runs
    run = root / "killed"
    ckpt = run / "ckpt" / "moe.safetensors"
    good = ckpt.read_bytes()
    assert read_meta(ckpt)["epoch"] == 0 and (run / "metrics.jsonl").read_text().count("\n") == 1
    try:
        ckpt.write_bytes(good[: len(good) // 2])  # a truncated checkpoint
        before = snapshot(run)
        assert main(["run", "--resume", str(run), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(ckpt) in err and "Nothing was changed" in err
        assert snapshot(run) == before
    finally:
        ckpt.write_bytes(good)
    before = snapshot(run)
    assert main(["run", "--resume", str(run), "--set", "train.epochs=4", "--quiet"]) == 2
    assert "train.epochs cannot change on resume" in capsys.readouterr().err
    assert snapshot(run) == before


def test_noisy_routing_resumes_to_the_uninterrupted_result(sparse_runs):
    """The global RNG (noisy top-k's noise) is part of the checkpoint: killed mid-epoch and resumed equals
    uninterrupted, metric line by metric line; the phase clock goes on from the checkpoint's."""
    root, env = sparse_runs
    run = root / "killed"
    saved = read_meta(run / "ckpt" / "moe.safetensors")["times"]
    assert saved["train_s"] > 0 and saved["elapsed_s"] >= saved["train_s"]
    moelab("run", "--resume", str(run), "--quiet", env=env)
    ref = json.loads((root / "ref" / "summary.json").read_text())
    got = json.loads((run / "summary.json").read_text())
    assert got["resumed"] is True
    assert without_timings(got) == without_timings(ref)

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert rows(run) == rows(root / "ref")
    final = read_meta(run / "ckpt" / "moe.safetensors")["times"]
    assert final["elapsed_s"] > saved["elapsed_s"]  # epochs 2-3 added to epoch 1's clock
    assert got["models"]["moe"]["train_time_s"] == round(final["elapsed_s"], 1)


def test_resume_of_a_finished_run_changes_nothing(sparse_runs, capsys):
    root, _ = sparse_runs
    run = root / "ref"
    ckpt = run / "ckpt" / "moe.safetensors"
    good = ckpt.read_bytes()
    try:
        ckpt.write_bytes(good[:100])  # even with a damaged checkpoint: the results are kept as they are
        before = snapshot(run)
        assert main(["run", "--resume", str(run)]) == 0
        assert "has finished" in capsys.readouterr().out
        assert snapshot(run) == before
    finally:
        ckpt.write_bytes(good)


@pytest.mark.slow
def test_kernel_build_is_not_training_time(tmp_path):
    """A forced build of the fused kernels (a fresh cache) happens before the timed phase: the MoE's
    recorded training time is that of a warm-cache run, not tens of seconds more."""
    env = {**ENV, "MOELAB_CACHE_DIR": str(tmp_path / "cache"), "MOELAB_KERNELS": "on"}
    args = [*SPARSE[:-1], "--set", "train.epochs=2"]
    cold = moelab("run", *args, "--out", str(tmp_path / "cold"), env=env)
    assert "building the fused CPU kernels" in cold.stderr  # the build is announced
    warm = moelab("run", *args, "--out", str(tmp_path / "warm"), env=env)
    assert "building the fused CPU kernels" not in warm.stderr
    t_cold, t_warm = (json.loads((tmp_path / n / "summary.json").read_text())["models"]["moe"]["train_time_s"]
                      for n in ("cold", "warm"))
    wall_cold = json.loads((tmp_path / "cold" / "summary.json").read_text())["wall_time_s"]
    assert wall_cold - t_cold > 5  # the build did take its seconds, outside the phase
    assert t_cold < t_warm + 2.0, (t_cold, t_warm)


class FakeClock:
    """perf_counter for the training loop: 1 s per call, so phase times are deterministic."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        self.t += 1.0
        return self.t


CIFAR = ["--set", "model.width=16", "--set", "train.epochs=1", "--set", "train.batch_size=256",
         "--set", "data.train_per_class=60", "--set", "data.test_per_class=20", "--set", "data.val_size=100",
         "--set", "model.moe=blocks", "--set", "model.num_experts=2", "--set", "eval.tta=0",
         "--set", "baselines.equal_params=false", "--set", "baselines.reference=false", "--set", "compute.threads=1"]


@pytest.mark.slow
def test_interrupt_at_a_phase_boundary_resumes_to_the_same_rows(real_data_dir, tmp_path, monkeypatch):
    """cifar10-moe interrupted (SIGINT: KeyboardInterrupt) after the MoE phase, then resumed: every row
    equals the uninterrupted run's, and dense-equal-time trains the same epochs (the mixture's time came
    back from its checkpoint; before, the resumed run matched 0 s)."""
    from moelab.experiments import resolve_config

    monkeypatch.setattr(trainer, "time", FakeClock())
    monkeypatch.setenv("MOELAB_KERNELS", "off")  # no build of the fused kernels in this test's fresh cache
    overrides = [CIFAR[i + 1] for i in range(0, len(CIFAR), 2)]
    assert resolve_config("cifar10-moe", overrides)  # the slice is a valid config
    kw = {"data_dir": str(real_data_dir), "quiet": True, "device": "cpu"}
    ref = run_experiment("cifar10-moe", overrides, out=tmp_path / "ref", **kw)

    real_init = cifar_moe.seed_module_init

    def interrupt(run, phase):
        if phase == "dense-equal-flops":
            raise KeyboardInterrupt
        real_init(run, phase)

    monkeypatch.setattr(cifar_moe, "seed_module_init", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("cifar10-moe", overrides, out=tmp_path / "cut", **kw)
    assert not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.setattr(cifar_moe, "seed_module_init", real_init)
    got = run_experiment("cifar10-moe", None, resume=tmp_path / "cut", **kw)
    assert set(got["models"]) == set(ref["models"]) == {"moe", "dense-equal-flops", "dense-equal-time"}
    for name, row in ref["models"].items():
        assert got["models"][name]["test_accuracy"] == row["test_accuracy"], name
        assert got["models"][name]["train_time_s"] == row["train_time_s"], name
    assert got["models"]["dense-equal-time"]["epochs"] == ref["models"]["dense-equal-time"]["epochs"] > 0
    assert torch.equal(torch.tensor(got["models"]["moe"]["routing"]["lead_share"]),
                       torch.tensor(ref["models"]["moe"]["routing"]["lead_share"]))


def test_rng_state_of_every_device_is_saved_and_restored(tmp_path):
    """The CPU generator always; each CUDA device's once CUDA is in use (checked on a GPU); a checkpoint
    holding CUDA states refuses to resume on a machine with fewer GPUs, by name, instead of diverging."""
    states = trainer.rng_states()
    assert torch.equal(states["rng.torch"], torch.get_rng_state())
    if torch.cuda.is_available():
        torch.cuda.init()
        states = trainer.rng_states()
        assert len([k for k in states if k.startswith("rng.cuda.")]) == torch.cuda.device_count()
        want = torch.cuda.get_rng_state_all()
        torch.cuda.manual_seed_all(123)
        trainer.set_rng_states(states, tmp_path / "x.safetensors")
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), want))
    else:
        fake = {"rng.torch": torch.get_rng_state(), "rng.cuda.0": torch.zeros(16, dtype=torch.uint8)}
        with pytest.raises(Exception, match=r"x\.safetensors' holds the RNG state of 1 CUDA device"):
            trainer.set_rng_states(fake, tmp_path / "x.safetensors")
    torch.manual_seed(7)
    a = torch.rand(3)
    torch.manual_seed(7)
    saved = trainer.rng_states()
    torch.rand(5)
    trainer.set_rng_states(saved, tmp_path / "x.safetensors")
    assert torch.equal(torch.rand(3), a)
