import math

import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.moe.routers import (
    ROUTERS,
    DenseRouter,
    ExpertChoiceRouter,
    HashRouter,
    MultiGateRouter,
    NoisyTopKRouter,
    SoftMoERouter,
    SwitchRouter,
    TopKRouter,
    UniformRouter,
    make_router,
    noisy_topk_load,
)
from moelab.moe.routers.base import capacity_mask, expert_capacity
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

D, E, N = 8, 5, 17


def _x(n=N, d=D, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


def test_registry_names():
    assert set(ROUTERS) == {"dense", "topk", "noisy_topk", "switch", "expert_choice", "soft", "multi_gate",
                            "uniform", "hash"}
    assert isinstance(make_router("Two-Gates-Max", D, E), MultiGateRouter)
    assert make_router("two-gates-max", D, E).mode == "max"
    assert make_router("random", D, E).mode == "random"


def test_unknown_router_lists_valid_names():
    with pytest.raises(MoelabError, match=r"unknown router 'topk2'; valid routers: .*dense.*noisy_topk.*switch"):
        make_router("topk2", D, E)
    with pytest.raises(MoelabError, match=r"router 'dense' does not take option\(s\) \['k'\]"):
        make_router("dense", D, E, k=2)


def test_dense_router():
    r = DenseRouter(D, E)(_x())
    assert r.kind == "dense" and r.dense_gates().shape == (N, E)
    assert_close(r.dense_gates().sum(-1), torch.ones(N), 1e-6, "rows sum to 1")
    assert (r.dense_gates() > 0).all()
    assert r.expert_counts.tolist() == [N] * E and int(r.dropped) == 0
    assert set(r.losses) == set(DenseRouter.loss_names)


@pytest.mark.filterwarnings("ignore:router .* with k=1:UserWarning")  # top-1 softmax on purpose
@pytest.mark.parametrize("k", [1, 2, E])
def test_topk_invariants(k):
    router = TopKRouter(D, E, k=k)
    x = _x()
    r = router(x)
    assert r.indices.shape == (N, k) and r.weights.shape == (N, k)
    assert_close(r.weights.sum(-1), torch.ones(N), 1e-6, "top-k weights sum to 1")
    assert all(len(set(row.tolist())) == k for row in r.indices)  # distinct experts
    logits = router.gate(x)
    want = logits.topk(k, -1).indices
    assert torch.equal(r.indices, want)
    assert_close(r.weights, torch.softmax(logits.gather(1, want), -1), 1e-6, "softmax over the top-k logits")
    assert_close(r.dense_gates().sum(-1), torch.ones(N), 1e-6, "dense view")
    assert ((r.dense_gates() > 0).sum(-1) == k).all()
    assert r.expert_counts.sum().item() == N * k and r.mask is None


def test_custom_gate_is_used():
    gate = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, E))
    for name in ["dense", "topk", "noisy_topk", "switch", "expert_choice"]:
        router = make_router(name, D, E, gate=gate).eval()
        x = _x()
        assert router.gate is gate
        assert_close(router(x).logits, gate(x), 1e-6, name)
    with pytest.raises(MoelabError, match=r"gate must map x .* to logits \(\.\.\., 5\)"):
        TopKRouter(D, E, gate=nn.Linear(D, 3))(_x())


@pytest.mark.parametrize("name", ["dense", "topk", "noisy_topk", "switch", "expert_choice", "soft", "multi_gate",
                                  "uniform", "hash"])
