"""Combine rules of the seed-1 gating variants (the raw-gate routers of moelab.reproductions, ``moe.layer.mix``),
against hand-computed examples; the seed mixture as a ``moelab.MoE``."""

import math

import pytest
import torch

from moelab.errors import MoelabError
from moelab.moe.losses import oracle_routing_loss
from moelab.moe.routers import DenseRouter, MultiGateRouter, TopKRouter
from moelab.reproductions.gating import (
    GATE_KINDS,
    GateNet,
    SeedCombine,
    combine,
    gate_router,
    num_heads,
    seed_moe,
)
from moelab.reproductions.hierarchical import combine_hierarchical, hierarchical_weights, pair_cover
from moelab.reproductions.routers import RawDenseRouter, RawMultiGateRouter, RawTopKRouter

# 3 experts, 1 example, 2 classes: expert e's softmax output
PROBS = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.5, 0.5]]])  # (E=3, N=1, K=2)
G1 = torch.tensor([[2.0, -0.5, 1.0]])  # (N=1, E=3), ELU outputs can be negative (> -1)
G2 = torch.tensor([[0.0, 3.0, -0.25]])


def close(a, b):
    return torch.allclose(a, torch.tensor(b, dtype=a.dtype), atol=1e-6)


def sparse_gates(g):
    """The sparse kind's effective weights: its router's dense view."""
    return SeedCombine("sparse", g.shape[1])([g], torch.zeros(g.shape[1], g.shape[0], 2))[1]


def effective_weights(kind, gates):
    return SeedCombine(kind, gates[0].shape[1])(gates, torch.zeros(gates[0].shape[1], gates[0].shape[0], 2))[1]


def test_standard_is_weighted_sum():
    # 2*[.9,.1] - .5*[.2,.8] + 1*[.5,.5] = [1.8-.1+.5, .2-.4+.5]
    assert close(combine("standard", [G1], PROBS), [[2.2, 0.3]])


def test_sparse_keeps_top2_then_relu():
    assert close(sparse_gates(G1), [[2.0, 0.0, 1.0]])
    # the kept negative value is cut by the ReLU too: top-2 of G2 are 3.0 and 0.0
    assert close(sparse_gates(G2), [[0.0, 3.0, 0.0]])
    assert close(sparse_gates(torch.tensor([[-0.5, -0.2, -0.9]])), [[0.0, 0.0, 0.0]])
    # 2*[.9,.1] + 1*[.5,.5]
    assert close(combine("sparse", [G1], PROBS), [[2.3, 0.7]])
    # the gradient reaches only the kept positive gate values
    g = G1.clone().requires_grad_(True)
    combine("sparse", [g], PROBS).sum().backward()
    assert close(g.grad, [[1.0, 0.0, 1.0]])


def test_two_gates_sums_weights():
    # (G1+G2) = [2, 2.5, .75]: 2*[.9,.1] + 2.5*[.2,.8] + .75*[.5,.5]
    assert close(combine("two-gates", [G1, G2], PROBS), [[1.8 + 0.5 + 0.375, 0.2 + 2.0 + 0.375]])


def test_two_gates_max_is_elementwise_max_of_mixtures():
    m1 = [2.2, 0.3]
    m2 = [0.6 - 0.125, 2.4 - 0.125]  # 3*[.2,.8] - .25*[.5,.5]
    assert close(combine("two-gates-max", [G1, G2], PROBS), [[max(m1[0], m2[0]), max(m1[1], m2[1])]])


def test_expert_aware_combines_like_standard():
    assert close(combine("expert-aware", [G1], PROBS), [[2.2, 0.3]])


def test_softmax_of_combined_logits():
    p = torch.softmax(combine("standard", [G1], PROBS), 1)
    e = math.exp(2.2) / (math.exp(2.2) + math.exp(0.3))
    assert close(p, [[e, 1 - e]])


def test_effective_weights_and_heads():
    assert num_heads("standard") == 1 and num_heads("two-gates-max") == 2
    assert close(effective_weights("two-gates", [G1, G2]), [[2.0, 2.5, 0.75]])
    assert close(effective_weights("sparse", [G1]), [[2.0, 0.0, 1.0]])
    with pytest.raises(MoelabError, match="gate kind 'two-gates' takes 2 gate output"):
        combine("two-gates", [G1], PROBS)
    with pytest.raises(MoelabError, match="gate.kind must be one of .*got 'nope'"):
        combine("nope", [G1], PROBS)
    with pytest.raises(MoelabError, match=r"gates must be \(N, E\) and probs \(E, N, K\)"):
        combine("standard", [G1[:, :2]], PROBS)


def test_kinds_are_raw_gate_subclasses_of_library_routers():
    assert isinstance(gate_router("standard", 3), RawDenseRouter) and isinstance(gate_router("standard", 3), DenseRouter)
    assert isinstance(gate_router("sparse", 3), RawTopKRouter) and isinstance(gate_router("sparse", 3), TopKRouter)
    assert gate_router("sparse", 3).k == 2 and gate_router("sparse", 2, top_k=3).k == 2
    assert isinstance(gate_router("two-gates-max", 3), RawMultiGateRouter)
    assert isinstance(gate_router("two-gates-max", 3), MultiGateRouter) and gate_router("two-gates-max", 3).mode == "max"
    assert gate_router("two-gates", 3).mode == "sum" and gate_router("two-gates", 3).num_gates == 2
    assert isinstance(gate_router("expert-aware", 3), RawDenseRouter)


