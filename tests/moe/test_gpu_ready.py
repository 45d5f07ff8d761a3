"""The MoE layer without a GPU, checked for what a GPU needs: it runs on the meta device, the sparse routers
read nothing back to the host, every router compiles as one graph, the expert path follows the dtype, and
routing does not change with the compute precision.

Host syncs are counted with a TorchDispatchMode on the CPU twins of the CUDA code (fused CPU kernels off,
``MOELAB_CHECK_FINITE=0`` as on an accelerator); ``.tolist()`` reads CPU memory without an ATen op, so the
meta-device test (where any read-back raises) covers it.
"""

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from moelab import MoE, kernels
from moelab.moe import MLPExperts
from moelab.moe.experts import sparse_path
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

ROUTERS = ["dense", "topk", "noisy_topk", "switch", "expert_choice", "soft", "multi_gate", "uniform", "hash",
           "random"]
SPARSE = ["topk", "noisy_topk", "hash", "random", "switch"]  # the sparse (top-k) path

#: ops that read a device tensor back to the host (or size their output from its values)
SYNC_OPS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.item, torch.ops.aten.nonzero, torch.ops.aten.bincount,
            torch.ops.aten.equal, torch.ops.aten.is_nonzero, torch.ops.aten.unique_consecutive,
            torch.ops.aten._unique2, torch.ops.aten.masked_select, torch.ops.aten.repeat_interleave}


class SyncOps(TorchDispatchMode):
    """Records every op that forces a device->host sync: the ops above, any op tagged data-dependent, and
    indexing with a boolean mask (its output size is the mask's count)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tags = getattr(func, "tags", ())
        bool_index = func is torch.ops.aten.index.Tensor and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in (args[1] or ()))
        if func.overloadpacket in SYNC_OPS or torch.Tag.data_dependent_output in tags or bool_index or (
                torch.Tag.dynamic_output_shape in tags and func is not torch.ops.aten.index.Tensor):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def accelerator_like(monkeypatch):
    """The code path an accelerator runs: PyTorch twins of the fused CPU kernels, no finite check read-back."""
    monkeypatch.setenv("MOELAB_CHECK_FINITE", "0")
    with kernels.use(False):
        yield


def _layer(router, **kw):
    kw = {"router_options": {"capacity_factor": 1.0}, **kw} if router == "topk_capacity" else kw
    return MoE(32, 8, router=router.removesuffix("_capacity"), experts=MLPExperts(8, 32, 64, sparse_impl="grouped"),
               **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_runs_on_the_meta_device(router, dtype):
    """No op without a meta kernel (bincount), no value read back (.item(), .tolist(), nonzero): fp32 takes the
    static path off the CPU, bf16 the grouped one."""
    with torch.device("meta"):
        layer = MoE(32, 8, 64, router=router).to(dtype)
        x = torch.randn(4, 16, 32, dtype=dtype, requires_grad=True)
    y, aux = layer(x)
    assert y.device.type == "meta" and y.shape == (4, 16, 32) and aux.loss.shape == ()
    assert aux.expert_counts.shape == (8,)
    (y.float().sum() + aux.loss).backward()
    assert x.grad.shape == x.shape


def test_sync_counter_sees_host_reads():
    """The counter below is not vacuous: it catches the ops the sparse path used to run."""
    t = torch.tensor([0, 2, 2, 1])
    with SyncOps() as m:
        torch.bincount(t)
        int(t.sum())
        t[t > 0]
        torch.nonzero(t)
        t.max().item()
    assert len(m.ops) == 5, m.ops


@pytest.mark.parametrize("router", [*SPARSE, "topk_capacity"])
def test_sparse_routers_have_no_host_sync(router, accelerator_like):
    """Forward and backward of the grouped path (bf16) run no op that reads data back, capacity routers
    included (the dropped assignments stay as dead rows instead of trimming the plan to the kept count)."""
    layer = _layer(router).to(torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    assert layer.experts._impl(torch.bfloat16, "cpu") == "grouped"
    with SyncOps() as fwd:
        y, aux = layer(x)
    with SyncOps() as bwd:
        (y.float().square().sum() + aux.loss).backward()
    assert fwd.ops == [] and bwd.ops == [], (fwd.ops, bwd.ops)
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_static_path_has_no_host_sync(router, accelerator_like):
    """The path fp32 takes off the CPU: a fixed-capacity bmm (switch) or every expert (topk), no read-back."""
    layer = MoE(32, 8, router=router, experts=MLPExperts(8, 32, 64, sparse_impl="static"))
    x = torch.randn(64, 32, requires_grad=True)
    with SyncOps() as fwd:
        y, aux = layer(x)
    with SyncOps() as bwd:
        (y.square().sum() + aux.loss).backward()
    assert fwd.ops == [] and bwd.ops == [], (fwd.ops, bwd.ops)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_compiles_as_one_graph(router, fresh_dynamo):
    """``fullgraph=True`` (no graph break allowed) on the grouped path in bf16, training mode, forward and
    backward; the compiled layer equals the eager one (PyTorch twins: what the compiled code runs)."""
    layer = _layer(router).to(torch.bfloat16)
    x = torch.randn(4, 16, 32, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with kernels.use(False):
        torch.manual_seed(1)  # noisy_topk / random draw the same noise
        y0, a0 = layer(x)
    torch.manual_seed(1)
    y1, a1 = compiled(x)
    assert_close(y1.float(), y0.float(), 0, f"{router} output")
    assert_close(a1.loss, a0.loss, 0, f"{router} aux loss")
    (y1.float().sum() + a1.loss).backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_sparse_router_graph_breaks_with_explain(router, fresh_dynamo):
    """torch._dynamo.explain's count (the number reported in the issue); fullgraph=True above covers the rest."""
    layer = _layer(router).to(torch.bfloat16).eval()
    explained = torch._dynamo.explain(layer)(torch.randn(64, 32, dtype=torch.bfloat16))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


