import pytest
import torch
from torch import nn

from moelab import kernels
from moelab.errors import MoelabError
from moelab.moe import ConvBlockExperts, MoE
from moelab.moe import dispatch as D
from moelab.moe.conv_blocks import ConvBlock
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

E, N, HW = 3, 10, 6  # N = 10 images over 3 experts: the per-expert counts always differ (padded slots)
TOL = 1e-10


@pytest.fixture(autouse=True)
def _pytorch_dispatch():
    """The PyTorch dispatch twins: building the fused CPU kernels takes ~40 s (they have their own tests)."""
    with kernels.use(False):
        yield


def _experts(cin=4, cout=4, stride=1, hidden=None, residual=None, train=True, impl="grouped"):
    ex = ConvBlockExperts(cin, cout, E, stride, hidden, residual=residual, impl=impl).double()
    with torch.no_grad():  # non-trivial BN affine parameters and running stats
        for name, t in ex.named_parameters():
            if name.startswith("bn"):
                t.add_(0.3 * torch.randn_like(t))
        for name, t in ex.named_buffers():
            if "running" in name:
                t.copy_(torch.rand_like(t) + (0.5 if "var" in name else -0.5))
    return ex.train(train)


def _gate(cin, bias=None):
    gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, E)).double()
    if bias is not None:
        with torch.no_grad():
            gate[2].bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return gate


def _naive(mods, x, indices, weights, mask):
    """y[n] = sum_j w[n, j] * block_{e_j}(x[n]); block e runs once, on the images routed to it (kept by mask)."""
    out = None
    for e, m in enumerate(mods):
        tok, slot = torch.nonzero((indices == e) & mask, as_tuple=True)
        if tok.numel() == 0:  # an expert without images is not called (its BN stats stay as they are)
            continue
        ye = m(x.index_select(0, tok))  # (n_e, O, H', W')
        out = ye.new_zeros(x.shape[0], *ye.shape[1:]) if out is None else out
        out = out.index_add(0, tok, weights[tok, slot].to(ye.dtype).view(-1, 1, 1, 1) * ye)
    return out


def _check_state(ex, mods):
    for e, m in enumerate(mods):
        got = ex.expert_state_dict(e)
        for k, v in m.state_dict().items():
            torch.testing.assert_close(got[k], v, msg=lambda s, k=k, e=e: f"expert {e} {k}: {s}")


def _check_layer(ex, gate, router, train, cin=4, **opts):
    mods = ex.to_modules()
    assert all(m.training == train for m in mods)
    layer = MoE(num_experts=E, experts=ex, gate=gate, router=router, **opts).train(train)
    x = torch.randn(N, cin, HW, HW, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, aux = layer(x)
    r = layer.router(x_ref)  # the same routing, as a function of x_ref (gate gradients)
    if r.kind == "dense":
        r.indices = torch.arange(E).expand(N, E)
        r.weights = r.gates
    mask = torch.ones_like(r.indices, dtype=torch.bool) if r.mask is None else r.mask
    y_ref = _naive(mods, x_ref, r.indices, r.weights, mask)
    assert_close(y, y_ref, TOL, "output")
    g = torch.randn_like(y)
    gate_params, ex_params = list(gate.parameters()), list(ex.parameters())
    grads = torch.autograd.grad(y, [x, *gate_params, *ex_params], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *gate_params, *(p for m in mods for p in m.parameters())], g,
                                    materialize_grads=True)  # an expert without images: zero gradients
    assert_close(grads[0], grads_ref[0], TOL, "grad x")
    ng, npar = len(gate_params), len(ex_params)
    for i in range(ng):
        assert_close(grads[1 + i], grads_ref[1 + i], TOL, f"grad gate {i}")
    names = [k for k, _ in ex.named_parameters()]
    assert names == [k for k, _ in mods[0].named_parameters()]
    for i, k in enumerate(names):  # module e's i-th parameter is grads_ref[1 + ng + e * npar + i]
        want = torch.cat([grads_ref[1 + ng + e * npar + i] for e in range(E)])
        assert_close(grads[1 + ng + i], want, TOL, f"grad {k}")
    _check_state(ex, mods)  # BN running stats and num_batches_tracked updated as by the loop
    return aux


@pytest.mark.filterwarnings("ignore:router .* with k=1:UserWarning")  # top-1 softmax on purpose
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("router,opts", [("topk", dict(k=1)), ("topk", dict(k=2)),
                                         ("switch", dict(router_options={"capacity_factor": 1.0}))],
                         ids=["top1", "top2", "switch"])
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_moe_matches_naive_loop_over_experts(router, opts, train, impl):
    aux = _check_layer(_experts(train=train, impl=impl), _gate(4), router, train, **opts)
    assert len(set(aux.expert_counts.tolist())) > 1  # unequal loads: padded slots were computed
    if router == "switch":
        assert aux.dropped > 0  # capacity ceil(10/3) = 4 per expert drops some images


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_moe_downsampling_block_without_residual(train, impl):
    ex = _experts(4, 6, stride=2, hidden=5, train=train, impl=impl)
    assert not ex.residual
    _check_layer(ex, _gate(4), "topk", train, k=2)


