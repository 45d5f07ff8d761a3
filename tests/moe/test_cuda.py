"""The MoE core on a CUDA device, against the same modules on the CPU.

Skipped (with the reason shown by ``-ra``) where torch sees no CUDA device; run on a GPU machine with
``pytest tests/moe/test_cuda.py`` (``scripts/gpu-check`` does). On CUDA the sparse path takes
``torch._grouped_mm`` in bf16 and the "static" layout otherwise (the CPU takes the bucketed ``baddbmm``
path), so these tests compare the implementations as well as the devices.

bf16 runs are compared with the CPU in fp32. So that bf16 rounding cannot flip a routing decision (a near
tie between two experts' logits), the routed layers get *exact* gates: the router's projection picks
the first few input features, and those features hold distinct multiples of 1/32, which bf16 represents
exactly; every other feature (what the experts compute on) is random. The routing is then the same on
both devices, and the outputs and gradients differ by bf16 rounding only.
"""

import copy

import pytest
import torch
from torch import nn

from moelab import MoE
from moelab.moe import CondConv2d, ConvBlockExperts, MLPExperts, TokenMoE2d
from moelab.moe.routers.hash import HashRouter
from moelab.reproductions.conv_experts import ConvExperts
from moelab.reproductions.routers import RawTopKRouter
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")

# noisy_topk is left out here: its noise comes from each device's own generator, so the routing differs by
# design (it is compared in eval mode below, where it routes on the clean logits).
ROUTERS = ["dense", "topk", "switch", "expert_choice", "soft", "two-gates", "two-gates-max"]

# every router of moelab.MoE (and the CIFAR seed's raw-gate top-k, a Router subclass given as the router), for
# the bf16 comparison: router -> MoE options
BF16_ROUTERS = {
    "dense": {}, "topk": {"k": 2}, "noisy_topk": {"k": 2}, "switch": {"router_options": {"capacity_factor": 1.25}},
    "expert_choice": {}, "soft": {}, "two_gates": {}, "two_gates_max": {}, "uniform": {}, "hash": {},
    "seed_sparse": {"k": 2},
}
ROUTER_CLASSES = {"seed_sparse": RawTopKRouter}
BF16_OUT, BF16_GRAD = 3e-2, 6e-2  # relative to the largest value compared (bf16 keeps 8 significant bits)


@pytest.fixture(autouse=True)
def full_fp32():
    """The GPU's fp32 in full fp32 (no TF32) for the comparisons with the CPU: a run earlier in this process
    may have turned TF32 on (``moelab.device.configure``), and TF32's ~1e-3 error is above the fp32 tolerances."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _forward_backward(layer, x, seed=0):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y, aux = layer(x)
    (y.float().square().mean() + aux.loss).backward()
    return y.detach().float().cpu(), x.grad.float().cpu()


@pytest.mark.parametrize("router", ROUTERS)
def test_layer_on_cuda_matches_cpu(router):
    cpu = MoE(dim=32, num_experts=8, hidden_dim=64, router=router)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 16, 32)
    y_cpu, gx_cpu = _forward_backward(cpu, x)
    y_gpu, gx_gpu = _forward_backward(gpu, x.cuda())
    assert_close(y_gpu, y_cpu, 1e-4, f"{router} output")
    assert_close(gx_gpu, gx_cpu, 1e-4, f"{router} input gradient")
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p_cpu.grad is not None:
            assert_close(p_gpu.grad.cpu(), p_cpu.grad, 1e-4, f"{router} grad {name}")


def test_grouped_mm_path_under_bf16_autocast():
    ex = MLPExperts(8, 64, 128, 64)
    gpu = copy.deepcopy(ex).cuda()
    x = torch.randn(256, 64)
    idx = torch.rand(256, 8).topk(2, dim=-1).indices
    w = torch.rand(256, 2)
    want = ex.forward_sparse(x, idx, w)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu.forward_sparse(x.cuda(), idx.cuda(), w.cuda())
    assert got.dtype == torch.bfloat16
    assert_close(got.float().cpu(), want, 3e-2, "bf16 grouped_mm vs fp32 CPU")


def test_conv_experts_on_cuda_match_cpu():
    cpu = ConvExperts(3, num_classes=10).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 3, 32, 32)
    assert_close(gpu(x.cuda()).cpu(), cpu(x), 1e-3, "ConvExperts logits")


# ----------------------------------------------------------------------------- bf16 against the CPU in fp32


def _rel_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, outliers: float = 0.0) -> None:
    """|got - want| <= rtol * max |want| (+ a floor for all-zero tensors) everywhere, or, with ``outliers``, on
    all but that fraction of the elements, those within 5x the bound."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.numel():
        return
    err, bound = (got - want).abs(), rtol * want.abs().max().item() + 1e-6
    if outliers:
        frac = (err > bound).double().mean().item()
        assert frac <= outliers and err.max().item() <= 5 * bound, \
            f"{what}: {100 * frac:.2f}% of the elements off by more than {bound:.3e} (max {err.max().item():.3e})"
        return
    assert err.max().item() <= bound, f"{what}: max abs err {err.max().item():.3e} > {bound:.3e} ({rtol:.0e} x max)"


