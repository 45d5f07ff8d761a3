
import inspect

import pytest
import torch
from torch import nn

import moelab
from moelab import MLPExperts, MoE, MoEAux
from moelab.errors import MoelabError
from moelab.moe import losses as L
from moelab.moe.routers import ROUTERS, TopKRouter, router_options
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

D, E, H = 8, 4, 16
ROUTER_NAMES = ["dense", "topk", "noisy_topk", "switch", "expert_choice", "soft", "uniform", "hash", "two-gates",
                "two-gates-max"]


def _pair(router, **kw):
    """Our layer and the naive reference: same router weights, experts as a ModuleExperts loop."""
    ours = MoE(dim=D, num_experts=kw.pop("num_experts", E), hidden_dim=H, router=router, **kw)
    ref = MoE(dim=D, num_experts=ours.num_experts, router=router, experts=ours.experts.to_module_experts(), **kw)
    ref.router.load_state_dict(ours.router.state_dict())
    return ours, ref


def _run(layer, x, seed=0):
    torch.manual_seed(seed)  # same noise / random routing draws for both layers
    return layer(x)


def _assert_equivalent(ours, ref, x, tol=1e-5):
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, a1 = _run(ours, x1)
    y2, a2 = _run(ref, x2)
    assert_close(y1, y2, tol, "output")
    assert_close(a1.loss, a2.loss, tol, "aux loss")
    assert_close(a1.gates, a2.gates, tol, "gates")
    g = torch.randn_like(y1)
    (y1 * g).sum().add(a1.loss).backward()
    (y2 * g).sum().add(a2.loss).backward()
    assert_close(x1.grad, x2.grad, tol, "grad x")
    for (n1, p1), (_, p2) in zip(ours.router.named_parameters(), ref.router.named_parameters()):
        if p1.grad is not None or p2.grad is not None:
            assert_close(p1.grad, p2.grad, tol, f"grad router.{n1}")


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_every_router_matches_naive_reference(router):
    ours, ref = _pair(router)
    _assert_equivalent(ours, ref, torch.randn(3, 5, D))


@pytest.mark.parametrize("router,kw", [("topk", {"k": E}), ("topk", {"k": 1}),
                                       ("switch", {"router_options": {"capacity_factor": 0.5}}),
                                       ("topk", {"k": 2, "router_options": {"capacity_factor": 0.6}}),
                                       ("noisy_topk", {"k": 3})])
@pytest.mark.filterwarnings("ignore:router .* with k=1:UserWarning")  # top-1 softmax on purpose
def test_router_options_match_naive(router, kw):
    ours, ref = _pair(router, **kw)
    _assert_equivalent(ours, ref, torch.randn(20, D))


@pytest.mark.filterwarnings("ignore:router .* with k=1:UserWarning")  # top-1 softmax on purpose
@pytest.mark.parametrize("router", ["topk", "dense", "switch", "expert_choice", "soft", "hash"])
@pytest.mark.parametrize("n,e", [(1, E), (6, 1)])
def test_edge_shapes(router, n, e):
    kw = {"k": 1} if router == "topk" else {}
    ours, ref = _pair(router, num_experts=e, **kw)
    _assert_equivalent(ours, ref, torch.randn(n, D))


def test_api_contract_and_aux():
    layer = MoE(dim=D, num_experts=E, hidden_dim=H, router="topk", k=2)
    x = torch.randn(2, 3, D)
    y, aux = layer(x)
    assert isinstance(aux, MoEAux) and y.shape == (2, 3, D)
    assert aux.gates.shape == (6, E) and aux.logits.shape == (6, E) and aux.indices.shape == (6, 2)
    assert aux.expert_counts.shape == (E,) and aux.expert_counts.sum().item() == 12
    assert aux.dropped.dtype == torch.long and aux.dropped.item() == 0
    assert aux.loss.dim() == 0 and set(aux.losses) == {"balance", "z", "importance", "entropy"}
    assert_close(aux.loss, 0.01 * aux.losses["balance"], 1e-7, "default weighted aux loss")
    assert MoE(dim=D, num_experts=E, out_dim=5)(x)[0].shape == (2, 3, 5)
    assert MoE(dim=D, num_experts=E).experts.hidden_dim == 4 * D


