"""The seed-2 models: the faithful NumPy-layout mixture (checked against a transcription of the seed's own
functions) and the modern MLP mixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.models.mlp_mixture import (
    SeedMixture,
    SeedMLP,
    add_bias_column,
    jacobs_competitive_loss_seed,
    mixture_predict,
    mlp,
    mlp_mixture,
    seed_mixture_gradients,
    seed_mlp_gradients,
)


# ----------------------------------------------------------------------------------------------------------
# A direct NumPy transcription of the seed's functions (mixture_of_experts.py), with its globals passed in as
# arguments. The seed hard-codes 10 experts and 10 classes (error_of_each_expert_by_example, feed_forward_ME),
# so the oracle uses E = C = 10.
def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_feed_forward(l2_weights, l3_weights, data):
    z2 = data.dot(l2_weights)
    a2 = np.c_[np.ones((z2.shape[0], 1)), np_sigmoid(z2)]
    z3 = a2.dot(l3_weights)
    a3 = np_sigmoid(z3)
    return a2, a3


def np_mean_squared_error(hypotheses, targets):
    return np.sum(0.5 * (hypotheses - targets) ** 2) / hypotheses.shape[0]


def np_gradient_expert_NN(signal, a2, a3, l2_weights, l3_weights, data):
    a3_delta = signal * a3 * (1 - a3)
    l3_weights_grad = a2.T.dot(a3_delta) / data.shape[0]
    a2_grad = a3_delta.dot(l3_weights[1:, :].T)
    a2_delta = a2_grad * a2[:, 1:] * (1 - a2[:, 1:])
    l2_weights_grad = data.T.dot(a2_delta) / data.shape[0]
    return l2_weights_grad, l3_weights_grad


def np_feed_forward_gating_NN(l2_weights, softmax_weights, data):
    z2 = data.dot(l2_weights)
    a2 = np.c_[np.ones((z2.shape[0], 1)), np_sigmoid(z2)]
    z3 = a2.dot(softmax_weights)
    z3 -= z3.max()
    z3_exp = np.exp(z3)
    z3_row_sum = z3_exp.sum(1)
    a3 = z3_exp / z3_row_sum.reshape((-1, 1))
    return a2, a3


def np_feed_forward_ME(w, data):
    gating_l2_states, gating_hypotheses = np_feed_forward_gating_NN(w["gl2"], w["gsm"], data)
    expert_l2_states = np.zeros((10, data.shape[0], w["el2"].shape[2] + 1))
    expert_hypotheses = np.zeros((10, data.shape[0], 10))
    for i in range(10):
        l2_states, hypotheses = np_feed_forward(w["el2"][i], w["el3"][i], data)
        expert_l2_states[i] = l2_states
        expert_hypotheses[i] = hypotheses
    return gating_l2_states, gating_hypotheses, expert_l2_states, expert_hypotheses


def np_error_of_each_expert_by_example(expert_hypotheses, targets):
    individual_errors = np.zeros(expert_hypotheses[0].shape)
    for i in range(10):
        individual_errors[:, i] = np.sum((expert_hypotheses[i] - targets) ** 2, 1)
    return individual_errors


def np_mean_squared_error_ME(gating_hypotheses, expert_hypotheses, targets):
    weighted_individual_errors = gating_hypotheses * np_error_of_each_expert_by_example(expert_hypotheses, targets)
    return 0.5 * np.sum(weighted_individual_errors) / targets.shape[0]


def np_hypothesis_ME(gating_hypotheses, expert_hypotheses):
    hypothesis_ME = np.zeros(expert_hypotheses[0].shape)
    for i in range(expert_hypotheses.shape[0]):
        hypothesis_ME += gating_hypotheses[:, i].reshape((-1, 1)) * expert_hypotheses[i]
    return hypothesis_ME


def np_gradient_ME(w, gating_l2_layer_states, gating_hypotheses, expert_l2_states, expert_hypotheses, data, targets):
    individual_errors = np_error_of_each_expert_by_example(expert_hypotheses, targets)
    collective_errors = np.sum(gating_hypotheses * individual_errors, 1)
    delta_softmax = gating_hypotheses * (individual_errors - collective_errors.reshape((-1, 1)))
    gating_softmax_weights_grad = gating_l2_layer_states.T.dot(delta_softmax) / targets.shape[0]
    delta_gating_l2 = delta_softmax.dot(w["gsm"][1:, :].T)
    gating_l2_grad = delta_gating_l2 * gating_l2_layer_states[:, 1:] * (1 - gating_l2_layer_states[:, 1:])
    gating_l2_weights_grad = data.T.dot(gating_l2_grad) / targets.shape[0]
    expert_l2_weights_grad = np.zeros(w["el2"].shape)
    expert_l3_weights_grad = np.zeros(w["el3"].shape)
    for i in range(10):
        signal = gating_hypotheses[:, i].reshape((-1, 1)) * (expert_hypotheses[i] - targets)
        expert_l2_weights_grad[i], expert_l3_weights_grad[i] = np_gradient_expert_NN(
            signal, expert_l2_states[i], expert_hypotheses[i], w["el2"][i], w["el3"][i], data)
    return gating_l2_weights_grad, gating_softmax_weights_grad, expert_l2_weights_grad, expert_l3_weights_grad


# ----------------------------------------------------------------------------------------------------------
def _tiny(n=13, d=6, seed=0):
    rng = np.random.default_rng(seed)
    data = np.c_[np.ones((n, 1)), rng.random((n, d))]
    targets = np.zeros((n, 10))
    targets[np.arange(n), rng.integers(0, 10, n)] = 1
    return data, targets


def _seed_weights(model: SeedMixture) -> dict:
    return {"gl2": model.gate_hidden.detach().numpy().copy(), "gsm": model.gate_softmax.detach().numpy().copy(),
            "el2": model.expert_hidden.detach().numpy().copy(), "el3": model.expert_output.detach().numpy().copy()}


def test_seed_layout_and_init():
    m = SeedMixture(generator=torch.Generator().manual_seed(0))
    assert m.gate_hidden.shape == (197, 25) and m.gate_softmax.shape == (26, 10)
    assert m.expert_hidden.shape == (10, 197, 25) and m.expert_output.shape == (10, 26, 10)
    for p in m.parameters():  # np.random.random(shape) - 0.5
        p = p.detach()
        assert float(p.min()) >= -0.5 and float(p.max()) < 0.5 and abs(float(p.mean())) < 0.02
    assert sum(p.numel() for p in m.parameters()) == 11 * (197 * 25 + 26 * 10)
    s = SeedMLP()
    assert s.hidden.shape == (197, 25) and s.output.shape == (26, 10)


def test_faithful_mixture_matches_seed_numpy():
    """The faithfulness oracle: loss, outputs and the training gradient equal the seed's own functions."""
    data, targets = _tiny()
    m = SeedMixture(in_dim=6, hidden_dim=4, gate_hidden_dim=3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    w = _seed_weights(m)
    gs, gh, es, eh = np_feed_forward_ME(w, data)
    x, y = torch.from_numpy(data), torch.from_numpy(targets)
    gates, outs = m(x)
    np.testing.assert_allclose(gates.detach().numpy(), gh, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(outs.detach().numpy(), eh, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(SeedMixture.combine(gates, outs).detach().numpy(), np_hypothesis_ME(gh, eh), rtol=1e-12)
    seed_loss = np_mean_squared_error_ME(gh, eh, targets)
    assert float(m.loss(x, y).detach()) == pytest.approx(seed_loss, rel=1e-13)
    assert float(jacobs_competitive_loss_seed(gates, outs, y).detach()) == pytest.approx(seed_loss, rel=1e-13)

    seed_grads = np_gradient_ME(w, gs, gh, es, eh, data, targets)
    names = ("gate_hidden", "gate_softmax", "expert_hidden", "expert_output")
    # the fast full-batch training gradient (default gate_grad_scale=2) is the seed's gradient_ME exactly,
    # whatever the chunking
    for chunk in (4, 13, 100):
        r = seed_mixture_gradients(m, x.T.contiguous(), y.T.contiguous(), chunk=chunk)
        assert r["loss"] == pytest.approx(seed_loss, rel=1e-13)
        for name, g in zip(names, seed_grads):
            np.testing.assert_allclose(getattr(m, name).grad.numpy(), g, rtol=1e-10, atol=1e-14)
    # autograd gives the true gradient of the loss; the seed's gate gradient is twice that
    for p in m.parameters():
        p.grad = None
    m.loss(x, y).backward()
    for name, g in zip(names, seed_grads):
        scale = 2.0 if name.startswith("gate") else 1.0
        np.testing.assert_allclose(scale * getattr(m, name).grad.numpy(), g, rtol=1e-10, atol=1e-14)


def test_seed_gate_gradient_is_twice_the_finite_difference():
    """Documents the seed's gradient_ME: its gate part is 2x the numerical gradient of mean_squared_error_ME."""
    data, targets = _tiny(n=5, d=3, seed=3)
    m = SeedMixture(in_dim=3, hidden_dim=2, gate_hidden_dim=2, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    w = _seed_weights(m)
    gs, gh, es, eh = np_feed_forward_ME(w, data)
    seed_gsm_grad = np_gradient_ME(w, gs, gh, es, eh, data, targets)[1]
    delta = 1e-6
    i, j = 1, 4
    for sign, store in ((1, "plus"), (-1, "minus")):
        w2 = {k: v.copy() for k, v in w.items()}
        w2["gsm"][i, j] += sign * delta
        _, gh2, _, eh2 = np_feed_forward_ME(w2, data)
        w[store] = np_mean_squared_error_ME(gh2, eh2, targets)
    numeric = (w["plus"] - w["minus"]) / (2 * delta)
    assert seed_gsm_grad[i, j] == pytest.approx(2 * numeric, rel=1e-6)


def test_faithful_single_matches_seed_numpy():
    data, targets = _tiny(n=11)
    s = SeedMLP(in_dim=6, hidden_dim=5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    l2, l3 = s.hidden.detach().numpy().copy(), s.output.detach().numpy().copy()
    a2, a3 = np_feed_forward(l2, l3, data)
    x, y = torch.from_numpy(data), torch.from_numpy(targets)
    np.testing.assert_allclose(s(x).detach().numpy(), a3, rtol=1e-12)
    assert float(s.loss(x, y).detach()) == pytest.approx(np_mean_squared_error(a3, targets), rel=1e-13)
    g2, g3 = np_gradient_expert_NN(a3 - targets, a2, a3, l2, l3, data)
    r = seed_mlp_gradients(s, x.T.contiguous(), y.T.contiguous(), chunk=4)
    assert r["loss"] == pytest.approx(np_mean_squared_error(a3, targets), rel=1e-13)
    np.testing.assert_allclose(s.hidden.grad.numpy(), g2, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(s.output.grad.numpy(), g3, rtol=1e-10, atol=1e-14)


def test_fast_gradients_float32_close_to_float64():
    data, targets = _tiny(n=300, d=20, seed=5)
    m64 = SeedMixture(in_dim=20, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    m32 = SeedMixture(in_dim=20)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    xt, yt = torch.from_numpy(data).T.contiguous(), torch.from_numpy(targets).T.contiguous()
    r64 = seed_mixture_gradients(m64, xt, yt, chunk=64, lead_counts=True)
    r32 = seed_mixture_gradients(m32, xt.float(), yt.float(), chunk=128, lead_counts=True)
    assert r32["loss"] == pytest.approx(r64["loss"], rel=1e-5)
    assert int(r64["lead_counts"].sum()) == 300 and torch.equal(r64["lead_counts"], r32["lead_counts"])
    for p64, p32 in zip(m64.parameters(), m32.parameters()):
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)


def test_add_bias_column():
    x = torch.rand(4, 3)
    xb = add_bias_column(x)
    assert xb.shape == (4, 4) and torch.equal(xb[:, 0], torch.ones(4)) and torch.equal(xb[:, 1:], x)


def test_modern_mixture_budget_and_shapes():
    torch.manual_seed(0)
    m = mlp_mixture(10, 196, 25, 10, 25, "gelu")
    # ten 196-25-10 experts and a 196-25-10 gate, biases included: the seed's budget
    assert sum(p.numel() for p in m.parameters()) == 11 * (197 * 25 + 26 * 10)
    single = mlp(196, 25, 10)
    assert sum(p.numel() for p in single.parameters()) == 197 * 25 + 26 * 10
    x = torch.rand(7, 196)
    y, aux = m(x)
    logits, gate_logits = aux.expert_outputs, aux.logits
    assert logits.shape == (10, 7, 10) and gate_logits.shape == (7, 10)
    torch.testing.assert_close(y, torch.einsum("ne,enc->nc", torch.softmax(gate_logits, -1), logits))
    probs, gates = mixture_predict(m, x)
    torch.testing.assert_close(probs.sum(1), torch.ones(7))
    torch.testing.assert_close(gates.sum(1), torch.ones(7))
    # the mixture probability is sum_i g_i softmax(z_i)
    ref = torch.einsum("ne,enc->nc", torch.softmax(gate_logits, -1), torch.softmax(logits, -1))
    torch.testing.assert_close(probs, ref.detach())


def test_bad_dimensions_raise():
    with pytest.raises(MoelabError):
        SeedMixture(num_experts=0)
    with pytest.raises(MoelabError):
        mlp(196, 25, 10, activation="nope")
    with pytest.raises(MoelabError):
        mlp_mixture(num_experts=-1)


def test_modern_gradients_match_float64_autograd_of_reference():
    """mlp_mixture on MLPExperts computes what a loop of nn.Sequential experts computes."""
    torch.manual_seed(1)
    m = mlp_mixture(3, 8, 4, 5, 4, "gelu").double()
    x = torch.rand(6, 8, dtype=torch.float64)
    logits = m(x)[1].expert_outputs
    for e in range(3):
        h = F.gelu(x @ m.experts.w1[e] + m.experts.b1[e])
        torch.testing.assert_close(logits[e], h @ m.experts.w2[e] + m.experts.b2[e])


def test_fast_gradients_skip_all_zero_inputs_exactly():
    data, targets = _tiny(n=40, d=9, seed=7)
    data[:, [2, 5, 6]] = 0.0  # inputs that are 0 in every example
    rows = torch.tensor([0, 1, 3, 4, 7, 8, 9])
    x, y = torch.from_numpy(data), torch.from_numpy(targets)
    m = SeedMixture(in_dim=9, hidden_dim=4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    full = seed_mixture_gradients(m, x.T.contiguous(), y.T.contiguous(), chunk=16)
    ref = {k: p.grad.clone() for k, p in m.named_parameters()}
    part = seed_mixture_gradients(m, x.T[rows].contiguous(), y.T.contiguous(), chunk=16, rows=rows)
    assert part["loss"] == pytest.approx(full["loss"], rel=1e-14)
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-12, atol=1e-15)
    assert float(m.gate_hidden.grad[2].abs().max()) == 0.0
    s = SeedMLP(in_dim=9, hidden_dim=4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    seed_mlp_gradients(s, x.T.contiguous(), y.T.contiguous())
    ref = [p.grad.clone() for p in s.parameters()]
    seed_mlp_gradients(s, x.T[rows].contiguous(), y.T.contiguous(), rows=rows)
    for p, r in zip(s.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-15)


def test_fast_gradients_with_worker_threads_match():
    data, targets = _tiny(n=100, d=5, seed=10)
    x, y = torch.from_numpy(data).T.contiguous(), torch.from_numpy(targets).T.contiguous()
    m = SeedMixture(in_dim=5, hidden_dim=3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    one = seed_mixture_gradients(m, x, y, chunk=16, lead_counts=True)
    ref = [p.grad.clone() for p in m.parameters()]
    two = seed_mixture_gradients(m, x, y, chunk=16, lead_counts=True, workers=2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-13) and two["correct"] == one["correct"]
    assert torch.equal(two["lead_counts"], one["lead_counts"])
    for p, r in zip(m.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-15)
    s = SeedMLP(in_dim=5, hidden_dim=3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    one = seed_mlp_gradients(s, x, y, chunk=16)
    ref = [p.grad.clone() for p in s.parameters()]
    two = seed_mlp_gradients(s, x, y, chunk=16, workers=3)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-13) and two["correct"] == one["correct"]
    for p, r in zip(s.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-15)


def test_training_trajectory_matches_seed_loop():
    """Ten epochs of the seed's train_mixture_of_experts / train_benchmark_NN loops (full-batch GD, lr 10)
    and of ours, from the same weights, end at the same weights."""
    data, targets = _tiny(n=40, d=6, seed=13)
    lr = 10.0
    m = SeedMixture(in_dim=6, hidden_dim=4, gate_hidden_dim=3, generator=torch.Generator().manual_seed(14),
                    dtype=torch.float64)
    w = _seed_weights(m)
    for _ in range(10):  # the seed's loop body
        gs, gh, es, eh = np_feed_forward_ME(w, data)
        gl2, gsm, el2, el3 = np_gradient_ME(w, gs, gh, es, eh, data, targets)
        w["gl2"] -= lr * gl2
        w["gsm"] -= lr * gsm
        w["el2"] -= lr * el2
        w["el3"] -= lr * el3
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    xt, yt = torch.from_numpy(data).T.contiguous(), torch.from_numpy(targets).T.contiguous()
    for _ in range(10):
        seed_mixture_gradients(m, xt, yt, chunk=16)
        opt.step()
    for name, key in (("gate_hidden", "gl2"), ("gate_softmax", "gsm"), ("expert_hidden", "el2"),
                      ("expert_output", "el3")):
        np.testing.assert_allclose(getattr(m, name).detach().numpy(), w[key], rtol=1e-9, atol=1e-12)

    s = SeedMLP(in_dim=6, hidden_dim=4, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    l2, l3 = s.hidden.detach().numpy().copy(), s.output.detach().numpy().copy()
    for _ in range(10):
        a2, hyp = np_feed_forward(l2, l3, data)
        g2, g3 = np_gradient_expert_NN(hyp - targets, a2, hyp, l2, l3, data)
        l2 -= lr * g2
        l3 -= lr * g3
    opt = torch.optim.SGD(s.parameters(), lr=lr)
    for _ in range(10):
        seed_mlp_gradients(s, xt, yt)
        opt.step()
    np.testing.assert_allclose(s.hidden.detach().numpy(), l2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.output.detach().numpy(), l3, rtol=1e-9, atol=1e-12)