@pytest.mark.parametrize("kind", ["standard", "sparse", "two-gates", "two-gates-max"])
def test_seed_moe_equals_the_combine_rule_on_live_experts(kind):
    """The mixture as a moelab.MoE (experts run in the layer) equals gate outputs + SeedCombine, with gradients."""
    torch.manual_seed(0)

    class Stack(torch.nn.Module):  # 4 linear "experts" on flat 3x8x8 images -> class probabilities
        num_experts = 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 192, 5) * 0.1)

        def forward(self, x):
            return torch.softmax(torch.einsum("nd,edk->enk", x.flatten(1), self.w), -1)

    gate = GateNet(4, num_heads(kind), width=4, dropout=(0.0, 0.0, 0.0)).eval()
    gate.trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 16 * 4))  # small stand-in trunk
    gate.heads = torch.nn.ModuleList(torch.nn.Linear(64, 4) for _ in range(num_heads(kind)))
    stack, x = Stack(), torch.randn(6, 3, 8, 8)
    moe = seed_moe(stack, gate, kind, top_k=2)
    y, aux = moe(x)
    ref, w = SeedCombine(kind, 4, 2)(gate(x), stack(x))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(aux.gates, w)
    gy = torch.autograd.grad(y.square().sum(), [stack.w, gate.heads[0].weight])
    gr = torch.autograd.grad(ref.square().sum(), [stack.w, gate.heads[0].weight])
    for a, b in zip(gy, gr):
        torch.testing.assert_close(a, b)
    with pytest.raises(MoelabError, match="expert-aware gate reads the experts' outputs"):
        seed_moe(stack, gate, "expert-aware")


def test_oracle_routing_loss():
    cover = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # class 0 in experts 0, 2; class 1 in expert 1
    logp = torch.log_softmax(G1, 1)[0]
    want = -math.log(math.exp(logp[0]) + math.exp(logp[2]))
    assert abs(oracle_routing_loss(G1, torch.tensor([0]), cover).item() - want) < 1e-5


@pytest.mark.parametrize("kind", GATE_KINDS)
def test_gate_net_shapes(kind):
    extra = 7 if kind == "expert-aware" else 0
    net = GateNet(10, num_heads(kind), extra_dim=extra).eval()
    x = torch.randn(3, 3, 32, 32)
    out = net(x, torch.randn(3, 7) if extra else None)
    assert len(out) == num_heads(kind) and all(o.shape == (3, 10) for o in out)
    assert all((o > -1).all() for o in out)  # ELU
    probs = torch.softmax(torch.randn(10, 3, 10), -1)
    assert combine(kind, out, probs).shape == (3, 10)


# hierarchical: 3 classes, experts on pairs (0, 1) and (1, 2): class 1 is in both, classes 0 and 2 in one
R = torch.tensor([[0.5, 0.3, 0.2]])  # the top-level classifier's softmax (N=1, K=3)
HP = torch.tensor([[[0.6, 0.2, 0.2]], [[0.1, 0.3, 0.6]]])  # (E=2, N=1, K=3)


def test_pair_cover():
    assert pair_cover([[0, 1], [1, 2]], 4).tolist() == [[1, 0], [1, 1], [0, 1], [0, 0]]


def test_hierarchical_against_hand_computed_example():
    cover = pair_cover([[0, 1], [1, 2]], 3)
    # masses: expert 0 gets r0 + r1 = 0.8, expert 1 gets r1 + r2 = 0.5; within-pair outputs:
    # expert 0 -> (0.75, 0.25, 0), expert 1 -> (0, 1/3, 2/3); class 1 is covered twice (average)
    p = [0.8 * 0.75, (0.8 * 0.25 + 0.5 / 3) / 2, 0.5 * 2 / 3]
    logits = combine_hierarchical(R, HP, cover)
    assert close(logits, [[math.log(v) for v in p]])
    assert close(torch.softmax(logits, 1), [[v / sum(p) for v in p]])
    assert close(combine_hierarchical(R, HP, cover, blend=0.0), [[math.log(0.5), math.log(0.3), math.log(0.2)]])
    half = combine_hierarchical(R, HP, cover, blend=0.5)
    assert close(half, [[(math.log(a) + math.log(b)) / 2 for a, b in zip(p, [0.5, 0.3, 0.2])]])
    assert close(hierarchical_weights(R, cover), [[0.8 / 1.3, 0.5 / 1.3]])


def test_hierarchical_partition_is_a_product_and_sums_to_one():
    # the seed's layout: each class in one pair of each of two partitions -> p sums to 1
    pairs = [[0, 8], [1, 9], [2, 6], [3, 5], [4, 7], [0, 9], [1, 8], [2, 7], [3, 6], [4, 5]]
    cover = pair_cover(pairs, 10)
    gen = torch.Generator().manual_seed(0)
    r = torch.softmax(torch.randn(4, 10, generator=gen), 1)
    probs = torch.softmax(torch.randn(10, 4, 10, generator=gen), -1)
    p = combine_hierarchical(r, probs, cover).exp()
    assert torch.allclose(p.sum(1), torch.ones(4), atol=1e-5)
    # experts that agree with the top level within their pairs reproduce it exactly
    same = r.unsqueeze(0).expand(10, -1, -1)
    assert torch.allclose(combine_hierarchical(r, same, cover).exp(), r, atol=1e-6)
    # a class outside every pair keeps the top level's probability
    small = pair_cover([[0, 1]], 3)
    out = combine_hierarchical(R, HP[:1], small).exp()
    assert close(out, [[0.8 * 0.75, 0.8 * 0.25, 0.2]])


def test_hierarchical_shape_errors_name_the_shapes():
    with pytest.raises(MoelabError, match=r"class_probs must be \(N, K\), probs \(E, N, K\) and cover \(K, E\); "
                                          r"got \(1, 3\), \(2, 1, 3\), \(2, 3\)"):
        combine_hierarchical(R, HP, pair_cover([[0, 1], [1, 2]], 3).t())