def test_aux_loss_weights_and_no_silent_drop():
    layer = MoE(dim=D, num_experts=E, router="topk", k=2, aux_loss_weights={"balance": 0.5, "z": 0.1, "entropy": 0})
    _, aux = layer(torch.randn(10, D))
    assert_close(aux.loss, 0.5 * aux.losses["balance"] + 0.1 * aux.losses["z"], 1e-6, "weighted sum")
    x = torch.randn(10, D)
    aux.loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0  # the aux loss reaches the router
    with pytest.raises(MoelabError, match="unknown auxiliary loss 'balanse'"):
        MoE(dim=D, num_experts=E, aux_loss_weights={"balanse": 1.0})
    with pytest.raises(MoelabError, match="router 'dense' does not produce the 'load' loss"):
        MoE(dim=D, num_experts=E, router="dense", aux_loss_weights={"load": 1.0})
    _, aux = MoE(dim=D, num_experts=E, router="noisy_topk", k=2)(x)
    assert {"importance", "load"} <= set(aux.losses)
    assert_close(aux.loss, 0.1 * aux.losses["importance"] + 0.1 * aux.losses["load"], 1e-6, "paper weights")


def test_bad_inputs():
    layer = MoE(dim=D, num_experts=E)
    with pytest.raises(MoelabError, match=r"MoE expected input of shape \(\.\.\., 8\), got \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(MoelabError, match=r"router 'topk': k must be an int in \[1, num_experts=4\], got 5"):
        MoE(dim=D, num_experts=E, k=5)
    with pytest.raises(MoelabError, match="capacity_factor must be > 0"):
        MoE(dim=D, num_experts=E, router="switch", router_options={"capacity_factor": 0})
    with pytest.raises(MoelabError, match=r"unknown router 'topq'; valid routers: .*expert_choice.*topk"):
        MoE(dim=D, num_experts=E, router="topq")
    x = torch.randn(4, D)
    x[1, 2] = float("inf")
    with pytest.raises(MoelabError, match="router 'topk' produced"):
        layer(x)
    with pytest.raises(MoelabError, match="dim is required"):
        MoE(num_experts=E)


def test_custom_gate_experts_and_activations():
    gate = nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, E))
    layer = MoE(dim=D, num_experts=E, router="topk", k=2, gate=gate,
                experts=MLPExperts(E, D, H, activation="relu", output_activation="sigmoid"))
    y, aux = layer(torch.randn(5, D))
    assert layer.router.gate is gate and ((y > 0) & (y < 1)).all()
    mods = [nn.Linear(D, 3) for _ in range(E)]
    layer = MoE(dim=D, num_experts=E, router="dense", experts=mods)
    x = torch.randn(5, D)
    y, aux = layer(x)
    want = sum(aux.gates[:, i : i + 1] * mods[i](x) for i in range(E))
    assert_close(y, want, 1e-5, "list of modules as experts")
    with pytest.raises(MoelabError, match="num_experts=3 but the experts stack has 4"):
        MoE(dim=D, num_experts=3, experts=mods)


def test_jacobs_style_dense_outputs_for_losses():
    layer = MoE(dim=196, num_experts=4, router="dense",
                experts=MLPExperts(4, 196, 25, 10, activation="sigmoid", output_activation="sigmoid"))
    x, t = torch.randn(6, 196), torch.rand(6, 10)
    y, aux = layer(x)
    assert aux.expert_outputs.shape == (4, 6, 10)
    assert_close(y, torch.einsum("ne,eno->no", aux.gates, aux.expert_outputs), 1e-6, "mixture")
    loss = L.jacobs_loglik_loss(aux.expert_outputs, t, aux.gates) + aux.loss
    loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_two_gates_max_is_elementwise_max_of_mixtures():
    layer = MoE(dim=D, num_experts=E, hidden_dim=H, router="two-gates-max")
    x = torch.randn(7, D)
    y, aux = layer(x)
    mg = aux.routing.multi_gates
    mixes = torch.einsum("gne,eno->gno", mg, aux.expert_outputs)
    assert_close(y, torch.maximum(mixes[0], mixes[1]), 1e-6, "max of mixtures")
    y2, aux2 = MoE(dim=D, num_experts=E, hidden_dim=H, router="two-gates")(x)
    assert_close(aux2.gates.sum(-1), torch.full((7,), 2.0), 1e-5, "summed gate weights")