AUTO_PATHS = {  # (device type, dtype) -> path of sparse_impl="auto" / "grouped"
    ("cpu", torch.float32): ("bucketed", "grouped"), ("cpu", torch.bfloat16): ("bucketed", "grouped"),
    ("cpu", torch.float16): ("bucketed", "grouped"),
    ("cuda", torch.bfloat16): ("grouped", "grouped"), ("cuda", torch.float32): ("static", "static"),
    ("cuda", torch.float16): ("static", "static"), ("meta", torch.bfloat16): ("grouped", "grouped"),
    ("meta", torch.float32): ("static", "static"), ("xpu", torch.float32): ("static", "static"),
}


@pytest.mark.parametrize("device,dtype", list(AUTO_PATHS))
def test_sparse_path_by_device_and_dtype(device, dtype):
    """torch._grouped_mm only in bf16 off the CPU (fp32 there takes a fallback that copies offsets to the host;
    its meta kernel refuses anything but bf16); elsewhere the static path, which reads nothing back."""
    auto, grouped = AUTO_PATHS[device, dtype]
    ex = MLPExperts(4, 32, 64)
    assert ex._impl(dtype, device) == auto
    ex.sparse_impl = "grouped"
    assert ex._impl(dtype, device) == grouped
    for impl in ("bucketed", "padded", "static"):  # named paths are taken as given
        ex.sparse_impl = impl
        assert ex._impl(dtype, device) == impl
    unaligned = MLPExperts(4, 30, 64, sparse_impl="grouped")  # 30 * 2 bytes: not 16-byte aligned rows
    assert unaligned._impl(dtype, device) == ("bucketed" if device == "cpu" else "static")
    assert sparse_path("auto", device, dtype, grouped_ok=False) == ("bucketed" if device == "cpu" else "static")


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch", "hash", "expert_choice"])
def test_routing_does_not_depend_on_precision(router):
    """The gate projection (and the hash projection) runs in float32 under bf16 autocast: the chosen experts
    equal fp32's exactly (E = 16, d = 256; bf16 logits would flip near-ties)."""
    layer = MoE(256, 16, 64, router=router).eval()  # eval: noisy_topk without noise
    x = torch.randn(512, 256)
    _, a32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, a16 = layer(x)
    assert y16.dtype == torch.bfloat16  # the experts did run in bf16
    if router == "expert_choice":
        assert torch.equal(a16.routing.expert_tokens, a32.routing.expert_tokens)
    else:
        assert torch.equal(a16.indices, a32.indices)
    if a32.logits is not None:
        assert a16.logits.dtype == torch.float32 and torch.equal(a16.logits, a32.logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("router", [*SPARSE, "topk_capacity"])
def test_sparse_routers_do_not_sync_on_cuda(router, dtype):
    """On a GPU: CUDA's own sync detector raises on any device->host copy or stream sync during forward and
    backward (bf16 takes the grouped path, fp32 the static one)."""
    layer = MoE(32, 8, 64, router=router.removesuffix("_capacity"),
                **({"router_options": {"capacity_factor": 1.0}} if router == "topk_capacity" else {})).cuda().to(dtype)
    x = torch.randn(256, 32, device="cuda", dtype=dtype, requires_grad=True)
    assert layer.experts._impl(dtype, "cuda") == ("grouped" if dtype == torch.bfloat16 else "static")
    layer(x)  # warm-up: lazy CUDA initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = layer(x)
        (y.float().square().sum() + aux.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad.float()).all()


def test_auto_takes_grouped_for_small_fp32_calls_on_the_cpu():
    """A rule of the call's routed multiply-adds (the same shapes take the same path in every run): grouped
    under SMALL_CALL_MACS in fp32 on the CPU, bucketed above it and in bf16; the paths agree on the output."""
    from moelab.moe.experts import SMALL_CALL_MACS

    ex = MLPExperts(16, 32, 64)  # mnist-sparse's experts: 512 tokens x top-2 = 1024 assignments, 4M MACs
    assert ex._impl(torch.float32, "cpu", 1024) == "grouped"
    assert ex._impl(torch.float32, "cpu", SMALL_CALL_MACS // (2 * 32 * 64)) == "bucketed"  # exactly at the rule
    assert ex._impl(torch.bfloat16, "cpu", 1024) == "bucketed"
    assert ex._impl(torch.float32, "cpu") == "bucketed"  # size unknown
    assert MLPExperts(16, 30, 64)._impl(torch.float32, "cpu", 1024) == "bucketed"  # unaligned: no grouped_mm
    torch.manual_seed(0)
    x, idx = torch.randn(64, 32), torch.randint(0, 16, (64, 2))
    w = torch.rand(64, 2)
    y_auto = ex.forward_sparse(x, idx, w)
    ex.sparse_impl = "bucketed"
    torch.testing.assert_close(y_auto, ex.forward_sparse(x, idx, w), rtol=1e-5, atol=1e-6)