def test_non_finite_logits_raise_naming_router(name):
    class Bad(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.width = width

        def forward(self, x):
            out = torch.zeros(*x.shape[:-1], self.width)
            out[..., 0] = float("nan")
            return out

    width = {"soft": E, "multi_gate": 2 * E}.get(name, E)
    router = make_router(name, D, E, gate=Bad(width))
    x = _x().view(1, N, D) if name == "soft" else _x()
    with pytest.raises(MoelabError, match=rf"router '{name}' produced .* non-finite logits"):
        router(x)


def test_finite_check_is_on_for_cpu_and_opt_in_on_accelerators(monkeypatch):
    from moelab.moe.routers.base import CHECK_FINITE_ENV, check_finite, finite_checks_on

    monkeypatch.delenv(CHECK_FINITE_ENV, raising=False)
    assert finite_checks_on(torch.device("cpu")) and not finite_checks_on(torch.device("cuda"))
    monkeypatch.setenv(CHECK_FINITE_ENV, "1")
    assert finite_checks_on(torch.device("cuda"))
    monkeypatch.setenv(CHECK_FINITE_ENV, "0")  # off everywhere: NaN logits pass through unchecked
    assert not finite_checks_on(torch.device("cpu"))
    check_finite(torch.tensor([float("nan")]), "topk")
    monkeypatch.setenv(CHECK_FINITE_ENV, "1")
    with pytest.raises(MoelabError, match=r"router 'topk' produced 1 non-finite logits"):
        check_finite(torch.tensor([float("nan"), 1.0]), "topk")


def test_bad_router_options():
    for name in ["topk", "noisy_topk", "hash"]:
        with pytest.raises(MoelabError, match=rf"router '{name}': k must be an int in \[1, num_experts=5\]"):
            make_router(name, D, E, k=6)
        with pytest.raises(MoelabError, match="k must be"):
            make_router(name, D, E, k=0)
    for name in ["switch", "expert_choice", "topk"]:
        for cf in [0, -1.0]:
            with pytest.raises(MoelabError, match=rf"router '{name}': capacity_factor must be > 0"):
                make_router(name, D, E, capacity_factor=cf)
    with pytest.raises(MoelabError, match="num_experts must be >= 1"):
        make_router("dense", D, 0)
    with pytest.raises(MoelabError, match="slots_per_expert"):
        SoftMoERouter(D, E, slots_per_expert=0)
    with pytest.raises(MoelabError, match="mode must be 'sum' or 'max'"):
        MultiGateRouter(D, E, mode="min")


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
def test_switch_capacity_and_drops(cf):
    router = SwitchRouter(D, E, capacity_factor=cf)
    x = _x(40)
    r = router(x)
    cap = math.ceil(cf * 40 / E)
    assert (r.expert_counts <= cap).all()
    probs = torch.softmax(router.gate(x), -1)
    top = probs.argmax(-1)
    seen = [0] * E  # reference: token order, first come first served
    keep = []
    for t in top.tolist():
        keep.append(seen[t] < cap)
        seen[t] += 1
    keep = torch.tensor(keep)
    assert torch.equal(r.mask[:, 0], keep)
    assert int(r.dropped) == int((~keep).sum()) == 40 - int(r.expert_counts.sum())
    assert_close(r.weights[:, 0], probs.max(-1).values, 1e-6, "switch weight = router prob")
    assert (r.dense_gates()[~keep] == 0).all()
    if cf == 0.5:
        assert int(r.dropped) > 0


def test_capacity_mask_priority_first_choices_first():
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])  # expert 0: first choices of tokens 0 and 2, second of token 1
    mask = capacity_mask(idx, 2, capacity=2)
    assert mask.tolist() == [[True, True], [True, False], [True, False]]
    assert expert_capacity(10, 4, 2, 1.0) == 5


@pytest.mark.parametrize("cf,n", [(1.0, 17), (2.0, 17), (0.1, 17), (100.0, 6)])
def test_expert_choice_fills_each_expert(cf, n):
    router = ExpertChoiceRouter(D, E, capacity_factor=cf)
    x = _x(n)
    r = router(x)
    c = min(n, max(1, math.ceil(cf * n / E)))
    assert r.expert_tokens.shape == (E, c) and r.expert_counts.tolist() == [c] * E
    probs = torch.softmax(router.gate(x), -1)
    for e in range(E):
        toks = r.expert_tokens[e]
        assert len(set(toks.tolist())) == c  # distinct tokens, exactly C of them
        assert_close(r.expert_weights[e], probs[toks, e], 1e-6, "weights are router probs")
        others = torch.ones(n, dtype=torch.bool)
        others[toks] = False
        if others.any():
            assert probs[others, e].max() <= probs[toks, e].min()  # it chose its top-C tokens
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[r.expert_tokens.reshape(-1)] = True
    assert int(r.dropped) == int((~chosen).sum())


