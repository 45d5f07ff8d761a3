"""moelab.cost: parameter and FLOP counts against hand counts on small networks."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moelab import MLPExperts, MoE
from moelab.cost import cost_row, count_flops, count_params, flops_per_example, match_width
from moelab.errors import MoelabError
from moelab.models.mlp_mixture import SparseMoEMLP, mlp, mlp_mixture


def test_mlp_counts_match_hand_count():
    m = mlp(196, 25, 10)
    x = torch.randn(32, 196)
    assert count_params(m) == 196 * 25 + 25 + 25 * 10 + 10
    # two GEMMs per example: 2 * (196 * 25 + 25 * 10) FLOPs (multiply-adds counted twice, biases not)
    assert flops_per_example(m, x) == 2 * (196 * 25 + 25 * 10)
    assert cost_row(m, x) == {"params": 5185, "flops_per_example": 10300.0, "rho": 0.0}  # dense: nothing routed


def test_conv_counts_match_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(4, 3, 6, 6)
    conv = 2 * (6 * 6) * 8 * (3 * 3 * 3)  # output pixels x out channels x (in channels x kernel)
    fc = 2 * (8 * 6 * 6) * 10
    assert flops_per_example(net, x) == conv + fc
    assert count_params(net) == 8 * 27 + 8 + 288 * 10 + 10


def test_dense_mixture_is_charged_for_every_expert():
    mix = mlp_mixture(10, 196, 25, 10, 25, "gelu", 1.0)
    x = torch.randn(16, 196)
    experts = 10 * 2 * (196 * 25 + 25 * 10)
    gate = 2 * (196 * 25 + 25 * 10)
    combine = 2 * 10 * 10  # sum_i g_i z_i: E gates x C classes
    assert flops_per_example(mix, x) == experts + gate + combine


def test_sparse_layer_is_charged_for_routed_experts_only():
    torch.manual_seed(0)
    d, h, e, k, n = 32, 64, 8, 2, 256
    layer = MoE(dim=d, num_experts=e, hidden_dim=h, router="topk", k=k)
    f = flops_per_example(layer, torch.randn(n, d))
    useful = 2 * k * (d * h + h * d) + 2 * d * e  # k expert MLPs + the router's projection
    assert f == useful  # exactly: no padding rows of the bucketed GEMMs, no bias columns


SPARSE_IMPLS = ["bucketed", "padded", "grouped", "static"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("router,kw", [("topk", {"k": 2}), ("noisy_topk", {"k": 2}), ("hash", {"k": 2}),
                                       ("switch", {"router_options": {"capacity_factor": 1.0}}),
                                       ("topk", {"k": 2, "router_options": {"capacity_factor": 0.7}})])
def test_flops_are_the_mathematics_on_every_path_and_dtype(router, kw, bias):
    """The same layer counts the same FLOPs on the bucketed, padded, grouped and static paths, in fp32 and
    under bf16 autocast: 2 * (kept assignments) * (d*h + h*d) + the router's projection(s), nothing more."""
    torch.manual_seed(0)
    d, h, e, n = 32, 64, 8, 200
    layer = MoE(dim=d, num_experts=e, router=router, experts=MLPExperts(e, d, h, bias=bias), **kw).eval()
    x = torch.randn(n, d)
    with torch.no_grad():
        _, aux = layer(x)
    kept = aux.indices.numel() - int(aux.dropped)
    gates = {"noisy_topk": 2, "hash": 1}.get(router, 1)  # noisy: gate + noise projections; hash: its projection
    want = (2 * kept * (d * h + h * d) + gates * 2 * n * d * e) / n
    counts = {}
    for impl in SPARSE_IMPLS:
        layer.experts.sparse_impl = impl
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                counts[impl, bf16] = flops_per_example(layer, x)
    assert set(counts.values()) == {want}, counts


def test_over_counts_fail():
    """A 5% over-count (e.g. padding rows, or the late-bias GEMM of the grouped path) is not the model's cost."""
    d, h, e, n = 32, 64, 16, 512
    layer = MoE(dim=d, num_experts=e, hidden_dim=h, router="topk", k=2).eval()
    x = torch.randn(n, d)
    f = flops_per_example(layer, x)
    assert f == 2 * 2 * (d * h + h * d) + 2 * d * e
    raw = {}
    for impl in ("bucketed", "grouped"):  # what those layouts compute
        layer.experts.sparse_impl = impl
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            layer(x)
        raw[impl] = counter.get_total_flops() / n
    assert raw["grouped"] > f and raw["bucketed"] > f  # bias GEMMs / padding: exact_compute is what removes them