@pytest.mark.parametrize("router,opts", [("dense", {}), ("topk", dict(k=E))])
def test_dense_path_every_expert_on_every_image(router, opts):
    _check_layer(_experts(), _gate(4), router, True, **opts)  # BN statistics over all N images per expert


@pytest.mark.filterwarnings("ignore:router .* with k=1:UserWarning")  # top-1 softmax on purpose
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_expert_without_images_keeps_its_stats_and_gets_no_gradient(impl):
    ex = _experts(impl=impl)
    before = ex.expert_state_dict(2)
    aux = _check_layer(ex, _gate(4, bias=[0.0, 0.0, -1e3]), "topk", True, k=1)
    assert aux.expert_counts[2] == 0
    for k, v in ex.expert_state_dict(2).items():
        torch.testing.assert_close(v, before[k])
    assert ex.bn1.num_batches_tracked.tolist() == [1, 1, 0]
    y, _ = MoE(num_experts=E, experts=ex, gate=_gate(4, bias=[0.0, 0.0, -1e3]), router="topk", k=1)(
        torch.randn(N, 4, HW, HW, dtype=torch.float64))
    y.sum().backward()
    assert (ex.conv1.weight.grad.unflatten(0, (E, -1))[2] == 0).all()
    assert (ex.conv1.weight.grad.unflatten(0, (E, -1))[:2] != 0).any()


def test_forward_slots_and_full_groups_are_plain_per_expert_batches():
    ex = _experts()
    mods = ex.to_modules()
    xs = torch.randn(E, 4, 4, HW, HW, dtype=torch.float64)
    ys = ex.forward_slots(xs)
    assert ys.shape == (E, 4, 4, HW, HW)
    assert_close(ys, torch.stack([m(xe) for m, xe in zip(mods, xs)]), TOL, "slots")
    _check_state(ex, mods)
    # equal loads: forward_groups takes the unmasked path (no padding), same as the loop
    idx = torch.arange(6).remainder(E)[:, None]  # (6, 1), two images per expert
    w = torch.rand(6, 1, dtype=torch.float64)
    x = torch.randn(6, 4, HW, HW, dtype=torch.float64)
    y = ex.forward_sparse(x, idx, w)
    assert_close(y, _naive(mods, x, idx, w, torch.ones_like(idx, dtype=torch.bool)), TOL, "full groups")
    _check_state(ex, mods)
    ys = ex.forward_sparse(x, idx)  # no weights: (N, k, O, H', W')
    assert ys.shape == (6, 1, 4, HW, HW)
    assert ex.forward_groups(x[:0], D.sort_by_expert(idx[:0], E)).shape == (0, 4, HW, HW)


def test_to_modules_are_independent_conv_blocks():
    ex = _experts(train=False)
    mods = ex.to_modules()
    assert len(mods) == E and all(isinstance(m, ConvBlock) and not m.training for m in mods)
    assert not torch.equal(mods[0].conv1.weight, mods[1].conv1.weight)  # independent init per expert
    with torch.no_grad():
        mods[0].conv1.weight.zero_()
    assert ex.conv1.weight.abs().min() > 0  # copies
    x = torch.randn(2, 4, HW, HW, dtype=torch.float64)
    assert_close(ex.forward_dense(x)[1], mods[1](x), TOL, "eval dense")


def test_channels_last_input_and_module():
    ex = ConvBlockExperts(4, 4, E).eval()
    layer = MoE(num_experts=E, experts=ex, gate=_gate(4).float(), router="topk", k=2)
    x = torch.randn(N, 4, HW, HW)
    with torch.no_grad():
        y = layer(x)[0]
        assert_close(layer(x.contiguous(memory_format=torch.channels_last))[0], y, 1e-5, "channels_last input")
        layer.to(memory_format=torch.channels_last)  # 4-D kernels only: nothing to trip over
        assert ex.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert_close(layer(x.contiguous(memory_format=torch.channels_last))[0], y, 1e-5, "channels_last kernels")


