"""The MoE core on a CUDA device, against the same modules on the CPU.

Skipped (with the reason shown by ``-ra``) where torch sees no CUDA device; run on a GPU machine with
``pytest tests/moe/test_cuda.py``. On CUDA the sparse path takes ``torch._grouped_mm`` (the CPU takes
the bucketed ``baddbmm`` path), so these tests compare the two implementations as well as the devices.
"""

import copy

import pytest
import torch

from moelab import MoE
from moelab.models.conv_experts import ConvExperts
from moelab.moe import MLPExperts
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")

# noisy_topk is left out: its noise comes from each device's own generator, so the routing differs by design.
ROUTERS = ["dense", "topk", "switch", "expert_choice", "soft", "two-gates", "two-gates-max"]


def _forward_backward(layer, x, seed=0):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y, aux = layer(x)
    (y.float().square().mean() + aux.loss).backward()
    return y.detach().float().cpu(), x.grad.float().cpu()


@pytest.mark.parametrize("router", ROUTERS)
def test_layer_on_cuda_matches_cpu(router):
    cpu = MoE(dim=32, num_experts=8, hidden_dim=64, router=router)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 16, 32)
    y_cpu, gx_cpu = _forward_backward(cpu, x)
    y_gpu, gx_gpu = _forward_backward(gpu, x.cuda())
    assert_close(y_gpu, y_cpu, 1e-4, f"{router} output")
    assert_close(gx_gpu, gx_cpu, 1e-4, f"{router} input gradient")
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p_cpu.grad is not None:
            assert_close(p_gpu.grad.cpu(), p_cpu.grad, 1e-4, f"{router} grad {name}")


def test_grouped_mm_path_under_bf16_autocast():
    ex = MLPExperts(8, 64, 128, 64)
    gpu = copy.deepcopy(ex).cuda()
    x = torch.randn(256, 64)
    idx = torch.rand(256, 8).topk(2, dim=-1).indices
    w = torch.rand(256, 2)
    want = ex.forward_sparse(x, idx, w)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu.forward_sparse(x.cuda(), idx.cuda(), w.cuda())
    assert got.dtype == torch.bfloat16
    assert_close(got.float().cpu(), want, 3e-2, "bf16 grouped_mm vs fp32 CPU")


def test_conv_experts_on_cuda_match_cpu():
    cpu = ConvExperts(3, num_classes=10).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 3, 32, 32)
    assert_close(gpu(x.cuda()).cpu(), cpu(x), 1e-3, "ConvExperts logits")
