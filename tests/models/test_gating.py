"""Combine rules of the seed-1 gating variants, against hand-computed examples."""

import math

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models.gating import (
    GATE_KINDS,
    GateNet,
    combine,
    effective_weights,
    num_heads,
    oracle_routing_loss,
    sparse_gates,
)

# 3 experts, 1 example, 2 classes: expert e's softmax output
PROBS = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.5, 0.5]]])  # (E=3, N=1, K=2)
G1 = torch.tensor([[2.0, -0.5, 1.0]])  # (N=1, E=3), ELU outputs can be negative (> -1)
G2 = torch.tensor([[0.0, 3.0, -0.25]])


def close(a, b):
    return torch.allclose(a, torch.tensor(b, dtype=a.dtype), atol=1e-6)


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
    with pytest.raises(MoelabError):
        combine("two-gates", [G1], PROBS)
    with pytest.raises(MoelabError):
        combine("nope", [G1], PROBS)


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
