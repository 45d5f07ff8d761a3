"""``--device``: resolving it, refusing a device that is not there, and every experiment family on CUDA.

The CUDA end-to-end tests skip (reason shown by ``-ra``) where torch sees no GPU; on a GPU machine they
run each family on a small slice on the CPU and on CUDA and compare the two.
"""

import subprocess
import sys

import pytest
import torch

from moelab import device as D
from moelab.errors import MoelabError
from moelab.experiments.runner import run_experiment

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device(None) == torch.device("cpu")
    assert D.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MoelabError, match=r"--device cuda: no CUDA device is available here .*use --device cpu"):
        D.resolve_device("cuda")
    with pytest.raises(MoelabError, match=r"--device cuda:0: no CUDA device"):
        D.resolve_device("cuda:0")


def test_unknown_device_names_the_choices():
    with pytest.raises(MoelabError, match=r"--device 'tpu': expected one of auto, cpu, cuda or cuda:N"):
        D.resolve_device("tpu")


@pytest.fixture(autouse=True)
def cuda_flags():
    """resolve_device configures torch's process-wide CUDA flags: every test here leaves them as it found them."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cuda_index_and_local_rank(monkeypatch):
    """Without a GPU, with torch's CUDA queries faked: which device each spelling resolves to."""
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.resolve_device("auto") == torch.device("cuda", 1)  # torchrun local rank 1: its own GPU
    assert D.resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert D.resolve_device("cuda") == torch.device("cuda", 0)
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MoelabError, match=r"--device cuda:2: expected cuda:N with 0 <= N < 2"):
        D.resolve_device("cuda:2")
    with pytest.raises(MoelabError, match=r"--device cuda:x: expected cuda:N"):
        D.resolve_device("cuda:x")


def test_a_local_rank_without_its_own_gpu_is_refused(monkeypatch):
    """torchrun rank 3 on a machine with 2 GPUs used to wrap around onto GPU 1, beside rank 1: NCCL refuses
    that ("Duplicate GPU detected"). It is refused first, in one line naming the counts."""
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    for spec in ("auto", "cuda"):
        with pytest.raises(MoelabError, match=r"^--device \w+: 4 processes on this machine need one GPU each, but "
                                              r"torch sees 2 GPU\(s\) \(this is LOCAL_RANK 3\); start at most 2 .*"
                                              r"or use --device cpu\.$"):
            D.resolve_device(spec)
    assert D.resolve_device("cpu") == torch.device("cpu")  # a CPU run with many ranks is fine
    assert D.resolve_device("cuda:0") == torch.device("cuda", 0)  # asked for by name: as asked