@pytest.mark.parametrize("residual", [True, False])
def test_bf16_autocast_train_matches_the_modules(residual):
    ex = ConvBlockExperts(4, 4, E, residual=residual).train()
    mods = ex.to_modules()
    layer = MoE(num_experts=E, experts=ex, gate=_gate(4).float(), router="topk", k=2)
    x = torch.randn(N, 4, HW, HW)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
        r = aux.routing
        y_ref = _naive(mods, x, r.indices, r.weights, torch.ones_like(r.indices, dtype=torch.bool))
    # the convs run in bf16; the residual adds the float32 input, so a residual block returns float32 (as
    # the modules do); masked BN statistics are computed in float32
    assert y.dtype == y_ref.dtype == (torch.float32 if residual else torch.bfloat16)
    assert_close(y.float(), y_ref.float(), 5e-2, "bf16 grouped vs bf16 modules")
    y.float().sum().backward()
    assert torch.isfinite(ex.conv1.weight.grad).all()
    for k in ("bn1.running_mean", "bn2.running_var"):
        got = ex.get_buffer(k).unflatten(0, (E, -1))
        want = torch.stack([m.get_buffer(k) for m in mods])
        assert got.dtype == torch.float32
        assert_close(got, want, 2e-2, k)


@pytest.mark.parametrize("args,kwargs,match", [
    ((4, 4, 0), {}, "num_experts must be a positive int, got 0"),
    ((4, 4, 2), dict(stride=0), "stride must be a positive int, got 0"),
    ((4, 4, 2), dict(hidden_channels=0), "hidden_channels must be a positive int, got 0"),
    ((4, 6, 2), dict(residual=True), r"residual=True needs in_channels == out_channels and stride 1 .*4 -> 6"),
])
def test_bad_arguments_raise(args, kwargs, match):
    with pytest.raises(MoelabError, match=match):
        ConvBlockExperts(*args, **kwargs)


def test_auto_impl_is_the_loop_on_cpu_and_flop_counts_are_exact():
    from torch.utils.flop_counter import FlopCounterMode

    from moelab.cost import count_flops

    ex = ConvBlockExperts(4, 4, E)
    x = torch.randn(N, 4, HW, HW)
    assert ex.impl == "auto" and ex.resolve_impl(x) == "loop"
    one = 2 * 2 * (4 * 4 * 9 * HW * HW)  # two 3x3 convs 4 -> 4 per image
    plan = D.sort_by_expert(torch.tensor([[0], [0], [0], [0], [0], [0], [0], [0], [1], [2]]), E)
    for impl, raw in (("loop", N * one), ("grouped", E * 8 * one)):  # grouped: 3 experts padded to 8 rows
        ex.impl = impl
        counter = FlopCounterMode(display=False)
        with counter:  # what the layout computes
            ex.forward_groups(x, plan)
        assert counter.get_total_flops() == raw
        assert count_flops(ex.forward_groups, x, plan) == N * one  # moelab.cost counts the mathematics
    with pytest.raises(MoelabError, match="ConvBlockExperts: impl must be one of auto, grouped, loop, got 'fast'"):
        ConvBlockExperts(4, 4, E, impl="fast")


def test_shape_errors():
    ex = ConvBlockExperts(4, 4, E)
    with pytest.raises(MoelabError, match=r"forward_dense expected inputs of shape \(N, 4, H, W\), got \(2, 3, 6, 6\)"):
        ex.forward_dense(torch.randn(2, 3, 6, 6))
    with pytest.raises(MoelabError, match=r"forward_slots expected inputs of shape \(E, Cap, 4, H, W\), got "
                                          r"\(3, 2, 4, 6\)"):
        ex.forward_slots(torch.randn(3, 2, 4, 6))
    with pytest.raises(MoelabError, match=r"forward_slots expected 3 expert batches .* got shape \(2, 5, 4, 6, 6\)"):
        ex.forward_slots(torch.randn(2, 5, 4, 6, 6))
    plan = D.sort_by_expert(torch.zeros(4, 1, dtype=torch.long), 2)
    with pytest.raises(MoelabError, match="plan for 2 experts and 4 rows, got 3 experts and 4 rows"):
        ex.forward_groups(torch.randn(4, 4, 6, 6), plan)
    with pytest.raises(MoelabError, match=r"expert index must be an int in \[0, 3\), got 3"):
        ex.expert_state_dict(3)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("router", ["topk", "switch", "dense", "expert_choice", "hash"])
def test_empty_batch_of_images(router, impl):
    """MoE(dim=None) over ConvBlockExperts with no images: (0, O, H', W'), aux.loss 0, backward, BN untouched."""
    ex = _experts(cin=4, cout=6, stride=2, impl=impl)
    before = {k: v.clone() for k, v in ex.state_dict().items() if "running" in k}
    layer = MoE(num_experts=E, experts=ex, gate=_gate(4), router=router).double()
    x = torch.randn(0, 4, HW, HW, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, 6, HW // 2, HW // 2) and aux.loss.item() == 0.0
    (y.square().sum() + aux.loss).backward()
    assert x.grad.shape == x.shape
    for k, v in before.items():
        torch.testing.assert_close(ex.state_dict()[k], v)