@pytest.mark.parametrize("p", [1, 3])
def test_soft_moe_normalisation(p):
    router = SoftMoERouter(D, E, slots_per_expert=p)
    x = torch.randn(3, 7, D)  # (B, m, d)
    r = router(x)
    assert r.dispatch.shape == (3, 7, E * p) and r.combine.shape == (3, 7, E * p)
    assert_close(r.dispatch.sum(1), torch.ones(3, E * p), 1e-6, "dispatch: softmax over tokens per slot")
    assert_close(r.combine.sum(2), torch.ones(3, 7), 1e-6, "combine: softmax over slots per token")
    logits = router.gate(x)
    assert_close(r.dispatch, torch.softmax(logits, 1), 1e-6, "dispatch")
    assert_close(r.dense_gates().sum(-1), torch.ones(21), 1e-6, "gates")
    assert r.expert_counts.tolist() == [3 * p] * E
    with pytest.raises(MoelabError, match=r"expects grouped tokens \(B, m, d\)"):
        router(_x())
    normed = SoftMoERouter(D, E, normalize=True)
    assert torch.isfinite(normed(x * 1e3).combine).all()


def test_noisy_topk_load_matches_monte_carlo():
    torch.manual_seed(1)
    n, e, k = 4, 6, 2
    clean = torch.randn(n, e, dtype=torch.float64)
    std = torch.rand(n, e, dtype=torch.float64) + 0.3
    noisy = clean + torch.randn(n, e, dtype=torch.float64) * std
    p = noisy_topk_load(clean, noisy, std, k)
    s = 200_000
    for i in range(e):  # resample expert i's noise only, others fixed
        others = noisy.clone()
        others[:, i] = -math.inf
        kth = others.topk(k, -1).values[:, -1:]  # k-th largest among the other experts
        sample = clean[:, i : i + 1] + torch.randn(n, s, dtype=torch.float64) * std[:, i : i + 1]
        mc = (sample > kth).double().mean(1)
        assert_close(p[:, i], mc, 5e-3, f"expert {i}")
    assert torch.equal(noisy_topk_load(clean, noisy, std, e), torch.ones(n, e, dtype=torch.float64))


def test_noisy_topk_uses_noisy_logits_and_is_deterministic_in_eval():
    router = NoisyTopKRouter(D, E, k=2)
    nn.init.normal_(router.noise_gate.weight)
    x = _x()
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.indices, b.indices)
    assert_close(a.logits, router.gate(x), 1e-6, "eval: clean logits")
    router.train()
    eps = torch.randn(N, E)
    r = router.route(x, eps=eps)
    std = torch.nn.functional.softplus(router.noise_gate(x)) + router.noise_epsilon
    noisy = router.gate(x) + eps * std
    assert torch.equal(r.indices, noisy.topk(2, -1).indices)
    assert_close(r.weights.sum(-1), torch.ones(N), 1e-6, "weights sum to 1")
    load = noisy_topk_load(router.gate(x), noisy, std, 2)
    assert_close(r.losses["load"], (load.sum(0).var(unbiased=False) / load.sum(0).mean() ** 2), 1e-5, "load CV^2")
    assert not torch.equal(router(x).logits, router(x).logits)  # training: fresh noise every call


def test_multi_gate_sum_and_max():
    router = MultiGateRouter(D, E, num_gates=3, mode="sum")
    r = router(_x())
    assert r.multi_gates.shape == (3, N, E)
    assert_close(r.dense_gates().sum(-1), torch.full((N,), 3.0), 1e-5, "summed gates")
    heads = [nn.Linear(D, E), nn.Linear(D, E)]
    r2 = MultiGateRouter(D, E, gate=heads, mode="max")
    assert r2.num_gates == 2
    x = _x()
    assert_close(r2(x).multi_gates[1], torch.softmax(heads[1](x), -1), 1e-6, "list of gates")