def test_soft_moe_groups_tokens_per_example():
    layer = MoE(dim=D, num_experts=E, hidden_dim=H, router="soft", router_options={"slots_per_expert": 2})
    x = torch.randn(3, 6, D)
    y, _ = layer(x)
    y_first, _ = layer(x[:1])
    assert_close(y[:1], y_first, 1e-5, "examples do not mix")
    x2 = x.clone()
    x2[0, 0] += 1.0  # changing one token changes its example's other tokens (through the slots)
    assert not torch.allclose(layer(x2)[0][0, 1], y[0, 1])


def test_switch_drops_reported_in_aux():
    layer = MoE(dim=D, num_experts=E, hidden_dim=H, router="switch", router_options={"capacity_factor": 0.5})
    x = torch.randn(40, D)
    y, aux = layer(x)
    cap = 5  # ceil(0.5 * 40 / 4)
    assert (aux.expert_counts <= cap).all() and aux.dropped.item() == 40 - aux.expert_counts.sum().item() > 0
    dropped_rows = aux.gates.sum(-1) == 0
    assert (y[dropped_rows] == 0).all() and int(dropped_rows.sum()) == aux.dropped.item()


@pytest.mark.parametrize("router", ["topk", "dense", "expert_choice", "soft", "switch"])
def test_autocast_bf16(router):
    layer = MoE(dim=32, num_experts=E, hidden_dim=64, router=router)
    x = torch.randn(4, 8, 32, requires_grad=True)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, aux = layer(x)
    assert y16.dtype == torch.bfloat16 and aux.gates.dtype == torch.float32
    assert (y16.float() - y32).abs().max() <= 5e-2 * max(1.0, y32.abs().max().item())
    (y16.float().sum() + aux.loss).backward()
    assert torch.isfinite(x.grad).all()


def test_public_exports():
    assert moelab.__version__ == "0.1.0"
    assert {"MoE", "MoEAux", "MLPExperts", "ModuleExperts", "make_router", "losses"} <= set(moelab.__all__)
    assert "ConvExperts" not in moelab.__all__  # the CIFAR seed's CNN stack: moelab.reproductions.conv_experts
    from moelab.moe import MLPExperts, ModuleExperts, losses, routers  # noqa: F401
    from moelab.moe.routers import ROUTERS, TopKRouter, make_router  # noqa: F401

    assert ROUTERS["topk"] is TopKRouter


def test_torch_compile_dense_path_fullgraph():
    """In this process (no timeout that could turn into a skip): one graph, the eager result."""
    layer = MoE(dim=16, num_experts=4, hidden_dim=32, router="dense")
    x = torch.randn(5, 16)
    f = torch.compile(lambda t: layer(t), fullgraph=True, backend="eager")
    y, aux = f(x)
    y0, aux0 = layer(x)
    assert (y - y0).abs().max() < 1e-5 and (aux.loss - aux0.loss).abs() < 1e-6
    expl = torch._dynamo.explain(lambda t: layer(t))(x)
    assert expl.graph_break_count == 0, expl.break_reasons


def test_dim_none_with_stack_experts_and_custom_gate():
    class Stack(nn.Module):  # like ConvExperts: forward(x (N, ...)) -> (E, N, classes)
        num_experts = 3

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 12, 5))

        def forward(self, x):
            return torch.einsum("nd,edo->eno", x.flatten(1), self.w)

    stack = Stack()
    gate = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(4, 3, 4)  # per-sample "images"
    for router in ["dense", "topk"]:
        layer = MoE(num_experts=3, router=router, experts=stack, gate=gate)
        y, aux = layer(x)
        assert y.shape == (4, 5)
        want = torch.einsum("ne,eno->no", aux.gates, stack(x))
        assert_close(y, want, 1e-5, router)


ALL_ROUTERS = ["dense", "topk", "noisy_topk", "switch", "expert_choice", "soft", "multi_gate", "uniform", "hash",
               "random"]


