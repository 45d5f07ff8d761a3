"""The CIFAR seed's raw-gate routers (moelab.reproductions.routers): subclasses of the library routers whose gate
outputs weigh the experts as they are."""

import pytest
import torch
from torch import nn

from moelab import MoE
from moelab.errors import MoelabError
from moelab.moe.layer import mix
from moelab.reproductions.routers import SEED_ROUTERS, RawTopKRouter, make_seed_router


def test_raw_gate_values_weigh_experts_as_the_gate_gives_them():
    """Dense and multi-gate use the gate outputs as they are, top-k keeps the k largest through ReLU."""
    g = torch.tensor([[2.0, -0.5, 1.0], [-0.3, -0.2, 0.4]], dtype=torch.float64, requires_grad=True)
    ident = nn.Identity()
    dense = make_seed_router("seed_standard", 3, gate=ident)(g)
    assert torch.equal(dense.gates, g)
    top = make_seed_router("seed_sparse", 3, gate=ident)(g)
    assert top.dense_gates().tolist() == [[2.0, 0.0, 1.0], [0.0, 0.0, 0.4]]  # -0.2 kept, then cut by ReLU
    two = torch.cat([g, g.flip(1)], 1)
    summed = make_seed_router("seed_two_gates", 3, gate=ident)(two)
    assert torch.allclose(summed.dense_gates(), g + g.flip(1))
    probs = torch.softmax(torch.randn(3, 2, 4, dtype=torch.float64), -1)  # (E, N, K)
    mx = make_seed_router("seed_two_gates_max", 3, gate=ident)(two)
    want = torch.maximum(torch.einsum("ne,enk->nk", g, probs), torch.einsum("ne,enk->nk", g.flip(1), probs))
    assert torch.allclose(mix(mx, probs), want)
    assert torch.allclose(mix(top, probs), torch.einsum("ne,enk->nk", top.dense_gates(), probs))
    assert torch.autograd.gradcheck(lambda t: mix(make_seed_router("seed_sparse", 3, gate=ident)(t), probs), (g,))


def test_raw_topk_runs_without_the_fused_softmax_kernel_and_without_the_top1_warning(recwarn):
    """Its weights are not a softmax: the fused CPU kernel (softmax weights) is never taken, k = 1 does not warn."""
    layer = MoE(dim=6, num_experts=4, hidden_dim=8, router=RawTopKRouter, k=1)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning) and "k=1" in str(w.message)]
    x = torch.randn(9, 6)
    y, aux = layer(x)
    logits = layer.router.gate(x)
    top = logits.topk(1, dim=-1)
    assert torch.equal(aux.indices, top.indices)
    assert torch.allclose(aux.routing.weights, torch.relu(top.values))


def test_seed_router_names_and_options_are_checked():
    assert set(SEED_ROUTERS) == {"seed_standard", "seed_sparse", "seed_two_gates", "seed_two_gates_max"}
    with pytest.raises(MoelabError, match=r"unknown seed router 'seed_dense'; valid: seed_standard"):
        make_seed_router("seed_dense", 3)
    with pytest.raises(MoelabError, match=r"router 'raw_dense' does not take option\(s\) \['k'\]"):
        make_seed_router("seed_standard", 3, gate=nn.Identity(), k=2)
    with pytest.raises(MoelabError, match=r"router 'raw_topk': k must be an int in \[1, num_experts=3\], got 4"):
        make_seed_router("seed_sparse", 3, gate=nn.Identity(), k=4)
