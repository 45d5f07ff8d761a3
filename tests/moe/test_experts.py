import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.moe import MLPExperts, ModuleExperts
from moelab.moe.experts import CallableExperts
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401


def _oracle_param_grads(ex, ref):
    """Stack the oracle's nn.Linear grads into MLPExperts' (E, in, out) layout."""
    lins = [[m for m in seq if isinstance(m, nn.Linear)] for seq in ref.experts]
    out = {"w1": torch.stack([ls[0].weight.grad.t() for ls in lins])}
    if ex.b1 is not None:
        out["b1"] = torch.stack([ls[0].bias.grad for ls in lins])
    if ex.w2 is not None:
        out["w2"] = torch.stack([ls[1].weight.grad.t() for ls in lins])
        if ex.b2 is not None:
            out["b2"] = torch.stack([ls[1].bias.grad for ls in lins])
    return out


def _check_sparse(ex, n, k, mask_p=0.0, indices=None, tol=1e-5):
    ref = ex.to_module_experts()
    e = ex.num_experts
    x = torch.randn(n, ex.in_dim, requires_grad=True)
    idx = torch.rand(n, e).topk(k, dim=-1).indices if indices is None else indices
    w = torch.rand(n, k, requires_grad=True)
    mask = (torch.rand(n, k) >= mask_p) if mask_p else None
    y = ex.forward_sparse(x, idx, w, mask)
    y_ref = ref.forward_sparse(x, idx, w, mask)
    assert_close(y, y_ref, tol, "output")
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g, retain_graph=True)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), g, retain_graph=True)
    assert_close(gx, gx_ref, tol, "grad x")
    assert_close(gw, gw_ref, tol, "grad weights")
    y.backward(g)
    y_ref.backward(g)
    for name, gref in _oracle_param_grads(ex, ref).items():
        assert_close(getattr(ex, name).grad, gref, tol, f"grad {name}")


@pytest.mark.parametrize("impl", ["fused", "grouped", "bucketed", "padded", "static"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k,mask_p", [(1, 0.0), (2, 0.0), (2, 0.4)])
def test_sparse_matches_naive(impl, bias, k, mask_p):
    ex = MLPExperts(4, 8, 16, 12, bias=bias, sparse_impl=impl)
    _check_sparse(ex, 23, k, mask_p)


@pytest.mark.parametrize("impl", ["fused", "grouped", "bucketed", "padded", "static"])
@pytest.mark.parametrize("e,k,n", [(1, 1, 5), (4, 4, 6), (3, 2, 1)])
def test_sparse_edge_shapes(impl, e, k, n):
    _check_sparse(MLPExperts(e, 8, 16, sparse_impl=impl), n, k)


@pytest.mark.parametrize("impl", ["fused", "grouped", "bucketed", "padded", "static"])
def test_sparse_experts_without_tokens(impl):
    ex = MLPExperts(5, 8, 16, sparse_impl=impl)
    idx = torch.tensor([[0, 3]] * 7)  # experts 1, 2, 4 receive nothing
    _check_sparse(ex, 7, 2, indices=idx)
    x = torch.randn(7, 8)
    ex.forward_sparse(x, idx, torch.rand(7, 2)).sum().backward()
    assert (ex.w1.grad[[1, 2, 4]] == 0).all() and (ex.w1.grad[[0, 3]] != 0).any()


def test_sparse_output_activation_and_linear_experts():
    _check_sparse(MLPExperts(3, 8, 16, 8, activation="sigmoid", output_activation="sigmoid"), 10, 2, 0.3)
    _check_sparse(MLPExperts(3, 8, None, 4, output_activation="tanh"), 10, 2, 0.3)


def test_jacobs_1991_shapes_sigmoid_sigmoid():
    ex = MLPExperts(4, 196, 25, 10, activation="sigmoid", output_activation="sigmoid")
    x = torch.randn(6, 196)
    out = ex.forward_dense(x)
    assert out.shape == (4, 6, 10)
    assert ((out > 0) & (out < 1)).all()
    _check_sparse(ex, 6, 2)  # unaligned widths run the padded path


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hidden", [16, None])
def test_dense_and_slots_match_modules(bias, hidden):
    ex = MLPExperts(3, 8, hidden, 5, bias=bias, activation="relu")
    ref = ex.to_module_experts()
    x = torch.randn(7, 8, requires_grad=True)
    y, y_ref = ex.forward_dense(x), ref.forward_dense(x)
    assert y.shape == (3, 7, 5)
    assert_close(y, y_ref, 1e-5, "dense")
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], 1e-5, "dense grad x")
    xs = torch.randn(3, 4, 8)
    assert_close(ex.forward_slots(xs), ref.forward_slots(xs), 1e-5, "slots")
    assert_close(ex(x), y, 0, "forward() without indices is dense")