def _direction_close(got: torch.Tensor, want: torch.Tensor, what: str, min_cos: float = 0.99,
                     norm_tol: float = 0.1) -> None:
    """Same direction (cosine >= min_cos) and length (within norm_tol) as vectors: for gradients that are small
    differences of large terms (a convolution's weights before BatchNorm), where bf16 cancels element by element."""
    got, want = got.detach().double().cpu().flatten(), want.detach().double().cpu().flatten()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.any():
        assert not got.any(), f"{what}: nonzero where the CPU has zeros"
        return
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    ratio = (got.norm() / want.norm()).item()
    assert cos >= min_cos and abs(ratio - 1) <= norm_tol, f"{what}: cosine {cos:.4f}, norm ratio {ratio:.3f}"


def _exact_values(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """(rows, cols) distinct multiples of 1/32 below 8 (at most 256 values): exact in bf16, no two alike."""
    assert rows * cols <= 256
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(seed))[: rows * cols]
    return (perm.float() / 32).view(rows, cols)


def _pick_first(linear: nn.Linear) -> None:
    """A linear gate (L, d) that returns the first L input features (exact in any precision)."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:, : linear.weight.shape[0]].copy_(torch.eye(linear.weight.shape[0]))
        if linear.bias is not None:
            linear.bias.zero_()


def _exact_router(router: nn.Module) -> int:
    """Make ``router``'s gate exact (:func:`_pick_first`); returns how many leading features it reads (0: none)."""
    if isinstance(getattr(router, "gate", None), nn.Linear):
        _pick_first(router.gate)
        return router.gate.weight.shape[0]
    if isinstance(router, HashRouter) and getattr(router, "projection", None) is not None:
        with torch.no_grad():
            e = router.projection.shape[1]
            router.projection.zero_()
            router.projection[:e].copy_(torch.eye(e))
        return e
    return 0  # soft (continuous routing), uniform (none)


def _run(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, bf16: bool):
    """Forward (under bf16 autocast when asked) and backward of (y * w).sum() + aux loss."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    y, aux = out if isinstance(out, tuple) else (out, None)
    loss = (y.float() * w).sum() + (aux.loss if aux is not None else 0.0)
    loss.backward()
    return y, aux, x.grad


def _grad(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A gradient, zeros where autograd left None (nothing flowed there)."""
    return torch.zeros_like(like) if t is None else t


def _compare(cpu: nn.Module, gpu: nn.Module, x: torch.Tensor, what: str, bf16: bool = True,
             bf16_grad: float = BF16_GRAD, bf16_param_direction: bool = False) -> None:
    with torch.no_grad():
        probe = cpu(x)
    shape = (probe[0] if isinstance(probe, tuple) else probe).shape
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    y_c, aux_c, gx_c = _run(cpu, x, w, False)
    y_g, aux_g, gx_g = _run(gpu, x.cuda(), w.cuda(), bf16)
    tol_out, tol_grad = (BF16_OUT, bf16_grad) if bf16 else (1e-4, 1e-4)
    # "max" mixtures take an element-wise max of G mixtures: a near tie there may go the other way in bf16
    out = 0.03 if bf16 and what.endswith("max") else 0.0
    if aux_c is not None:
        assert torch.equal(aux_g.expert_counts.cpu(), aux_c.expert_counts), f"{what}: routing differs"
        _rel_close(aux_g.loss.float(), aux_c.loss, tol_grad, f"{what} aux loss")
    _rel_close(y_g.float(), y_c, tol_out, f"{what} output", out)
    _rel_close(gx_g, gx_c, tol_grad, f"{what} input gradient", out)
    for (name, p_c), (_, p_g) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if bf16 and bf16_param_direction:
            _direction_close(_grad(p_g.grad, p_g), _grad(p_c.grad, p_c), f"{what} grad {name}")
        else:
            _rel_close(_grad(p_g.grad, p_g), _grad(p_c.grad, p_c), tol_grad, f"{what} grad {name}", out)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("router", list(BF16_ROUTERS))
