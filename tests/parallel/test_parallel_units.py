"""Single-process parts of moelab.parallel: argv handling, batch sharding, identities without a group."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.moe import MLPExperts, ModuleExperts
from moelab.parallel import comm, ddp, launch
from moelab.parallel.expert_parallel import slice_experts
from moelab.parallel.launch import check_gpus, device_arg, launch_local, strip_nproc, torchrun_command


def test_strip_nproc_and_command():
    argv = ["run", "exp", "--nproc", "4", "--set", "a=1", "--nproc=3", "--seed", "2"]
    assert strip_nproc(argv) == ["run", "exp", "--set", "a=1", "--seed", "2"]
    cmd = torchrun_command(4, argv)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4" and cmd[cmd.index("--max-restarts") + 1] == "0"
    assert cmd[-7:] == ["-m", "moelab", "run", "exp", "--set", "a=1", "--seed", "2"][-7:]


def test_launch_local_refuses_nesting(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MoelabError, match="inside a torchrun job"):
        launch_local(2, ["run", "x"])


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_arg():
    assert device_arg(["run", "x"]) == "auto"
    assert device_arg(["run", "x", "--device", "cpu"]) == "cpu"
    assert device_arg(["run", "--device=cuda:1", "x"]) == "cuda:1"
    assert device_arg(["run", "--device", "cpu", "--device=cuda"]) == "cuda"  # argparse: the last one wins


def test_nproc_beyond_the_gpus_is_refused_before_launching(monkeypatch):
    """--nproc 4 on 2 GPUs used to put two ranks on one GPU (LOCAL_RANK % count), which NCCL refuses
    ("Duplicate GPU detected"): refused in one line naming both numbers, before torchrun starts."""
    _gpus(monkeypatch, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    started = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **kw: started.append(a))
    for argv in (["run", "x", "--nproc", "4"], ["run", "x", "--device", "cuda", "--nproc=4"]):
        with pytest.raises(MoelabError) as err:
            launch_local(4, argv)
        msg = str(err.value)
        assert msg == ("--nproc 4: 4 processes need one GPU each, but torch sees 2 GPU(s); use --nproc 2 or fewer, "
                       "or --device cpu to run 4 processes on the CPU.")
        assert "\n" not in msg
    with pytest.raises(MoelabError, match=r"--nproc 2 with --device cuda:1: every process would use that one GPU"):
        launch_local(2, ["run", "x", "--device", "cuda:1", "--nproc", "2"])
    assert started == []
    check_gpus(2, "auto")  # one GPU each: fine
    check_gpus(2, "cuda")
    check_gpus(4, "cpu")  # CPU processes: any number
    check_gpus(1, "cuda:1")


def test_nproc_without_gpus_runs_on_the_cpu(monkeypatch):
    _gpus(monkeypatch, 0)
    check_gpus(8, "auto")
    check_gpus(8, "cpu")
    check_gpus(8, "cuda")  # refused with the reason by each worker's --device check (no CUDA here)


def test_default_device_refuses_a_shared_gpu(monkeypatch):
    """spawn / torchrun processes: nccl needs one GPU per process; a gloo (CPU) group takes no GPU at all."""
    _gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ddp.default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(MoelabError, match=r"^2 processes on this machine need one GPU each, but torch sees 1 GPU"):
        ddp.default_device()
    with pytest.raises(MoelabError, match=r"--nproc 2: 2 processes need one GPU each, but torch sees 1"):
        launch.spawn(print, 2)  # nccl (a GPU is "there"): refused before any process starts
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(ddp.dist, "init_process_group", lambda **kw: calls.append(kw["backend"]))
    ddp.init("gloo")  # a CPU job on a GPU machine: no GPU is taken, nothing refused
    assert calls == ["gloo"]


@pytest.mark.parametrize("n,bs", [(29, 8), (10, None), (7, 4)])
def test_shard_indices_rebuild_the_global_batches(n, bs):
    single = ddp.shard_indices(n, torch.Generator().manual_seed(5), batch_size=bs)
    parts = [ddp.shard_indices(n, torch.Generator().manual_seed(5), batch_size=bs, with_weights=True,
                               ctx=ddp.DistContext(r, 2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single)
    for i, batch in enumerate(single):
        (a, wa), (b, wb) = parts[0][i], parts[1][i]
        assert torch.equal(torch.cat([a, b]), batch)
        # DDP averages the two ranks' gradients: weighted local means give the global mean
        # DDP averages the two ranks' gradients of w * local mean: that is the gradient of the global mean
        assert wa + wb == pytest.approx(2.0) and wa / 2 == pytest.approx(len(a) / len(batch))


def test_shard_indices_drop_last_and_unshuffled():
    got = ddp.shard_indices(10, batch_size=4, drop_last=True, ctx=ddp.DistContext(1, 2))
    assert [t.tolist() for t in got] == [[2, 3], [6, 7]]


def test_helpers_are_identities_without_a_group():
    m = nn.Linear(2, 2)
    assert ddp.wrap_model(m) is m and ddp.unwrap(m) is m
    assert ddp.all_reduce_mean(0.25) == 0.25 and ddp.all_reduce_sum(3.0) == 3.0
    assert ddp.all_reduce_mean(0.5, weight=10) == 0.5
    assert ddp.loss_weight(4, 8) == 0.5  # world 1: local batch is the global batch only when equal
    assert ddp.current() == ddp.DistContext() and ddp.current().is_main and not ddp.current().enabled
    with ddp.maybe_init_from_env() as ctx:  # WORLD_SIZE unset: nothing to join
        assert ctx == ddp.DistContext()


def test_slice_experts():
    torch.manual_seed(0)
    full = MLPExperts(4, 3, 5)
    part = slice_experts(full, 2, 4)
    assert part.num_experts == 2 and part.w1.shape == (2, 3, 5) and part.b2.shape == (2, 3)
    assert torch.equal(part.w2, full.w2[2:4]) and part.w1.data_ptr() != full.w1.data_ptr()
    x = torch.randn(6, 3)
    assert torch.allclose(part.forward_dense(x), full.forward_dense(x)[2:4])
    mods = ModuleExperts([nn.Linear(3, 3) for _ in range(4)])
    sub = slice_experts(mods, 0, 2)
    assert sub.num_experts == 2 and torch.equal(sub.experts[1].weight, mods.experts[1].weight)


def test_comm_impl_choice():
    with pytest.raises(ValueError):
        comm.set_impl("mpi")
    assert comm.get_impl() == "native"


def test_bench_main_formats(monkeypatch, capsys):
    import moelab.bench.ep as ep

    with pytest.raises(MoelabError, match="divisible"):
        ep.bench_ep(nproc=2, experts=3)
    row = {"world": 2, "experts": 8, "k": 2, "global_tokens": 512, "single_ms": 10.0, "ep_ms": 8.0,
           "single_tok_s": 51200.0, "ep_tok_s": 64000.0, "ratio": 1.25, "backend": "gloo", "device": "cpu"}
    monkeypatch.setattr(ep, "bench_ep", lambda *a, **k: row)
    assert ep.main(["--ep", "2"]) == 0
    out = capsys.readouterr().out
    assert "ep/single" in out and "1.25" in out and "gloo on cpu" in out
    assert ep.main(["--ep", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ratio"] == 1.25