def test_module_experts_base_paths_with_non_mlp_experts():
    mods = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 6))]
    ex = ModuleExperts(mods)
    x = torch.randn(5, 6)
    dense = ex.forward_dense(x)
    assert_close(dense[2], mods[2](x), 1e-6, "module expert 2")
    idx = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    w = torch.rand(5, 2)
    want = torch.stack([w[n, 0] * dense[idx[n, 0], n] + w[n, 1] * dense[idx[n, 1], n] for n in range(5)])
    assert_close(ex.forward_sparse(x, idx, w), want, 1e-6, "naive sparse")
    # per-assignment outputs (weights=None) from the generic base path
    per = ex.forward_sparse(x, idx)
    assert_close(per[:, 1], dense[idx[:, 1], torch.arange(5)], 1e-6, "per-assignment")


@pytest.mark.parametrize("masked", [False, True])
def test_mlp_experts_per_assignment_outputs_without_weights(masked):
    """MLPExperts.forward_sparse(weights=None) runs the base path (sort, gather, forward_groups):
    (N, k, out) per-assignment outputs equal to the naive loop, zeros for dropped assignments, grads too."""
    torch.manual_seed(0)
    ex = MLPExperts(4, 6, 8, 5)
    ref = ex.to_module_experts()
    x = torch.randn(7, 6, requires_grad=True)
    idx = torch.rand(7, 4).topk(2, dim=-1).indices
    mask = torch.rand(7, 2) > 0.3 if masked else None
    per = ex.forward_sparse(x, idx, None, mask)
    want = ref.forward_sparse(x, idx, None, mask)
    assert per.shape == (7, 2, 5)
    assert_close(per, want, 1e-5, "per-assignment outputs")
    if masked:
        assert per[~mask].abs().max() == 0
    g = torch.randn_like(per)
    (gx,) = torch.autograd.grad((per * g).sum(), x)
    (gx_ref,) = torch.autograd.grad((want * g).sum(), x)
    assert_close(gx, gx_ref, 1e-5, "input gradient")


def test_callable_experts_adapter():
    class Stack(nn.Module):  # (N, d) -> (E, N, d) like ConvExperts
        num_experts = 3

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, 4))

        def forward(self, x):
            return torch.einsum("nd,edo->eno", x, self.w)

    st = Stack()
    ex = CallableExperts(st)
    x = torch.randn(6, 4)
    idx = torch.randint(0, 3, (6, 2))
    w = torch.rand(6, 2)
    dense = st(x)
    want = (w.unsqueeze(-1) * dense[idx, torch.arange(6)[:, None]]).sum(1)
    assert_close(ex.forward_sparse(x, idx, w), want, 1e-5, "adapter")
    calls = []
    st.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    mask = torch.rand(6, 2) > 0.3
    per = ex.forward_sparse(x, idx, None, mask)  # (N, k, out): each row's chosen experts, dropped ones zero
    assert calls == [6]  # the stack ran once on the N rows, not on N * k routed copies
    assert_close(per, dense[idx, torch.arange(6)[:, None]] * mask.unsqueeze(-1), 1e-5, "per-assignment")
    assert_close(ex.forward_sparse(x, idx, w, mask), (per * w.unsqueeze(-1)).sum(1), 1e-5, "masked")