def test_every_router_on_cuda_matches_the_cpu(router, bf16):
    """Forward + backward of every router of MoE on CUDA (bf16 autocast, and fp32) against the CPU in fp32."""
    torch.manual_seed(0)
    cpu = MoE(dim=32, num_experts=8, hidden_dim=64, router=ROUTER_CLASSES.get(router, router), **BF16_ROUTERS[router])
    if router == "noisy_topk":
        cpu.eval()  # eval: the clean logits (training noise comes from each device's generator)
    lead = _exact_router(cpu.router)
    x = torch.randn(2, 8, 32)  # 16 tokens; soft routes within each of the 2 groups
    if lead:
        x[..., :lead] = _exact_values(16, lead).view(2, 8, lead)
    _compare(cpu, copy.deepcopy(cpu).cuda(), x, router, bf16)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("router", ["topk", "switch"])
def test_token_moe2d_on_cuda_matches_the_cpu(router, bf16):
    torch.manual_seed(0)
    cpu = TokenMoE2d(16, num_experts=8, hidden_dim=32, router=router, k=2 if router == "topk" else None)
    _exact_router(cpu.moe.router)
    x = torch.randn(2, 16, 4, 4)  # 32 tokens
    x[:, :8] = _exact_values(32, 8).view(2, 4, 4, 8).permute(0, 3, 1, 2)
    _compare(cpu, copy.deepcopy(cpu).cuda(), x, f"TokenMoE2d {router}", bf16)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("routing", ["sigmoid", "softmax"])
def test_condconv_on_cuda_matches_the_cpu(routing, bf16):
    torch.manual_seed(0)
    cpu = CondConv2d(8, 16, 3, num_experts=4, padding=1, routing=routing)
    _compare(cpu, copy.deepcopy(cpu).cuda(), torch.randn(4, 8, 8, 8), f"CondConv2d {routing}", bf16)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("impl", ["auto", "grouped", "loop"])
def test_conv_block_experts_on_cuda_match_the_cpu(impl, bf16):
    """Per-image top-2 routing to E conv blocks (the cifar10-moe ``blocks`` layer); the CPU runs "loop"."""
    torch.manual_seed(0)
    e, c = 4, 8
    gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, e, bias=False))
    _pick_first(gate[-1])
    cpu = MoE(None, e, router="topk", k=2, experts=ConvBlockExperts(c, 16, e, stride=2, impl="loop"), gate=gate)
    gpu = copy.deepcopy(cpu).cuda()
    gpu.experts.impl = impl
    x = torch.randn(8, c, 8, 8)
    x[:, :e] = _exact_values(8, e)[:, :, None, None]  # constant channels: the pooled gate input is exact
    # two convolutions and BatchNorm over each expert's few images (64 values a channel) amplify bf16's
    # rounding in the gradients (CPU bf16 autocast standing in for CUDA: input gradient 7% of its largest
    # value off, a conv weight's gradient, a difference of large terms, 22%): the input gradient within 12%,
    # the parameters' gradients by direction and length
    _compare(cpu, gpu, x, f"ConvBlockExperts {impl}", bf16, bf16_grad=0.12, bf16_param_direction=True)


# ----------------------------------------------------------------------------- unaligned and empty groups


