"""The fused CPU kernels (moelab.kernels) against their PyTorch twins, op by op and through the layer."""

import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.autograd import gradcheck

from moelab import kernels
from moelab.errors import MoelabError
from moelab.kernels import ops as K
from moelab.moe import dispatch as D
from moelab.moe.layer import MoE

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"fused kernels unavailable: {kernels.status()}")


def _ref_topk_softmax(logits, k, normalize):
    probs = torch.softmax(logits, -1)
    top, idx = logits.topk(k, dim=-1)
    w = torch.softmax(top, -1) if normalize else probs.gather(1, idx)
    lse = torch.logsumexp(logits, -1)
    ent = -(probs * torch.log_softmax(logits, -1)).sum(-1)
    return idx, w, lse, probs.sum(0), ent


@pytest.mark.parametrize("n,e,k", [(37, 8, 2), (5, 64, 2), (9, 6, 3), (4, 1, 1), (6, 5, 5), (300, 16, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_softmax_forward_matches_reference(n, e, k, normalize):
    logits = torch.randn(n, e) * 3
    got = K.topk_softmax(logits, k, normalize)
    want = _ref_topk_softmax(logits, k, normalize)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_topk_softmax_ties_pick_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    idx = K.topk_softmax(logits, 2, True)[0]
    assert idx.tolist() == [[1, 2], [0, 1]]


def test_topk_softmax_large_logits_stay_finite():
    logits = torch.tensor([[500.0, -500.0, 499.0], [-1e4, -1e4 + 1, -1e4 + 2]])
    idx, w, lse, psum, ent, counts, bad, balance = K.topk_softmax(logits, 2, True)
    want = _ref_topk_softmax(logits, 2, True)
    assert int(bad) == 0 and counts.tolist() == [1, 1, 2]
    for g, r in zip((w, lse, psum, ent), want[1:]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("e,k", [(6, 2), (4, 1), (5, 5)])
def test_topk_softmax_gradcheck(normalize, e, k):
    torch.manual_seed(0)
    logits = torch.randn(7, e, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: K.topk_softmax(t, k, normalize)[1:5], (logits,))


def test_topk_softmax_backward_matches_autograd_of_reference():
    logits = torch.randn(50, 12, requires_grad=True)
    ref = logits.detach().clone().requires_grad_(True)
    gs = [torch.randn(50, 2), torch.randn(50), torch.randn(12), torch.randn(50)]
    out = K.topk_softmax(logits, 2, True)[1:5]
    torch.autograd.backward(out, gs)
    want = _ref_topk_softmax(ref, 2, True)[1:]
    torch.autograd.backward(want, gs)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("a,e", [(40, 5), (1, 1), (0, 3), (1000, 64)])
def test_sort_plan_is_a_stable_counting_sort(a, e):
    flat = torch.randint(0, e + 1, (a,))  # value e = dropped sentinel
    order, counts, inverse = K.sort_plan(flat, e)
    assert torch.equal(order, torch.argsort(flat, stable=True))
    assert torch.equal(counts, torch.bincount(flat, minlength=e + 1))
    assert torch.equal(order[inverse], torch.arange(a))


def test_sort_plan_rejects_out_of_range_ids():
    with pytest.raises(RuntimeError, match=r"sort_plan: expert id 7 at position 1 is outside \[0, 4\]"):
        K.sort_plan(torch.tensor([0, 7, 1]), 4)
    with pytest.raises(RuntimeError, match="sort_plan: expert ids must be a 1-D int64"):
        K.sort_plan(torch.tensor([0.0, 1.0]), 4)


def _layouts(n, e, k, mask_p, max_b):
    idx = torch.rand(n, e).topk(k, dim=-1).indices
    mask = (torch.rand(n, k) >= mask_p) if mask_p else None
    with kernels.use(False):
        ref = D.bucket_layout(D.sort_by_expert(idx, e, mask), max_buckets=max_b)
    fused = D.bucket_layout(D.sort_by_expert(idx, e, mask), max_buckets=max_b)
    return ref, fused


@pytest.mark.parametrize("n,e,k,mask_p,max_b", [(64, 8, 2, 0.0, 3), (64, 8, 2, 0.4, 8), (1, 1, 1, 0.0, 1),
                                               (33, 5, 5, 0.2, 2)])
def test_fused_plan_and_layout_equal_pytorch(n, e, k, mask_p, max_b):
    ref, fused = _layouts(n, e, k, mask_p, max_b)
    for name in ("row_token", "row_assign", "assign_row"):
        assert torch.equal(getattr(ref, name), getattr(fused, name)), name
    assert [(g.tolist(), c) for g, c in ref.groups] == [(g.tolist(), c) for g, c in fused.groups]


@pytest.mark.parametrize("mask_p", [0.0, 0.4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_and_combine_equal_pytorch(mask_p, dtype):
    torch.manual_seed(1)
    n, e, k, f = 40, 6, 2, 24
    _, lay = _layouts(n, e, k, mask_p, 3)
    x = torch.randn(n, f, requires_grad=True)
    w = torch.rand(n, k, requires_grad=True)
    gy = torch.randn(n, f)
    results = []
    for on in (True, False):
        xx, ww = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        with kernels.use(on):
            xe = D.gather_rows(xx, lay, dtype)
            assert xe.dtype == dtype and xe.shape == (lay.num_rows, f)
            ye = torch.tanh(xe.float()).to(dtype) * 2
            y = D.combine_rows(ye, lay, ww)
        y.float().backward(gy)
        results.append((xe.float(), y.float(), xx.grad, ww.grad))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def test_gather_and_combine_gradcheck():
    torch.manual_seed(2)
    n, e, k, f = 9, 4, 2, 3
    _, lay = _layouts(n, e, k, 0.3, 2)
    x = torch.randn(n, f, dtype=torch.float64, requires_grad=True)
    ye = torch.randn(lay.num_rows, f, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: K.gather_rows(t, lay.row_token, lay.assign_row, k, torch.float64), (x,))
    assert gradcheck(lambda a, b: K.combine_rows(a, lay.assign_row, lay.row_assign, b), (ye, w))


def test_permute_cast_forward_and_backward():
    w = torch.randn(5, 3, 4, requires_grad=True)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = D.permute_experts(w, perm, torch.bfloat16)  # the fused kernel both ways
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, w.detach()[perm].to(torch.bfloat16))
    g = torch.randn(5, 3, 4, dtype=torch.bfloat16)
    out.backward(g)
    want = torch.empty(5, 3, 4)
    want[perm] = g.float()
    assert torch.equal(w.grad, want)
    with pytest.raises(RuntimeError, match=r"permute_cast: perm\[1\] = 9 out of range \[0, 5\)"):
        torch.ops.moelab.permute_cast(w.detach(), torch.tensor([0, 9, 1, 2, 3]), torch.float32)


# (bf16 logits tie often; torch.topk's order among ties is unspecified, so k=3 runs in fp32 only)
@pytest.mark.parametrize("router,k,cf,amp", [(r, k, cf, amp) for r, k, cf in [("topk", 2, None), ("topk", 2, 0.75),
                                                                            ("switch", None, 1.0)]
                                              for amp in (False, True)] + [("topk", 3, None, False)])
def test_layer_with_kernels_equals_pytorch_path(router, k, cf, amp):
    torch.manual_seed(3)
    m = MoE(dim=16, num_experts=6, hidden_dim=32, router=router, k=k,
            router_options=None if cf is None else {"capacity_factor": cf},
            aux_loss_weights={"balance": 0.1, "z": 0.01, "importance": 0.1, "entropy": 0.05})
    x = torch.randn(70, 16)
    g = torch.randn(70, 16)
    res = []
    for on in (True, False):
        mm, xx = copy.deepcopy(m), x.clone().requires_grad_(True)
        with kernels.use(on), torch.autocast("cpu", torch.bfloat16, enabled=amp):
            y, aux = mm(xx)
        ((y.float() * g).sum() + aux.loss).backward()
        res.append((y.float(), aux, xx.grad, [p.grad for p in mm.parameters()]))
    (y1, a1, gx1, gp1), (y2, a2, gx2, gp2) = res
    assert torch.equal(a1.indices, a2.indices) and torch.equal(a1.expert_counts, a2.expert_counts)
    assert int(a1.dropped) == int(a2.dropped)
    for name in a2.losses:
        torch.testing.assert_close(a1.losses[name], a2.losses[name], rtol=1e-5, atol=1e-6)
    tol = dict(rtol=3e-2, atol=3e-2) if amp else dict(rtol=1e-4, atol=1e-5)
    for p, q in zip([y1, gx1, *gp1], [y2, gx2, *gp2]):
        torch.testing.assert_close(p / q.abs().max(), q / q.abs().max(), **tol)


def test_use_false_switches_the_kernels_off():
    x = torch.zeros(2)
    assert kernels.enabled(x)
    with kernels.use(False):
        assert not kernels.enabled(x)
    assert kernels.enabled(x)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_build_failure_falls_back_or_raises(tmp_path):
    code = ("import warnings, torch; from moelab import kernels; warnings.simplefilter('always');"
            "print('ENABLED', kernels.enabled(torch.zeros(1))); print(kernels.status())")
    env = dict(MOELAB_CACHE_DIR=str(tmp_path), CXX="/bin/false")
    res = _python(code, MOELAB_KERNELS="auto", **env)
    assert res.returncode == 0, res.stderr
    assert "ENABLED False" in res.stdout and "PyTorch fallback" in res.stdout
    assert "fused CPU kernels unavailable, using the PyTorch path" in res.stderr
    res = _python(code, MOELAB_KERNELS="on", **env)
    assert res.returncode != 0
    assert "MOELAB_KERNELS=on but the fused CPU kernels are unavailable" in res.stderr
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left behind


def test_kernels_env_value_checked(monkeypatch):
    monkeypatch.setenv("MOELAB_KERNELS", "fast")
    with pytest.raises(MoelabError, match="MOELAB_KERNELS must be one of auto, on, off, got 'fast'"):
        kernels.load()
    monkeypatch.setenv("MOELAB_KERNELS", "off")
    assert not kernels.load()



def test_ops_accept_empty_inputs():
    """A rank or a batch with no tokens: every op returns empty results (no reshape ambiguity)."""
    x = torch.randn(0, 5, 3, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.long)
    out = K.gather_rows(x, idx, idx, 2, torch.bfloat16)
    assert out.shape == (0, 5, 3) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.shape == x.shape
    y = K.combine_rows(torch.randn(0, 4, requires_grad=True), idx, idx, torch.rand(0, 2, requires_grad=True))
    assert y.shape == (0, 4)
    indices, w, lse, psum, ent, counts, bad, balance = K.topk_softmax(torch.randn(0, 6), 2, True)
    assert indices.shape == (0, 2) and torch.equal(psum, torch.zeros(6)) and counts.tolist() == [0] * 6
    assert int(bad) == 0
    order, counts, inverse = K.sort_plan(idx, 3)
    assert order.numel() == 0 and counts.tolist() == [0, 0, 0, 0]


def test_the_kernel_cache_key_covers_the_torch_install_the_flags_and_the_source(monkeypatch, tmp_path):
    """Two checkouts or venvs sharing ~/.cache/moelab/kernels must not rebuild each other's library: the key
    changes with the torch installation, the build flags and the source, and is stable otherwise."""
    import moelab.kernels as K

    key = K._key("c++")
    assert key == K._key("c++")
    monkeypatch.setattr(K, "CFLAGS", [*K.CFLAGS, "-DMOELAB_OTHER"])
    assert K._key("c++") != key
    monkeypatch.undo()
    other_torch = tmp_path / "venv" / "torch"
    other_torch.mkdir(parents=True)
    monkeypatch.setattr(K.torch, "__file__", str(other_torch / "__init__.py"))
    assert K._key("c++") != key
    monkeypatch.undo()
    source = tmp_path / "moe_cpu.cpp"
    source.write_bytes(K._SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(K, "_SOURCE", source)
    assert K._key("c++") != key


ACTS = ["gelu", "relu", "silu", "tanh", "sigmoid", "identity"]


#: the grouped MLP kernel's GEMMs: its own small-GEMM kernel, the BLAS torch links, ATen's addmm (a torch build
#: without an exported BLAS)
GEMMS = ["small", "blas", "aten"]


@contextlib.contextmanager
def gemm_backend(name):
    blas = K.use_blas(name != "aten")
    limit = K.small_gemm_limit(1 << 40 if name == "small" else 0)
    try:
        yield
    finally:
        K.use_blas(blas)
        K.small_gemm_limit(limit)


def _sparse_case(dtype, act="gelu", bias=True, mask_p=0.0, n=29, e=5, k=2, seed=0, dims=(6, 10, 4)):
    """dims (in, hidden, out): the default's widths are narrower than one SIMD vector; (24, 45, 16) takes every
    tile of the small-GEMM kernel (two-vector and one-vector column panels, single columns, 1..6 rows)."""
    from moelab.moe import MLPExperts

    torch.manual_seed(seed)
    ex = MLPExperts(e, *dims, activation=act, bias=bias, sparse_impl="bucketed").to(dtype)
    x = torch.randn(n, dims[0], dtype=dtype, requires_grad=True)
    idx = torch.rand(n, e).topk(k, dim=-1).indices
    idx[: n // 3] = torch.arange(k)  # uneven loads; expert e-1 may get none
    w = torch.rand(n, k, dtype=dtype, requires_grad=True)
    mask = (torch.rand(n, k) >= mask_p) if mask_p else None
    plan = D.sort_by_expert(idx, e, mask)
    lay = D.flat_layout(plan)
    maps = (lay.row_token, lay.assign_row, lay.row_assign, plan.offsets)
    return ex, x, w, idx, mask, maps


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype,bias,mask_p,dims", [(torch.float32, True, 0.0, (6, 10, 4)),
                                                    (torch.float64, False, 0.0, (6, 10, 4)),
                                                    (torch.float32, True, 0.4, (24, 45, 16)),
                                                    (torch.float64, True, 0.0, (24, 45, 16))])
def test_sparse_mlp_equals_the_module_experts(gemm, act, dtype, bias, mask_p, dims):
    """The fused op (its own small GEMMs, the BLAS's, or ATen's on a build without them) against one nn.Linear
    stack per expert: outputs and every gradient, with dropped assignments and an expert without rows."""
    from tests.moe.test_experts import _oracle_param_grads

    ex, x, w, idx, mask, maps = _sparse_case(dtype, act, bias, mask_p, dims=dims)
    ref = ex.to_module_experts().to(dtype)
    with gemm_backend(gemm):
        y = K.sparse_mlp(x, w, ex.w1, ex.b1, ex.w2, ex.b2, *maps, K.act_code(ex.activation))
        g = torch.randn_like(y)
        y.backward(g)
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y_ref = ref.forward_sparse(xr, idx, wr, mask)
    y_ref.backward(g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(w.grad, wr.grad, **tol)
    for name, gref in _oracle_param_grads(ex, ref).items():
        torch.testing.assert_close(getattr(ex, name).grad, gref, **tol)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("act,bias,dims", [("gelu", True, (6, 10, 4)), ("silu", False, (6, 10, 4)),
                                           ("tanh", True, (5, 9, 8))])
def test_sparse_mlp_gradcheck(gemm, act, bias, dims):
    ex, x, w, idx, mask, maps = _sparse_case(torch.float64, act, bias, mask_p=0.3, n=9, e=4, dims=dims)
    params = (x, w, ex.w1, ex.b1, ex.w2, ex.b2) if bias else (x, w, ex.w1, ex.w2)

    def f(*p):
        x_, w_, w1, *rest = p
        b1, w2, b2 = rest if bias else (None, rest[0], None)
        return K.sparse_mlp(x_, w_, w1, b1, w2, b2, *maps, K.act_code(ex.activation))

    with gemm_backend(gemm):
        assert gradcheck(f, params)


def test_sparse_mlp_runs_without_autograd_and_refuses_bad_inputs():
    ex, x, w, idx, mask, (rt, ar, ra, off) = _sparse_case(torch.float32)
    args = (ex.w1, ex.b1, ex.w2, ex.b2, rt, ar, ra)
    with torch.no_grad():
        y = K.sparse_mlp(x, w, *args, off, 1)
    assert not y.requires_grad and y.shape == (x.shape[0], 4)
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing end rows"):
        K.sparse_mlp(x, w, *args, off.flip(0), 1)
    with pytest.raises(RuntimeError, match="the last offset .* must be the row count"):
        K.sparse_mlp(x, w, *args, off - 1, 1)
    with pytest.raises(RuntimeError, match="weights and rows must share a dtype"):
        K.sparse_mlp(x.double(), w.double(), *args, off, 1)
    with pytest.raises(RuntimeError, match="unknown activation code 9"):
        K.sparse_mlp(x, w, *args, off, 9)


def test_the_fused_path_is_what_auto_runs_in_fp32_and_not_under_bf16_autocast():
    from moelab.moe import MLPExperts

    ex = MLPExperts(4, 8, 16)
    x, idx, w = torch.randn(10, 8), torch.randint(0, 4, (10, 2)), torch.rand(10, 2)
    assert ex._fused_ok(x, w, torch.float32)
    assert not ex._fused_ok(x, w, torch.bfloat16)  # autocast to bf16: the bucketed / grouped paths
    assert not MLPExperts(4, 8, 16, activation="softmax")._fused_ok(x, w, torch.float32)
    assert not MLPExperts(4, 8, None, 4)._fused_ok(x, w, torch.float32)  # linear experts
    with kernels.use(False):
        assert not ex._fused_ok(x, w, torch.float32)
    y = ex.forward_sparse(x, idx, w)
    with kernels.use(False):
        torch.testing.assert_close(y, ex.forward_sparse(x, idx, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_softmax_counts_the_loads_and_the_non_finite_logits(dtype):
    logits = torch.randn(50, 7, dtype=dtype)
    out = K.topk_softmax(logits, 3, True)
    assert torch.equal(out[5], torch.bincount(out[0].reshape(-1), minlength=7)) and int(out[6]) == 0
    logits[3, 1], logits[9, 0], logits[9, 6] = float("nan"), float("inf"), -float("inf")
    assert int(K.topk_softmax(logits, 3, True)[6]) == 3


def test_a_router_on_the_kernels_refuses_non_finite_logits_by_name():
    from moelab.moe.routers import make_router

    r = make_router("topk", 8, 4, k=2)
    x = torch.randn(5, 8)
    x[2, 3] = float("nan")
    with pytest.raises(MoelabError, match=r"router 'topk' produced 4 non-finite logits"):
        r(x)


@pytest.mark.parametrize("n,e,k,mask_p", [(31, 5, 2, 0.0), (31, 5, 2, 0.4), (8, 3, 3, 0.0), (0, 4, 2, 0.0),
                                          (6, 4, 1, 1.0)])
def test_expert_rows_equal_the_sorted_plan_and_its_flat_layout(n, e, k, mask_p):
    idx = torch.rand(n, e).topk(k, dim=-1).indices
    mask = (torch.rand(n, k) >= mask_p) if mask_p else None
    plan = D.sort_by_expert(idx, e, mask)
    lay = D.flat_layout(plan)
    flat = idx.reshape(-1) if mask is None else torch.where(mask.reshape(-1), idx.reshape(-1), e)
    row_token, row_assign, assign_row, offsets = K.expert_rows(flat, k, e)
    assert torch.equal(row_token, lay.row_token) and torch.equal(row_assign, lay.row_assign)
    assert torch.equal(assign_row, lay.assign_row) and torch.equal(offsets, plan.offsets.long())
    with pytest.raises(RuntimeError, match="expert_rows: expert id 9 at position 0 is outside"):
        K.expert_rows(torch.tensor([9, 0]), 2, e)


def test_topk_softmax_gives_k_distinct_experts_with_minus_infinite_logits():
    """The kernel's slots fill with the first k experts whatever their logits, so a row with fewer than k finite
    logits (possible with the finite check off) still routes to k distinct, valid experts."""
    inf = float("inf")
    logits = torch.tensor([[-inf, 1.0, -inf, -inf], [-inf, -inf, -inf, -inf], [0.5, -inf, 2.0, -inf]])
    idx = K.topk_softmax(logits, 2, True)[0]
    assert idx.tolist() == [[1, 0], [0, 1], [2, 0]]
    rows = torch.randn(300, 12)
    for k in (1, 3, 12):  # against torch.topk across many rows (lanes and a partial last block)
        assert torch.equal(K.topk_softmax(rows, k, False)[0], rows.topk(k, dim=-1).indices)


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_softmax_balance_is_the_switch_loss_with_its_gradient(normalize):
    """The kernel's balance output equals L.switch_balance_loss(psum / N, counts), value and gradient (float64)."""
    from moelab.moe import losses as L

    torch.manual_seed(1)
    logits = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    idx, w, lse, psum, ent, counts, bad, balance = K.topk_softmax(logits, 2, normalize)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = L.switch_balance_loss(torch.softmax(ref_logits, -1), torch.bincount(idx.reshape(-1), minlength=6))
    torch.testing.assert_close(balance, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(balance + w.sum() * 0.3, logits)
    (g_ref,) = torch.autograd.grad(ref + _ref_topk_softmax(ref_logits, 2, normalize)[1].sum() * 0.3, ref_logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert gradcheck(lambda t: K.topk_softmax(t, 2, normalize)[7], (logits,))