def test_mnist_sparse_model_counts_the_same_on_every_path():
    """mnist-sparse's network (dim 32, 16 experts 32-64-32, top-2): embed + router + 2 experts + head, whatever
    path or dtype: 30 592 (before: 31 504 on the CPU bucketed path, 32 640 grouped, 33 664 grouped in bf16)."""
    torch.manual_seed(0)
    model = SparseMoEMLP(196, 32, 64, 10, 1, 16, "topk", k=2)
    x = torch.randn(256, 196)
    want = 2 * 196 * 32 + 2 * 32 * 16 + 2 * 2 * (32 * 64 + 64 * 32) + 2 * 32 * 10
    for impl in SPARSE_IMPLS:
        for m in model.modules():
            if isinstance(m, MLPExperts):
                m.sparse_impl = impl
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                assert flops_per_example(model, x) == want, (impl, bf16)


def test_eval_mode_is_restored_and_empty_batch_is_refused():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    m.train()
    flops_per_example(m, torch.randn(3, 4))
    assert m.training
    with pytest.raises(MoelabError, match="batch is empty"):
        flops_per_example(m, torch.randn(0, 4))
    assert count_flops(lambda a: a @ a, torch.randn(5, 5)) == 2 * 5 * 5 * 5


def test_match_width_finds_the_closest_width():
    target = count_params(mlp_mixture(10, 196, 25, 10, 25, "gelu", 1.0))  # 57035
    h = match_width(lambda w: count_params(mlp(196, w, 10)), target)
    assert h == 275
    assert match_width(lambda w: w * w, 50) == 7
    with pytest.raises(MoelabError, match="no width up to 8"):
        match_width(lambda w: w, 100, hi=8)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_grouped_mm_is_counted_on_the_rows_each_expert_owns():
    """torch's counter skips aten._grouped_mm; moelab.cost registers 2 * M * K * O for (M, K) x (E, K, O)."""
    x, w = torch.randn(40, 16), torch.randn(4, 16, 8)
    offs = torch.tensor([5, 5, 25, 40], dtype=torch.int32)  # expert 1 owns no rows
    assert count_flops(lambda: torch._grouped_mm(x, w, offs=offs)) == 2 * 40 * 16 * 8
    layer = MoE(16, 4, router="topk", k=2, experts=MLPExperts(4, 16, 32, bias=False, sparse_impl="grouped")).eval()
    assert count_flops(layer, torch.randn(10, 16)) == 2 * 10 * 16 * 4 + 2 * (10 * 2) * (16 * 32 + 32 * 16)


def test_rho_is_the_routed_share_of_the_counted_flops():
    """rho = (MoE layer minus its router) / total, checked against a hand count on a top-2 MLP mixture,
    and for CondConv2d (its conv counted, its routing function not)."""
    from moelab import MoE
    from moelab.cost import flop_split
    from moelab.moe import CondConv2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.moe, self.head = nn.Linear(16, 32), MoE(32, 4, 64, k=2), nn.Linear(32, 10)

        def forward(self, x):
            y = self.moe(self.stem(x))
            return self.head(y[0] if isinstance(y, tuple) else y)

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    flops, rho = flop_split(Net(), x)
    stem, router, head = 2 * 16 * 32, 2 * 32 * 4, 2 * 32 * 10
    experts = 2 * 2 * (32 * 64 + 64 * 32)  # k = 2 experts per example, two GEMMs each
    assert flops == stem + router + experts + head
    assert rho == round(experts / flops, 4)

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.cc = nn.Conv2d(3, 8, 3, padding=1), CondConv2d(8, 8, 3, padding=1, num_experts=4)

        def forward(self, x):
            return self.cc(self.stem(x))

    f, r = flop_split(Conv(), torch.randn(2, 3, 8, 8))
    stem_f, cc_f, routing = 2 * 3 * 8 * 9 * 64, 2 * 8 * 8 * 9 * 64, 2 * 8 * 4  # per image
    mix = 2 * 4 * (8 * 8 * 9 + 8)  # the experts' kernels and biases mixed by the routing weights: routed
    assert f == stem_f + routing + mix + cc_f
    assert r == round((mix + cc_f) / f, 4)