def _groups(counts: list[int], k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (N, k), weights (N, k)) giving expert e exactly counts[e] assignments (sum divisible by k,
    no expert twice for a token)."""
    e = len(counts)
    slots = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    n = len(slots) // k
    idx = slots.view(k, n).t().contiguous()  # column j holds a run of experts: no token gets one expert twice
    assert (idx[:, 0] != idx[:, 1]).all() and idx.max() < e
    return idx, torch.rand(n, k, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("impl", ["auto", "grouped", "static", "bucketed", "padded"])
@pytest.mark.parametrize("dims", [(64, 128, 64), (30, 50, 20)], ids=["aligned", "unaligned-widths"])
@pytest.mark.parametrize("counts", [[0, 3, 1, 0, 17, 5, 0, 8], [0, 0, 0, 34, 0, 0, 0, 0], [0] * 8],
                         ids=["empty-and-odd", "one-expert", "no-tokens"])
def test_unaligned_and_empty_expert_groups(counts, dims, impl, bf16):
    """Experts with no rows, group sizes that are no multiple of anything, widths off the 16-byte alignment
    ``torch._grouped_mm`` needs (another path then), and a batch with no token at all."""
    if sum(counts) == 0:
        idx, wts = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    elif max(counts) == sum(counts):  # one expert takes everything: k = 1
        idx, wts = torch.full((sum(counts), 1), counts.index(max(counts))), torch.rand(sum(counts), 1)
    else:
        idx, wts = _groups(counts)
    torch.manual_seed(0)
    cpu = MLPExperts(8, *dims)
    gpu = copy.deepcopy(cpu).cuda()
    gpu.sparse_impl = impl
    x = torch.randn(idx.shape[0], dims[0])
    g = torch.randn(idx.shape[0], dims[2])
    outs = []
    for m, dev, amp in ((cpu, "cpu", False), (gpu, "cuda", bf16)):
        xx, ww = x.to(dev).requires_grad_(True), wts.to(dev).requires_grad_(True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            y = m.forward_sparse(xx, idx.to(dev), ww)
        (y.float() * g.to(dev)).sum().backward()
        outs.append((y, xx.grad, ww.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y_c, gx_c, gw_c, gp_c), (y_g, gx_g, gw_g, gp_g) = outs
    tol_out, tol_grad = (BF16_OUT, BF16_GRAD) if bf16 else (1e-4, 1e-4)
    what = f"{impl} {dims} {counts}"
    assert y_g.shape == (idx.shape[0], dims[2])
    _rel_close(y_g.float(), y_c, tol_out, f"{what} output")
    _rel_close(_grad(gx_g, x), _grad(gx_c, x), tol_grad, f"{what} input grad")
    _rel_close(_grad(gw_g, wts), _grad(gw_c, wts), tol_grad, f"{what} weight grad")
    params = dict(cpu.named_parameters())
    empty = [e for e, c in enumerate(counts) if c == 0]
    for n, p in params.items():
        got, want = _grad(gp_g[n], p).cpu(), _grad(gp_c[n], p)
        _rel_close(got, want, tol_grad, f"{what} grad {n}")
        if empty and got.dim() and got.shape[0] == 8:  # an expert without rows gets exactly zero
            assert not got[empty].any(), f"{what}: {n} of an empty expert is not zero"


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("router,bf16", [("dense", True), ("topk", False), ("topk", True), ("switch", True)],
                         ids=["dense-bf16", "topk-fp32", "topk-bf16", "switch-bf16"])
def test_torch_compile_on_cuda(router, bf16):
    """The layer compiled with inductor on CUDA computes what it computes eagerly, forward and backward
    (the dense path with ``fullgraph=True``, as on the CPU)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MoE(dim=64, num_experts=8, hidden_dim=128, router=router,
                **({"k": 2} if router == "topk" else {})).cuda()
    lead = _exact_router(eager.router)  # an exact gate: rounding cannot flip a routing decision
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=router == "dense")
    x = torch.randn(2, 16, 64)
    x[..., :lead] = _exact_values(32, lead).view(2, 16, lead)
    x, w = x.cuda(), torch.randn(2, 16, 64, device="cuda")
    res = []
    for m, p in ((eager, eager), (compiled, model)):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            y, aux = m(xx)
        ((y.float() * w).sum() + aux.loss).backward()
        res.append((y.detach().float(), xx.grad, [q.grad for q in p.parameters()]))
    tol = 2e-2 if bf16 else 1e-4  # bf16: inductor fuses and rounds in other places
    _rel_close(res[1][0], res[0][0], tol, f"compiled {router} output")
    _rel_close(res[1][1], res[0][1], tol * 2, f"compiled {router} input grad")
    for a, b in zip(res[1][2], res[0][2]):
        if b is not None:
            _rel_close(a, b, tol * 2, f"compiled {router} param grad")


# ----------------------------------------------------------------------------- host syncs


@pytest.mark.parametrize("case", ["bf16-grouped", "fp32-static", "bf16-unaligned"])
def test_topk_training_step_does_not_sync(case):
    """One training step of a top-k layer (forward under autocast, backward, SGD step) reads nothing back
    to the host: ``torch.cuda.set_sync_debug_mode("error")`` raises at the first synchronising call."""
    from moelab.device import count_syncs

    bf16, dim = case.startswith("bf16"), 30 if "unaligned" in case else 64
    torch.manual_seed(0)
    layer = MoE(dim=dim, num_experts=8, hidden_dim=2 * dim, router="topk", k=2).cuda()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(512, dim, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            y, aux = layer(x)
        loss = y.float().square().mean() + aux.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    step()  # warm-up: one-off initialisation (kernels, allocator, optimizer state) may sync
    torch.cuda.synchronize()
    _, syncs = count_syncs(step)
    assert syncs == [], f"{case}: {len(syncs)} host sync(s) in one training step, at {syncs}"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_bench_layer_on_cuda():
    """``moelab bench layer --device cuda``: every implementation timed on the GPU, fp32 and bf16."""
    from moelab.bench.layer import bench_layer

    rows = bench_layer([(64, 128, 8, 2, 512)], dtypes=("fp32", "bf16"), repeats=1, warmup=1, verbose=False,
                       impls=("ours", "naive", "dense"), device="cuda")
    assert [r["dtype"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert r["device"] == "cuda" and r["ours_ms"] > 0 and r["naive_ms"] > 0 and r["dense_ms"] > 0
