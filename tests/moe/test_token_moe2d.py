import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from moelab.cost import count_flops
from moelab.errors import MoelabError
from moelab.moe import MLPExperts, TokenMoE2d
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

N, C, H, W = 3, 8, 5, 4


def _naive(m: TokenMoE2d, x):
    """Every position routed on its own, written out: a loop over images, positions and chosen experts."""
    ex, router = m.moe.experts, m.moe.router
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                t = x[n, :, i, j]  # (C,)
                logits = t @ router.gate.weight.T  # (E,)
                top = logits.topk(router.k)
                gates = torch.softmax(top.values, -1)
                for g, e in zip(gates, top.indices):
                    h = F.gelu(t @ ex.w1[e] + ex.b1[e])
                    out[n, :, i, j] += g * (h @ ex.w2[e] + ex.b2[e])
    return x + m.norm(out)


@pytest.mark.filterwarnings("ignore:router .* with k=1:UserWarning")  # top-1 softmax on purpose
@pytest.mark.parametrize("k", [1, 2])
def test_equals_a_loop_over_positions_and_experts_train_and_eval(k):
    m = TokenMoE2d(C, 4, 16, router="topk", k=k).double()
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    for mode in ("train", "eval"):
        m.train(mode == "train")
        y, aux = m(x)
        ref = _naive(m, x)
        assert_close(y, ref, 1e-10, f"output ({mode})")
        gx, gw = torch.autograd.grad(y.square().sum(), (x, m.moe.experts.w1))
        rx, rw = torch.autograd.grad(ref.square().sum(), (x, m.moe.experts.w1))
        assert_close(gx, rx, 1e-9, f"input gradient ({mode})")
        assert_close(gw, rw, 1e-9, f"expert weight gradient ({mode})")
        assert aux.gates.shape == (N * H * W, 4) and int(aux.expert_counts.sum()) == N * H * W * k


def test_channels_last_input_same_output():
    m = TokenMoE2d(C, 4, 16, k=2)
    x = torch.randn(N, C, H, W)
    y, _ = m(x)
    yc, _ = m(x.contiguous(memory_format=torch.channels_last))
    assert_close(yc, y, 1e-5, "channels_last")


def test_gradcheck_float64():
    m = TokenMoE2d(4, 3, 5, k=2, norm=nn.Identity()).double()
    names = ["moe.experts.w1", "moe.experts.b1", "moe.experts.w2", "moe.experts.b2", "moe.router.gate.weight"]
    params = tuple(m.get_parameter(k).detach().clone().requires_grad_() for k in names)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *p):
        y, aux = functional_call(m, dict(zip(names, p)), (x,))
        return y, aux.loss

    assert torch.autograd.gradcheck(f, (x, *params))


def test_one_expert_dense_is_a_pointwise_ffn_of_the_same_active_flops():
    """The dense twin of a top-k layer: one expert of k x the hidden width, every position, as 1x1 convs."""
    twin = TokenMoE2d(C, 1, 2 * 16, router="dense", norm=nn.Identity()).double()
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    ex = twin.moe.experts
    h = F.gelu(F.conv2d(x, ex.w1[0].T[:, :, None, None], ex.b1[0]))
    ref = x + F.conv2d(h, ex.w2[0].T[:, :, None, None], ex.b2[0])
    assert_close(twin(x)[0], ref, 1e-12, "twin")
    # counted FLOPs: without expert biases the top-2 layer on its grouped path costs exactly its twin's
    # expert FLOPs (with biases, the grouped path's ones-columns add a few %: conservative for the mixture)
    sparse = TokenMoE2d(C, 8, 16, router="topk", k=2, norm=nn.Identity(),
                        experts=MLPExperts(8, C, 16, bias=False)).eval()
    twin = TokenMoE2d(C, 1, 2 * 16, router="dense", norm=nn.Identity(),
                      experts=MLPExperts(1, C, 2 * 16, bias=False)).eval()
    sparse.moe.experts.sparse_impl = "grouped"  # counted on exactly the routed rows
    x = x.float()

    def expert_flops(mod):
        return count_flops(mod, x) - 2 * N * H * W * C * mod.moe.num_experts  # less the router's projection

    assert expert_flops(sparse) == expert_flops(twin) == 2 * N * H * W * (2 * C * 2 * 16)


@pytest.mark.filterwarnings("ignore:router .* with k=1:UserWarning")  # top-1 softmax on purpose
def test_bad_input_is_named():
    m = TokenMoE2d(C, 4, 16, k=1)
    with pytest.raises(MoelabError, match=r"TokenMoE2d expected input \(N, 8, H, W\), got \(3, 7, 5, 4\)"):
        m(torch.randn(3, 7, 5, 4))
    with pytest.raises(MoelabError, match="channels must be a positive int, got 0"):
        TokenMoE2d(0, 4, 16)


@pytest.mark.parametrize("router", ["topk", "switch", "noisy_topk", "soft", "expert_choice", "dense", "hash", "multi_gate", "uniform"])
@pytest.mark.parametrize("shape", [(0, C, H, W), (2, C, 0, 0), (2, C, 3, 0)])
def test_empty_feature_map(router, shape):
    """No positions (no images, or H*W = 0): y has x's shape, aux.loss is 0 (not NaN), backward works and
    BatchNorm's running statistics stay finite."""
    m = TokenMoE2d(C, 4, 16, router=router).train()
    x = torch.randn(*shape, requires_grad=True)
    y, aux = m(x)
    assert y.shape == shape and aux.loss.item() == 0.0 and aux.gates.shape == (0, 4)
    (y.square().sum() + aux.loss).backward()
    assert x.grad.shape == shape
    assert torch.isfinite(m.norm.running_mean).all() and torch.isfinite(m.norm.running_var).all()