@pytest.mark.parametrize("shape", [(0, D), (0, 5, D), (3, 0, D)])
@pytest.mark.parametrize("impl", ["auto", "grouped", "static"])
@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_empty_batch(router, impl, shape):
    """No tokens: an empty output of the right shape, every auxiliary loss 0 (not NaN), and a backward pass."""
    layer = MoE(dim=D, num_experts=E, router=router, experts=MLPExperts(E, D, H, sparse_impl=impl))
    x = torch.randn(*shape, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == shape and aux.loss.shape == () and aux.loss.item() == 0.0
    assert all(torch.isfinite(v) and v.item() == 0 for v in aux.losses.values()), aux.losses
    slots = shape[0] if router == "soft" else 0  # soft: one (zero) slot per expert and group, even of 0 tokens
    assert aux.expert_counts.tolist() == [slots] * E and aux.dropped.item() == 0
    assert aux.gates.shape == (0, E)
    (y.square().sum() + aux.loss).backward()
    assert x.grad.shape == shape
    for name, p in layer.named_parameters():
        assert p.grad is None or (p.grad == 0).all(), name


@pytest.mark.parametrize("router", ["switch", "topk"])
def test_empty_then_full_batch_with_capacity(router):
    layer = MoE(dim=D, num_experts=E, hidden_dim=H, router=router, router_options={"capacity_factor": 1.0})
    y, aux = layer(torch.randn(0, D))
    assert y.shape == (0, D) and aux.loss.item() == 0.0
    y, aux = layer(torch.randn(9, D))
    assert y.shape == (9, D) and torch.isfinite(aux.loss)


def test_option_checks_name_the_value():
    with pytest.raises(MoelabError, match=r"router 'topk': k must be an int in \[1, num_experts=4\], got True"):
        MoE(dim=D, num_experts=E, router="topk", k=True)
    for router in ["noisy_topk", "hash"]:
        with pytest.raises(MoelabError, match=rf"router '{router}': k must be an int .*got True"):
            MoE(dim=D, num_experts=E, router=router, k=True)
    for bad in [float("nan"), float("inf"), -0.1, "0.1", True]:
        with pytest.raises(MoelabError, match=r"aux_loss_weights\['balance'\] must be a finite number >= 0"):
            MoE(dim=D, num_experts=E, router="topk", aux_loss_weights={"balance": bad})
    with pytest.raises(MoelabError, match=r"aux_loss_weights\['entropy'\]"):
        MoE(dim=D, num_experts=E, router="topk", aux_loss_weights={"entropy": float("-inf")})
    layer = MoE(dim=D, num_experts=E, router="topk", aux_loss_weights={"entropy": -0.01})  # documented: spreads
    assert layer.aux_loss_weights["entropy"] == -0.01
    for key, bad in [("dim", True), ("num_experts", True)]:
        with pytest.raises(MoelabError, match=rf"MoE: {key} must be a positive int, got True"):
            MoE(**{"dim": D, "num_experts": E, key: bad})


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "hash"])
def test_one_expert_default_k(router, recwarn):
    """The default k (2 for topk / noisy_topk) is clamped to the number of experts; no top-1 warning for E = 1."""
    layer = MoE(dim=D, num_experts=1, hidden_dim=H, router=router)
    assert layer.router.k == 1
    y, aux = layer(torch.randn(5, D))
    assert y.shape == (5, D) and aux.indices.shape == (5, 1)
    assert not [w for w in recwarn if "k=1" in str(w.message)]
    with pytest.raises(MoelabError, match=r"k must be an int in \[1, num_experts=1\], got 2"):
        MoE(dim=D, num_experts=1, router=router, k=2)


@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
def test_top1_softmax_warns_once(router):
    with pytest.warns(UserWarning, match=r"k=1: the softmax over one chosen logit is always 1.*router='switch'") as rec:
        MoE(dim=D, num_experts=E, router=router, k=1)
    assert len([w for w in rec if "k=1" in str(w.message)]) == 1


@pytest.mark.parametrize("router,kw", [("switch", {}), ("topk", {"k": 2}), ("hash", {"k": 1}),
                                       ("topk", {"k": 1, "router_options": {"normalize": False}})])
def test_top1_weights_that_learn_do_not_warn(router, kw, recwarn):
    """switch weighs by the full softmax probability, normalize=False too: no warning."""
    MoE(dim=D, num_experts=E, router=router, **kw)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning) and "k=1" in str(w.message)]


