import pytest
import torch

from moelab import kernels
from moelab.moe import dispatch as D
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401


@pytest.fixture(autouse=True, params=["fused", "pytorch"])
def kernel_path(request):
    """Every dispatch test runs on the fused CPU kernels (when built) and on the PyTorch twins."""
    with kernels.use(request.param == "fused"):
        yield request.param


def _routing(n, e, k, mask_p=0.0):
    idx = torch.rand(n, e).topk(k, dim=-1).indices
    mask = (torch.rand(n, k) >= mask_p) if mask_p else None
    return idx, mask


@pytest.mark.parametrize("n,e,k,mask_p", [(13, 4, 2, 0.0), (13, 4, 2, 0.4), (1, 1, 1, 0.0), (7, 3, 3, 0.0),
                                          (9, 6, 1, 0.5)])
def test_sort_by_expert(n, e, k, mask_p):
    idx, mask = _routing(n, e, k, mask_p)
    plan = D.sort_by_expert(idx, e, mask)
    keep = torch.ones(n, k, dtype=torch.bool) if mask is None else mask
    m = int(keep.sum())
    assert plan.num_rows == m
    assert torch.equal(plan.counts, torch.bincount(idx[keep], minlength=e))
    assert torch.equal(plan.offsets, plan.counts.cumsum(0).to(torch.int32))
    assert (plan.expert[1:] >= plan.expert[:-1]).all()  # sorted by expert
    assert torch.equal(plan.expert, idx.reshape(-1)[plan.order])
    assert torch.equal(plan.token, plan.order // k)
    for ex in range(e):  # stable: token order kept within an expert
        toks = plan.token[plan.expert == ex]
        assert (toks[1:] >= toks[:-1]).all()
    # inverse maps each kept assignment to its sorted row, dropped ones past M
    a = torch.arange(n * k)
    kept = keep.reshape(-1)
    assert torch.equal(plan.order[plan.inverse[kept]], a[kept])
    assert (plan.inverse[~kept] >= m).all()


def _ref_gather_grad(x, plan, g):
    return torch.zeros_like(x).index_add(0, plan.token, g)


@pytest.mark.parametrize("mask_p", [0.0, 0.5])
def test_gather_sorted_matches_index_select(mask_p):
    idx, mask = _routing(11, 5, 2, mask_p)
    plan = D.sort_by_expert(idx, 5, mask)
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    xs = D.gather_sorted(x, plan)
    assert torch.equal(xs, x[plan.token])
    g = torch.randn_like(xs)
    (gx,) = torch.autograd.grad(xs, x, g)
    assert_close(gx, _ref_gather_grad(x, plan, g), 1e-12, "gather grad")
    assert torch.autograd.gradcheck(lambda t: D.gather_sorted(t, plan), (x,))


@pytest.mark.parametrize("k,mask_p", [(1, 0.0), (2, 0.0), (3, 0.3)])
def test_scatter_combine_matches_loop(k, mask_p):
    n, e, o = 9, 4, 5
    idx, mask = _routing(n, e, k, mask_p)
    plan = D.sort_by_expert(idx, e, mask)
    ys = torch.randn(plan.num_rows, o, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    y = D.scatter_combine(ys, plan, w)
    ref = torch.zeros(n, o, dtype=torch.float64)
    for r in range(plan.num_rows):
        a = int(plan.order[r])
        ref[a // k] += w[a // k, a % k] * ys[r]
    assert_close(y, ref, 1e-12, "combine")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (ys, w), g)
    want = torch.autograd.grad(ref, (ys, w), g)
    assert_close(got[0], want[0], 1e-12, "grad ys")
    assert_close(got[1], want[1], 1e-12, "grad w")
    assert torch.autograd.gradcheck(lambda a, b: D.scatter_combine(a, plan, b), (ys, w))


@pytest.mark.parametrize("native", [True, False])
def test_grouped_mm_matches_per_group_matmul(native, monkeypatch):
    if not native:
        monkeypatch.setattr(D, "has_native_grouped_mm", lambda: False)
    counts = torch.tensor([3, 0, 5, 1])  # includes an empty group
    a = torch.randn(int(counts.sum()), 8, requires_grad=True)
    b = torch.randn(4, 8, 4, requires_grad=True)
    out = D.grouped_mm(a, b, counts.cumsum(0).to(torch.int32), counts)
    ref = torch.cat([p @ b[i] for i, p in enumerate(a.split(counts.tolist()))])
    assert_close(out, ref, 1e-5, "grouped_mm")
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (a, b), g), torch.autograd.grad(ref, (a, b), g)
    assert_close(got[0], want[0], 1e-5, "grad a")
    assert_close(got[1], want[1], 1e-5, "grad b")


def test_grouped_mm_autocast_dtype():
    counts = torch.tensor([2, 2])
    a, b = torch.randn(4, 8), torch.randn(2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = D.grouped_mm(a, b, counts.cumsum(0).to(torch.int32), counts)
    assert out.dtype == torch.bfloat16
    assert D.autocast_dtype(a) == torch.float32


def test_pad_unpad_roundtrip():
    idx, mask = _routing(10, 3, 2, 0.3)
    plan = D.sort_by_expert(idx, 3, mask)
    xs = torch.randn(plan.num_rows, 4)
    cap = int(plan.counts.max())
    padded = D.pad_by_expert(xs, plan, cap)
    assert padded.shape == (3, cap, 4)
    for ex in range(3):
        c = int(plan.counts[ex])
        assert torch.equal(padded[ex, :c], xs[plan.expert == ex])
        assert (padded[ex, c:] == 0).all()
    assert torch.equal(D.unpad_by_expert(padded, plan), xs)


def _brute_force_padding(counts, max_b):
    """Smallest padded-row total over all partitions of the sorted loads into <= max_b contiguous buckets."""
    import itertools

    c = sorted([v for v in counts if v > 0], reverse=True)
    best = {}
    for b in range(1, min(max_b, len(c)) + 1):
        for cuts in itertools.combinations(range(1, len(c)), b - 1):
            edges = [0, *cuts, len(c)]
            best[b] = min(best.get(b, 1e18), sum((t - s) * c[s] for s, t in zip(edges[:-1], edges[1:])))
    return best


@pytest.mark.parametrize("counts,max_b,cost", [([5, 3, 0, 7, 7, 1], 8, 0.0), ([9, 1, 4, 4, 2, 8, 3], 3, 0.0),
                                               ([9, 1, 4, 4, 2, 8, 3], 8, 0.05), ([6, 6, 6], 8, 0.01)])
def test_plan_buckets_partition_and_optimality(counts, max_b, cost):
    buckets = D.plan_buckets(counts, max_b, cost)
    ids = [e for experts, _ in buckets for e in experts]
    assert sorted(ids) == [e for e, c in enumerate(counts) if c > 0]  # every loaded expert exactly once
    assert len(buckets) <= max_b
    for experts, cap in buckets:
        assert experts == sorted(experts) and cap == max(counts[e] for e in experts)
    m = sum(counts)
    got = sum(len(ex) * cap for ex, cap in buckets) + cost * m * len(buckets)
    best = min(v + cost * m * b for b, v in _brute_force_padding(counts, max_b).items())
    assert got == pytest.approx(best)
    assert D.plan_buckets([0, 0], 8) == []


@pytest.mark.parametrize("mask_p,max_b", [(0.0, 1), (0.0, 3), (0.4, 2)])
def test_bucket_layout_gather_and_combine(mask_p, max_b):
    n, e, k, o = 15, 5, 2, 3
    idx, mask = _routing(n, e, k, mask_p)
    idx[:, 0] = torch.where(idx[:, 0] == 4, 0, idx[:, 0])  # make loads uneven
    plan = D.sort_by_expert(idx, e, mask)
    lay = D.bucket_layout(plan, max_buckets=max_b)
    counts = plan.counts.tolist()
    assert lay.num_rows == sum(len(ex) * cap for ex, cap in lay.groups)
    order = list(range(e)) if lay.expert_order is None else lay.expert_order.tolist()
    assert sorted(order) == list(range(e))  # a complete permutation: bucket order, then unloaded experts
    assert order[: sum(len(ex) for ex, _ in lay.groups)] == [x for ex, _ in lay.groups for x in ex.tolist()]
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    xe = D.gather_rows(x, lay)
    r = 0
    for experts, cap in lay.groups:  # each expert's rows: its tokens in order, then zero padding
        for ex in experts.tolist():
            c = counts[ex]
            assert torch.equal(xe[r : r + c], x[plan.token[plan.expert == ex]])
            assert (xe[r + c : r + cap] == 0).all()
            r += cap
    ye = torch.randn(lay.num_rows, o, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    y = D.combine_rows(ye, lay, w)
    keep = torch.ones(n, k, dtype=torch.bool) if mask is None else mask
    ref = torch.zeros(n, o, dtype=torch.float64)
    for t in range(n):
        for j in range(k):
            if keep[t, j]:
                ref[t] += w[t, j] * ye[lay.assign_row[t * k + j]]
    assert_close(y, ref, 1e-12, "combine")
    assert torch.autograd.gradcheck(lambda a: D.gather_rows(a, lay), (x,))
    assert torch.autograd.gradcheck(lambda a, b: D.combine_rows(a, lay, b), (ye, w))


@pytest.mark.parametrize("n,e,k,mask_p", [(13, 4, 2, 0.4), (9, 6, 1, 0.5), (7, 3, 3, 0.0), (5, 2, 2, 1.0)])
def test_untrimmed_plan_keeps_dropped_rows_dead(n, e, k, mask_p):
    """trim=False: all N*k rows, the dropped ones last in the last expert's group (offsets[-1] = N*k), read as
    zeros and given no gradient; gather + combine equal the trimmed plan's."""
    idx, mask = _routing(n, e, k, mask_p)
    if mask is None:
        mask = torch.ones(n, k, dtype=torch.bool)
    trimmed, plan = D.sort_by_expert(idx, e, mask), D.sort_by_expert(idx, e, mask, trim=False)
    kept = int(mask.sum())
    assert plan.num_rows == n * k and int(plan.live.sum()) == kept and not plan.live[kept:].any()
    assert torch.equal(plan.counts, trimmed.counts) and torch.equal(plan.order[:kept], trimmed.order)
    assert torch.equal(plan.offsets[:-1], trimmed.offsets[:-1]) and int(plan.offsets[-1]) == n * k
    assert (plan.expert[1:] >= plan.expert[:-1]).all() and int(plan.expert.max()) <= e - 1
    x = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    lay = D.flat_layout(plan)
    xs = D.gather_rows(x, lay)
    assert (xs[kept:] == 0).all() and torch.equal(xs[:kept], x[trimmed.token])
    ys = xs * 3 + 1  # dead rows become non-zero: the combine must not read them
    y = D.combine_rows(ys, lay, w)
    ref = D.scatter_combine(D.gather_sorted(x, trimmed) * 3 + 1, trimmed, w)
    assert_close(y, ref, 1e-12, "combine")
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, x, g, retain_graph=True)[0], torch.autograd.grad(ref, x, g)[0], 1e-12,
                 "grad x")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cap", [1, 3, 20])
def test_capacity_layout_is_one_static_batch(masked, cap):
    n, e, k = 20, 4, 2
    idx = torch.rand(n, e).topk(k, dim=-1).indices
    mask = torch.rand(n, k) > 0.3 if masked else None
    plan = D.sort_by_expert(idx, e, mask, trim=False)
    lay = D.capacity_layout(plan, cap)
    assert lay.num_rows == e * cap and lay.groups[0][1] == cap
    keep = torch.ones(n, k, dtype=torch.bool) if mask is None else mask
    flat = idx.reshape(-1)
    for ex in range(e):  # expert ex's first `cap` kept assignments, in token order, then padding
        mine = [a for a in range(n * k) if keep.reshape(-1)[a] and flat[a] == ex][:cap]
        rows = lay.row_assign[ex * cap:(ex + 1) * cap].tolist()
        assert rows == mine + [n * k] * (cap - len(mine))
        assert lay.row_token[ex * cap:(ex + 1) * cap].tolist() == [a // k for a in mine] + [n] * (cap - len(mine))
        for slot, a in enumerate(mine):
            assert int(lay.assign_row[a]) == ex * cap + slot
    placed = set(lay.row_assign[lay.row_assign < n * k].tolist())
    assert all(int(lay.assign_row[a]) == e * cap for a in range(n * k) if a not in placed)  # dropped: row R
    x = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64)
    xe = D.gather_rows(x, lay)
    assert (xe[lay.row_token == n] == 0).all()
    y = D.combine_rows(xe, lay, w)
    want = sum(w[:, j:j + 1] * x * (lay.assign_row.view(n, k)[:, j:j + 1] < e * cap) for j in range(k))
    assert_close(y, want, 1e-12, "combine of the identity")
    assert torch.autograd.gradcheck(lambda t: D.combine_rows(D.gather_rows(t, lay), lay, w), (x,))