def test_autocast_bf16_sparse_close_to_fp32():
    ex = MLPExperts(4, 32, 64)
    x = torch.randn(40, 32)
    idx = torch.rand(40, 4).topk(2).indices
    w = torch.rand(40, 2)
    y32 = ex.forward_sparse(x, idx, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = ex.forward_sparse(x, idx, w)
        yd = ex.forward_dense(x)
    assert y16.dtype == torch.bfloat16 and yd.dtype == torch.bfloat16
    assert_close(y16.float(), y32, 3e-2, "bf16 sparse")
    y16.float().sum().backward()
    assert ex.w1.grad.dtype == torch.float32 and torch.isfinite(ex.w1.grad).all()


def test_bad_inputs():
    ex = MLPExperts(2, 8, 16)
    with pytest.raises(MoelabError, match="in_dim=8"):
        ex.forward_dense(torch.randn(3, 7))
    with pytest.raises(MoelabError, match="in_dim=8"):
        ex.forward_sparse(torch.randn(3, 9), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(MoelabError, match="unknown activation 'swishy'"):
        MLPExperts(2, 8, 16, activation="swishy")
    with pytest.raises(MoelabError, match="sparse_impl"):
        MLPExperts(2, 8, 16, sparse_impl="fast")
    with pytest.raises(MoelabError, match="num_experts"):
        MLPExperts(0, 8, 16)
    with pytest.raises(MoelabError, match="at least one expert"):
        ModuleExperts([])


@pytest.mark.parametrize("act", ["gelu", "relu", "sigmoid", "tanh", "silu", "identity", "softmax", lambda t: t * t])
@pytest.mark.parametrize("impl", ["bucketed", "grouped", "static"])
def test_activation_backward_in_batched_paths(act, impl):
    """Every activation (named or a callable) through both batched sparse paths matches the oracle."""
    ex = MLPExperts(3, 8, 16, 8, activation=act, output_activation="tanh", sparse_impl=impl)
    _check_sparse(ex, 12, 2, 0.2)


def test_bucketed_matches_grouped_and_padded_exactly_in_routing():
    ex = MLPExperts(6, 16, 32, sparse_impl="bucketed")
    x = torch.randn(50, 16)
    idx = torch.cat([torch.zeros(50, 1, dtype=torch.long), torch.randint(1, 6, (50, 1))], 1)  # expert 0 is hot
    w = torch.rand(50, 2)
    outs = {}
    for impl in ["bucketed", "padded", "grouped"]:
        ex.sparse_impl = impl
        outs[impl] = ex.forward_sparse(x, idx, w)
    assert_close(outs["bucketed"], outs["grouped"], 1e-5, "bucketed vs grouped")
    assert_close(outs["padded"], outs["grouped"], 1e-5, "padded vs grouped")


@pytest.mark.parametrize("impl", ["grouped", "bucketed"])
def test_forward_groups_backward_with_a_broadcast_gradient(impl):
    """out.sum() sends a stride-0 gradient; torch._grouped_mm's backward refused it ("Invalid strides/sizes")."""
    from moelab.moe import dispatch as D

    ex = MLPExperts(4, 16, 32, sparse_impl=impl)
    ref = ex.to_module_experts()
    x = torch.randn(20, 16, requires_grad=True)
    idx = torch.rand(20, 4).topk(2).indices
    plan = D.sort_by_expert(idx, 4)
    ex.forward_groups(D.gather_sorted(x, plan), plan).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref.forward_groups(D.gather_sorted(x_ref, plan), plan).sum().backward()
    assert_close(x.grad, x_ref.grad, 1e-5, "grad x")
    assert_close(ex.w1.grad, torch.stack([m[0].weight.grad.t() for m in ref.experts]), 1e-5, "grad w1")
    ex.zero_grad()
    ex.forward_sparse(x, idx, torch.rand(20, 2)).sum().backward()  # the fused sparse path too
    assert torch.isfinite(ex.w1.grad).all()


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask_p", [0.0, 0.4])
def test_static_path_matches_naive(kernels_on, bias, mask_p):
    """"static" without a capacity: every expert on every token, mixed by the sparse gates (exact also for a
    token choosing one expert twice); with the router's capacity: one (E, C) batch."""
    from moelab import kernels
    from moelab.moe.routers.base import capacity_mask

    with kernels.use(kernels_on):
        ex = MLPExperts(4, 8, 16, 12, bias=bias, sparse_impl="static")
        _check_sparse(ex, 23, 2, mask_p)
        ex.zero_grad()
        _check_sparse(ex, 9, 2, indices=torch.tensor([[1, 1], [0, 2], [3, 3]] * 3))  # repeated experts
        idx = torch.rand(23, 4).topk(2, dim=-1).indices
        for cap in (3, 6, 23):  # drops, a few, none
            ref = ex.to_module_experts()
            mask = capacity_mask(idx, 4, cap)
            x, w = torch.randn(23, 8), torch.rand(23, 2)
            assert_close(ex.forward_sparse(x, idx, w, mask, capacity=cap), ref.forward_sparse(x, idx, w, mask),
                         1e-5, f"capacity {cap}")


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("impl", ["grouped", "static"])
def test_sync_free_paths_with_dropped_assignments_match_naive(kernels_on, impl):
    """The grouped path keeps dropped assignments as dead rows (zero inputs, never read, no gradient)."""
    from moelab import kernels

    with kernels.use(kernels_on):
        for bias, out_act in ((True, None), (True, "tanh"), (False, None)):
            _check_sparse(MLPExperts(4, 8, 16, 8, bias=bias, output_activation=out_act, sparse_impl=impl), 31, 2,
                          0.5)
        _check_sparse(MLPExperts(3, 8, None, 8, sparse_impl=impl), 11, 1, 0.6)  # linear experts


@pytest.mark.parametrize("impl", ["fused", "grouped", "bucketed", "padded", "static"])
@pytest.mark.parametrize("bias", [True, False])
def test_exact_compute_counts_the_routed_rows_on_every_path(impl, bias):
    """Inside exact_compute a FLOP counter sees k experts per token (no padding, no bias columns), in fp32 and
    under bf16 autocast."""
    from torch.utils.flop_counter import FlopCounterMode

    from moelab.moe.experts import exact_compute

    ex = MLPExperts(8, 16, 32, bias=bias, sparse_impl=impl)
    x = torch.randn(50, 16)
    idx = torch.cat([torch.zeros(50, 1, dtype=torch.long), torch.randint(1, 8, (50, 1))], 1)  # expert 0 is hot
    mask = torch.rand(50, 2) > 0.2
    want = 2 * int(mask.sum()) * (16 * 32 + 32 * 16)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), exact_compute(), counter:
                y = ex.forward_sparse(x, idx, torch.rand(50, 2), mask)
        assert counter.get_total_flops() == want, (impl, autocast)
        assert y.shape == (50, 16)