def test_configure_sets_the_cuda_flags_for_cuda_only(monkeypatch):
    monkeypatch.delenv(D.TF32_ENV, raising=False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    for cpu in ("cpu", torch.device("cpu")):
        D.configure(cpu)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == (False, False, False), "a CPU run must leave torch's flags alone"
    D.configure("cuda:0")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    assert torch.get_float32_matmul_precision() == "high"  # the same switch, as torch reports it
    monkeypatch.setenv(D.TF32_ENV, "0")
    D.configure(torch.device("cuda", 1))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark


def test_resolving_a_device_configures_it(monkeypatch):
    """configure runs where a run's device is resolved (moelab.train.run.Run and the CLI call resolve_device):
    for a CUDA device, never for the CPU (also not when CUDA is there: --device cpu on a GPU machine)."""
    calls = []
    monkeypatch.setattr(D, "configure", calls.append)
    _fake_gpus(monkeypatch, 1)
    assert D.resolve_device("cpu") == torch.device("cpu") and calls == []
    D.resolve_device("auto")
    D.resolve_device("cuda:0")
    assert calls == [torch.device("cuda", 0)] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu") and len(calls) == 2


@no_cuda
def test_bench_layer_refuses_a_missing_gpu():
    from moelab.bench.layer import main

    with pytest.raises(MoelabError, match=r"--device cuda: no CUDA device is available here"):
        main(["--device", "cuda", "--configs", "16,32,4,2,32", "--repeats", "1", "--warmup", "1"])


def test_a_cpu_run_leaves_the_cuda_flags_alone(tmp_path):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    run_experiment("digits-jacobs", ["train.epochs=1", "baselines.equal_cost=false"], out=tmp_path / "r",
                   quiet=True, device="cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == flags


def test_to_device_and_to_host():
    x = torch.ones(3)
    assert D.to_device(x, None) is x and D.to_device(x, torch.device("cpu")) is x
    moved = D.to_device((x, None, [x, 2]), torch.device("cpu"))
    assert isinstance(moved, tuple) and moved[1] is None and isinstance(moved[2], list) and moved[2][1] == 2
    assert D.to_host(x) is x


@no_cuda
def test_cli_refuses_cuda_and_leaves_no_run_directory(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "moelab", "run", "digits-jacobs", "--device", "cuda", "--out", str(out),
                          "--set", "train.epochs=1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "moelab: error: --device cuda: no CUDA device is available here" in res.stderr
    assert not out.exists()


def test_summary_records_the_device(tmp_path):
    s = run_experiment("digits-jacobs", ["train.epochs=1", "baselines.equal_cost=false"], out=tmp_path / "r",
                       quiet=True, device="cpu")
    assert s["device"] == "cpu"


# ----------------------------------------------------------------------------- on a GPU

CASES = {
    "digits-jacobs": ["train.epochs=4"],
    "mnist-sparse": ["data.train_limit=1500", "data.val_size=500", "data.test_limit=500", "train.epochs=2",
                     "model.dim=16", "model.hidden=64", "model.num_experts=8"],
    "mnist-jacobs-faithful": ["data.train_limit=600", "data.test_limit=300", "faithful.moe_epochs=20",
                              "faithful.single_epochs=20", "baselines.equal_cost=false"],
    "cifar10-moe": ["data.train_per_class=60", "data.test_per_class=10", "data.val_size=100", "train.batch_size=100",
                    "train.epochs=2", "model.width=16", "eval.tta=2", "eval.batch_size=64"],
    "cifar10-experts": ["data.pairs=[[0, 8], [1, 9]]", "data.train_per_class=250", "data.test_per_class=50",
                        "data.val_size=200", "experts.epochs=1", "gate.epochs=1", "baseline.epochs=1",
                        "eval.batch_size=200", "experts.cache=false"],
}


@needs_cuda
@pytest.mark.parametrize("name", list(CASES))
def test_family_runs_on_cuda_like_on_cpu(name, tmp_path, request):
    data_dir = None if name == "digits-jacobs" else str(request.getfixturevalue("real_data_dir"))
    got = {dev: run_experiment(name, CASES[name], out=tmp_path / dev, data_dir=data_dir, quiet=True, device=dev)
           for dev in ("cpu", "cuda")}
    assert got["cuda"]["device"].startswith("cuda") and got["cpu"]["device"] == "cpu"
    for model, row in got["cpu"]["models"].items():
        cuda_row = got["cuda"]["models"][model]
        if "flops_per_example" in row:  # the same network and routing rules: the same counted cost
            assert cuda_row["params"] == row["params"]
        # same data order, same initial weights; only the kernels' rounding differs
        assert cuda_row["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=0.1), model


@needs_cuda
def test_count_syncs_and_cuda_flags_on_a_gpu():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
    dev = D.resolve_device("cuda")
    assert dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    x = torch.ones(4, device=dev)
    _, syncs = D.count_syncs(lambda: x * 2)
    assert syncs == []
    value, syncs = D.count_syncs(lambda: (x * 2).sum().item())
    assert value == 8.0 and len(syncs) >= 1  # .item() reads the value back: at least one sync


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_cases_are_valid_configs(name):
    """The GPU tests' overrides resolve here too (a typo would otherwise show only on a GPU machine)."""
    from moelab.experiments import resolve_config

    resolve_config(name, CASES[name])
