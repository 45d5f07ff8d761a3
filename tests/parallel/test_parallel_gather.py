"""``ShardedExperts.gather`` / ``ExpertParallelMoE.to_moe`` copy the experts and leave the live layer alone.

They used to call ``nn.Module.cpu()`` on the live ModuleExperts shard: that *moves* the module, so on a GPU
the next forward of the live layer failed (weights on the CPU, tokens on the GPU) and the gathered model
landed on the CPU. On the CPU such a move is invisible (``.cpu()`` of a CPU module changes nothing), so the
CPU tests also watch for any ``nn.Module._apply`` (the method behind ``.cpu()`` / ``.to()`` / ``.cuda()``)
on a live module during the gather. One process, a world of 1 (gloo in this process; nccl for the GPU test).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moelab.moe import MoE
from moelab.parallel.expert_parallel import ExpertParallelMoE, shard_params

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@pytest.fixture(autouse=True)
def no_fused_kernels():
    """The PyTorch twins of the fused CPU kernels: the same layer, without building the kernels (tens of
    seconds in a fresh test cache) for a test about copies."""
    from moelab import kernels

    with kernels.use(False):
        yield


def _layer(module_experts: bool) -> MoE:
    torch.manual_seed(0)
    if module_experts:
        mods = [nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6)) for _ in range(4)]
        return MoE(6, 4, router="topk", k=2, experts=mods)
    return MoE(6, 4, 8, router="topk", k=2)


def _snapshot(model: nn.Module) -> dict[str, tuple[int, torch.device, torch.Tensor]]:
    return {n: (id(p), p.device, p.detach().clone()) for n, p in model.named_parameters()}


def _assert_untouched(model: nn.Module, before: dict) -> None:
    now = dict(model.named_parameters())
    assert now.keys() == before.keys()
    for n, (pid, dev, value) in before.items():
        p = now[n]
        assert id(p) == pid, f"{n}: a new parameter object"
        assert p.device == dev, f"{n}: moved from {dev} to {p.device}"
        assert torch.equal(p.detach().cpu(), value.cpu()), f"{n}: values changed"


def _gather_and_check(ep: ExpertParallelMoE, x: torch.Tensor, monkeypatch=None) -> MoE:
    before = _snapshot(ep)
    y_before = ep(x)[0].detach()
    live = {id(m) for m in ep.modules()}
    applied: list[str] = []
    if monkeypatch is not None:  # any .cpu() / .to() / .cuda() of a live module during the gather is the bug
        orig = nn.Module._apply

        def spy(self, fn, *a, **kw):
            if id(self) in live:
                applied.append(type(self).__name__)
            return orig(self, fn, *a, **kw)

        monkeypatch.setattr(nn.Module, "_apply", spy)
    full = ep.to_moe()
    gathered = ep.experts.gather()
    if monkeypatch is not None:
        monkeypatch.undo()
    assert not applied, f"gather / to_moe moved or cast live modules: {applied}"
    _assert_untouched(ep, before)
    assert torch.equal(ep(x)[0].detach(), y_before), "the live layer computes differently after the gather"
    assert type(full) is MoE and not shard_params(full), "the gathered model must hold no expert-shard flags"
    dev = x.device
    for n, p in [*full.named_parameters(), *(("gathered." + n, p) for n, p in gathered.named_parameters())]:
        assert p.device.type == dev.type, f"gathered {n} on {p.device}, the layer is on {dev}"
    live_ptrs = {p.data_ptr() for p in ep.parameters()}
    assert not any(p.data_ptr() in live_ptrs for p in full.parameters()), "the gathered model shares live storage"
    return full


@pytest.mark.parametrize("module_experts", [True, False], ids=["ModuleExperts", "MLPExperts"])
def test_gather_copies_and_leaves_the_live_layer(world_of_one, monkeypatch, module_experts):
    layer = _layer(module_experts)
    ep = ExpertParallelMoE.from_moe(layer)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    full = _gather_and_check(ep, x, monkeypatch)
    torch.testing.assert_close(full(x)[0], layer(x)[0])
    # the live layer still trains, and a second gather sees the update
    ep(x)[0].square().sum().backward()
    with torch.no_grad():
        for p in ep.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    again = ep.to_moe()
    assert not torch.equal(again(x)[0], full(x)[0])


@needs_cuda
@pytest.mark.parametrize("module_experts", [True, False], ids=["ModuleExperts", "MLPExperts"])
def test_gather_on_cuda_keeps_the_live_layer_on_the_gpu(world_of_one, module_experts):
    group = dist.new_group([0], backend="nccl")
    torch.cuda.set_device(0)
    layer = _layer(module_experts).cuda()
    ep = ExpertParallelMoE.from_moe(layer, group)
    x = torch.randn(7, 6, device="cuda")
    full = _gather_and_check(ep, x)
    torch.testing.assert_close(full(x)[0], layer(x)[0])
    ep(x)[0].sum().backward()  # the next CUDA forward + backward of the live layer works