def test_uniform_and_hash():
    r = UniformRouter(D, E)(_x())
    assert_close(r.dense_gates(), torch.full((N, E), 1 / E), 0, "uniform")
    assert len(list(UniformRouter(D, E).parameters())) == 0
    h = HashRouter(D, E, k=2)
    x = _x()
    a, b = h(x), h(x)
    assert torch.equal(a.indices, b.indices) and a.indices.shape == (N, 2)
    assert_close(a.weights, torch.full((N, 2), 0.5), 0, "hash weights")
    assert torch.equal(a.indices, (x @ h.projection).topk(2, -1).indices)
    rnd = HashRouter(D, E, mode="random")
    draws = torch.stack([rnd(_x(200)).indices for _ in range(2)])
    assert not torch.equal(draws[0], draws[1])
    assert len(list(h.parameters())) == 0


def _double_router(name, **kw):
    return make_router(name, D, E, **kw).double()


@pytest.mark.parametrize("name,kw,field", [
    ("dense", {}, "gates"),
    ("topk", {"k": 2}, "weights"),
    ("switch", {"capacity_factor": 2.0}, "weights"),
    ("expert_choice", {}, "expert_weights"),
    ("multi_gate", {}, "multi_gates"),
])
def test_gradcheck_routers(name, kw, field):
    router = _double_router(name, **kw)
    x = _x(6, dtype=torch.float64).requires_grad_(True)

    def f(inp):
        r = router(inp)
        return getattr(r, field), *[v for v in r.losses.values() if v.requires_grad]

    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)


def test_gradcheck_noisy_topk_and_soft():
    router = _double_router("noisy_topk", k=2)
    nn.init.normal_(router.noise_gate.weight)
    x = _x(6, dtype=torch.float64).requires_grad_(True)
    eps = torch.randn(6, E, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: (router.route(t, eps=eps).weights,
                                               router.route(t, eps=eps).losses["load"]), (x,), fast_mode=True)
    soft = _double_router("soft", slots_per_expert=2)
    xs = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: (soft(t).dispatch, soft(t).combine), (xs,), fast_mode=True)


@pytest.mark.parametrize("name,kw", [("topk", {"k": 2}), ("topk", {"k": 2, "capacity_factor": 0.5}),
                                     ("switch", {}), ("noisy_topk", {"k": 2})])
def test_sparse_router_losses_match_library_definitions(name, kw):
    from moelab.moe import losses as L

    router = make_router(name, D, E, **kw).eval()
    x = _x(30)
    r = router(x)
    logits = router.gate(x)
    probs = torch.softmax(logits, -1)
    assert_close(r.losses["z"], L.router_z_loss(logits), 1e-5, "z")
    assert_close(r.losses["entropy"], L.gate_entropy(probs), 1e-5, "entropy")
    assert_close(r.losses["importance"], L.importance_loss(r.dense_gates()), 1e-5, "importance")
    counts = torch.bincount(r.indices.reshape(-1), minlength=E)
    assert_close(r.losses["balance"], L.switch_balance_loss(probs, counts), 1e-5, "balance")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fast_topk_matches_torch_topk(k):
    from moelab.moe.routers.base import topk

    x = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    v, i = topk(x, k)
    v2, i2 = x.topk(k, dim=-1)
    assert torch.equal(i, i2) and torch.equal(v, v2)
    g = torch.randn_like(v)
    assert torch.equal(torch.autograd.grad(v, x, g)[0], torch.autograd.grad(v2, x, g)[0])


@pytest.mark.parametrize("name", ["dense", "topk", "multi_gate"])
def test_library_routers_take_no_seed_options(name):
    """The CIFAR seed's un-normalised gates are subclasses in moelab.reproductions.routers, not options here."""
    with pytest.raises(MoelabError, match=rf"router '{name}' does not take option\(s\) \['gate_values'\]"):
        make_router(name, 4, 3, gate_values="raw")
    with pytest.raises(MoelabError, match=r"unknown router 'seed_sparse'"):
        make_router("seed_sparse", 4, 3)


def test_mix_refuses_routings_that_skip_tokens():
    from moelab.moe.layer import mix

    r = make_router("expert_choice", 4, 2)(torch.randn(8, 4))
    with pytest.raises(MoelabError, match="routing kind 'expert_choice' runs experts on a subset"):
        mix(r, torch.randn(2, 8, 3))
