import math

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.moe import losses as L
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

E, N, C, Dd = 3, 5, 4, 6


def _dbl(*shape, pos=False):
    t = torch.rand(*shape, dtype=torch.float64) if pos else torch.randn(*shape, dtype=torch.float64)
    return t.requires_grad_(True)


def _gates(n=N, e=E):
    return torch.softmax(torch.randn(n, e, dtype=torch.float64), -1).requires_grad_(True)


def test_mixture_cross_entropy_is_nll_of_mixed_probabilities():
    z, g, y = _dbl(E, N, C), _gates(), torch.randint(0, C, (N,))
    mix = torch.einsum("ne,enc->nc", g, torch.softmax(z, -1))  # mixture of expert distributions
    want = -mix.log().gather(1, y[:, None]).mean()
    assert_close(L.mixture_cross_entropy(z, y, g), want, 1e-12, "mixture CE")
    # the double-softmax bug (cross_entropy on the mixed probabilities) gives a different value
    assert abs(F.cross_entropy(mix, y).item() - want.item()) > 1e-3
    lg = torch.log_softmax(torch.randn(N, E, dtype=torch.float64), -1)
    assert_close(L.mixture_cross_entropy(z, y, log_gates=lg), L.mixture_cross_entropy(z, y, lg.exp()), 1e-12, "log")
    assert L.mixture_cross_entropy(z, y, g, reduction="none").shape == (N,)


def test_mixture_cross_entropy_stable_and_zero_gates():
    z = torch.randn(E, N, C, dtype=torch.float64) * 1e4  # extreme logits
    y = torch.randint(0, C, (N,))
    g = torch.zeros(N, E, dtype=torch.float64)
    g[:, 0] = 1.0  # top-1 style gates with exact zeros
    g.requires_grad_(True)
    z.requires_grad_(True)
    loss = L.mixture_cross_entropy(z, y, g)
    assert torch.isfinite(loss)
    assert_close(loss, F.cross_entropy(z[0], y), 1e-9, "single expert = plain CE")
    loss.backward()
    assert torch.isfinite(g.grad).all() and torch.isfinite(z.grad).all()


def test_jacobs_competitive_loss():
    o, t, g = _dbl(E, N, Dd), _dbl(N, Dd), _gates()
    want = sum(g[:, i] * ((t - o[i]) ** 2).sum(-1) for i in range(E)).mean()
    assert_close(L.jacobs_competitive_loss(o, t, g), want, 1e-12, "competitive")
    assert_close(L.jacobs_competitive_loss(o, t, g, half=True), 0.5 * want, 1e-12, "half")


def test_jacobs_loglik_loss():
    o, t, g = _dbl(E, N, Dd), _dbl(N, Dd), _gates()
    want = -torch.log(sum(g[:, i] * torch.exp(-0.5 * ((t - o[i]) ** 2).sum(-1)) for i in range(E))).mean()
    assert_close(L.jacobs_loglik_loss(o, t, g), want, 1e-12, "loglik")
    far = L.jacobs_loglik_loss(o * 0 + 1e3, t, g)  # exp underflows naively; logsumexp keeps it finite
    assert torch.isfinite(far) and far.item() > 1e5
    assert_close(L.jacobs_loglik_loss(o, t, log_gates=g.log()), want, 1e-12, "log gates")


def test_cooperative_loss():
    o, t, g = _dbl(E, N, Dd), _dbl(N, Dd), _gates()
    mix = sum(g[:, i : i + 1] * o[i] for i in range(E))
    assert_close(L.cooperative_loss(o, t, g), ((t - mix) ** 2).sum(-1).mean(), 1e-12, "cooperative")


def test_aux_losses_values():
    uniform = torch.full((8, 4), 0.25, dtype=torch.float64)
    assert L.importance_loss(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert L.switch_balance_loss(uniform, torch.full((4,), 8)).item() == pytest.approx(1.0)
    onehot = torch.zeros(8, 4, dtype=torch.float64)
    onehot[:, 0] = 1
    assert L.switch_balance_loss(onehot, torch.tensor([8, 0, 0, 0])).item() == pytest.approx(4.0)
    v = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert L.cv_squared(v).item() == pytest.approx(v.var(unbiased=False).item() / v.mean().item() ** 2)
    assert L.cv_squared(torch.tensor([5.0])).item() == 0.0
    assert L.load_loss(v).item() == pytest.approx(L.cv_squared(v).item())
    z = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert L.router_z_loss(z).item() == pytest.approx(math.log(2) ** 2)
    assert L.gate_entropy(uniform).item() == pytest.approx(math.log(4))
    assert L.gate_entropy(onehot).item() == pytest.approx(0.0)


def test_gradcheck_every_loss():
    y = torch.randint(0, C, (N,))
    o, t, z, g = _dbl(E, N, Dd), _dbl(N, Dd), _dbl(E, N, C), _gates()
    checks = [
        (lambda a, b: L.mixture_cross_entropy(a, y, b), (z, g)),
        (lambda a, b: L.jacobs_competitive_loss(a, t, b, half=True), (o, g)),
        (lambda a, b: L.jacobs_loglik_loss(a, t, b), (o, g)),
        (lambda a, b: L.cooperative_loss(a, t, b), (o, g)),
        (L.importance_loss, (g,)),
        (L.load_loss, (_dbl(N, E, pos=True),)),
        (lambda p: L.switch_balance_loss(p, torch.tensor([3, 1, 4])), (g,)),
        (L.router_z_loss, (_dbl(N, E),)),
        (L.gate_entropy, (g,)),
        (L.cv_squared, (_dbl(E, pos=True),)),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args), fn


def test_bad_shapes():
    with pytest.raises(MoelabError, match=r"expected expert outputs \(E, N, ...\)"):
        L.jacobs_competitive_loss(torch.randn(3, 5, 2), torch.randn(5, 2), torch.rand(5, 4))
    with pytest.raises(MoelabError, match="target shape"):
        L.jacobs_loglik_loss(torch.randn(3, 5, 2), torch.randn(5, 3), torch.rand(5, 3))
    with pytest.raises(MoelabError, match="exactly one of gates"):
        L.mixture_cross_entropy(torch.randn(3, 5, 2), torch.zeros(5, dtype=torch.long))
    with pytest.raises(MoelabError, match="reduction"):
        L.jacobs_competitive_loss(torch.randn(3, 5, 2), torch.randn(5, 2), torch.rand(5, 3), reduction="avg")