@pytest.mark.parametrize("router,opts,match", [
    ("switch", {"capacity_factor": float("inf")}, "capacity_factor must be > 0"),
    ("switch", {"capacity_factor": float("nan")}, "capacity_factor must be > 0"),
    ("switch", {"capacity_factor": True}, "capacity_factor must be > 0"),
    ("topk", {"capacity_factor": -1.0}, "capacity_factor must be > 0"),
    ("expert_choice", {"capacity_factor": 0}, "capacity_factor must be > 0"),
    ("noisy_topk", {"capacity_factor": float("inf")}, "capacity_factor must be > 0"),
    ("noisy_topk", {"noise_epsilon": -1e-3}, "noise_epsilon must be >= 0"),
    ("noisy_topk", {"noise_epsilon": float("nan")}, "noise_epsilon must be >= 0"),
    ("soft", {"slots_per_expert": True}, "slots_per_expert must be >= 1"),
    ("soft", {"slots_per_expert": 1.5}, "slots_per_expert must be >= 1"),
    ("soft", {"slots_per_expert": 0}, "slots_per_expert must be >= 1"),
    ("multi_gate", {"num_gates": True}, "num_gates must be >= 1"),
    ("switch", {"jitter": 1.0}, r"jitter must be >= 0 and < 1"),
    ("switch", {"jitter": float("nan")}, r"jitter must be >= 0 and < 1"),
    ("dense", {"temperature": 0.0}, "temperature must be > 0"),
    ("dense", {"temperature": float("inf")}, "temperature must be > 0"),
    ("topk", {"normalize": 1}, "normalize must be True or False"),
    ("hash", {"seed": -1}, "seed must be >= 0"),
])
def test_numeric_router_options_are_checked_by_their_router(router, opts, match):
    with pytest.raises(MoelabError, match=rf"router '{router}': {match}.*got"):
        MoE(dim=D, num_experts=E, router=router, router_options=opts)


def test_moe_takes_at_most_ten_parameters():
    """#35: the layer takes dims, a router spec, experts and loss weights; the router owns its options."""
    params = [p for p in inspect.signature(MoE.__init__).parameters if p != "self"]
    assert len(params) <= 10, params
    for option in ("capacity_factor", "noise_epsilon", "slots_per_expert", "num_gates", "gate_mode", "sparse_impl"):
        assert option not in params


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_refuses_an_option_it_does_not_take(router):
    """An unknown option through MoE: one MoelabError naming the router, the option and the ones it takes."""
    with pytest.raises(MoelabError, match=rf"router '{router}' does not take option\(s\) \['bogus'\]; it takes \["):
        MoE(dim=D, num_experts=E, router=router, router_options={"bogus": 1})
    if not ROUTERS[router].takes_k:
        with pytest.raises(MoelabError, match=rf"router '{router}' does not take option\(s\) \['k'\]"):
            MoE(dim=D, num_experts=E, router=router, k=2)


def test_takes_k_and_extra_gates_match_the_router_signatures():
    for cls in ROUTERS.values():
        opts = router_options(cls)
        assert cls.takes_k == ("k" in opts), cls.name
        assert all(g in opts for g in cls.extra_gates), cls.name
    assert ROUTERS["noisy_topk"].extra_gates == ("noise_gate",)


def test_router_spec_errors_name_what_to_do():
    with pytest.raises(MoelabError, match=r"MoE: k given twice \(k= and router_options\['k'\]\)"):
        MoE(dim=D, num_experts=E, router="topk", k=2, router_options={"k": 2})
    with pytest.raises(MoelabError, match="MoE: router_options must be a mapping"):
        MoE(dim=D, num_experts=E, router="topk", router_options=[("k", 2)])
    built = TopKRouter(D, E, k=2)
    with pytest.raises(MoelabError, match=r"router is a built TopKRouter \(router 'topk'\); give capacity_factor, k"):
        MoE(dim=D, num_experts=E, router=built, k=2, router_options={"capacity_factor": 1.0})
    with pytest.raises(MoelabError, match=r"num_experts=3 but router 'topk' routes to 4 experts"):
        MoE(dim=D, num_experts=3, router=built)
    layer = MoE(dim=D, num_experts=E, hidden_dim=H, router=built)  # a built router, as it is
    assert layer.router is built and layer(torch.randn(5, D))[0].shape == (5, D)
    layer = MoE(dim=D, num_experts=E, hidden_dim=H, router=TopKRouter, k=1, router_options={"normalize": False})
    assert isinstance(layer.router, TopKRouter) and layer.router.k == 1  # a Router subclass, built with the options
