"""Expert parallelism on 2 gloo/CPU processes vs the single-process MoE layer (the oracle).

One ``spawn`` runs every check (process start-up dominates); each rank records per-check results and
each check is reported as its own test. Rank r routes its own tokens x_r; the oracle runs the full
layer on x_0 and x_1 separately: the EP output/input-grad/router-grad on rank r must equal the oracle's
for x_r, and the owned expert shard's grad the oracle's grad of loss_0 + loss_1.
"""

from __future__ import annotations

import copy
import json
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moelab.moe import MoE
from moelab.parallel import comm
from moelab.parallel.ddp import DistContext, shard_indices, wrap_model
from moelab.parallel.expert_parallel import (
    ExpertParallelMoE,
    expert_parallel,
    make_groups,
    shard_params,
    sync_expert_grads,
)
from moelab.parallel.launch import spawn

WORLD = 2
TOL = dict(rtol=1e-9, atol=1e-10)

# name -> (MoE kwargs, ExpertParallelMoE kwargs, tokens on rank 0, tokens on rank 1)
LAYERS = {
    "topk_dropless": (dict(router="topk", k=2), {}, 12, 7),
    "topk_padded_auto_capacity": (dict(router="topk", k=2), dict(exchange="padded"), 12, 7),
    "topk_capacity_dropless": (dict(router="topk", k=2, router_options={"capacity_factor": 0.75}), {}, 12, 12),
    "switch_padded": (dict(router="switch", router_options={"capacity_factor": 1.0}), dict(exchange="padded"), 12, 9),
    "dense_dropless": (dict(router="dense"), {}, 6, 5),
    "expert_choice_padded_unequal_batches": (dict(router="expert_choice"), dict(exchange="padded"), 12, 7),
    "expert_choice_dropless": (dict(router="expert_choice"), {}, 12, 7),
    "module_experts_topk": (dict(router="topk", k=1, module_experts=True), {}, 10, 10),
    "topk_empty_rank": (dict(router="topk", k=2), {}, 8, 0),
    "noisy_topk_eval": (dict(router="noisy_topk", k=2, eval=True), {}, 9, 6),
    "multi_gate": (dict(router="two_gates_max"), {}, 6, 5),
    "soft_padded": (dict(router="soft"), dict(exchange="padded"), 8, 5),
}
CHECKS = ["comm_native", "comm_p2p", *LAYERS, "padded_static_capacity_drops", "gather_to_moe",
          "train_ep2_ddp", "train_ep1_dp2", "bench_worker"]


def _layer(seed: int = 0, dim: int = 6, experts: int = 4, module_experts: bool = False, eval: bool = False,
           **kw) -> MoE:
    torch.manual_seed(seed)
    if eval:
        return _layer(seed, dim, experts, module_experts, **kw).eval()
    if module_experts:
        mods = [nn.Sequential(nn.Linear(dim, 5), nn.Tanh(), nn.Linear(5, dim)) for _ in range(experts)]
        return MoE(dim, experts, router=kw.pop("router"), experts=mods, **kw).double()
    return MoE(dim, experts, 8, **kw).double()


def _inputs(sizes: tuple[int, int], dim: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, dim, generator=g, dtype=torch.float64) for n in sizes]


def _loss(y: torch.Tensor, aux) -> torch.Tensor:
    return (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).pow(2).sum() + aux.loss


def _close(a, b, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a, b, **TOL), f"{what}: max abs diff {(a - b).abs().max().item():.3g}"


def check_comm(rank: int, impl: str) -> None:
    """Uneven and empty parts; the backward sends each row's gradient back to where the row came from."""
    comm.set_impl(impl)
    try:
        for s0 in ([2, 3], [0, 4], [0, 0], [5, 0]):
            sends = [s0, s0[::-1]]  # rank j sends sends[j][i] rows to rank i
            xs = [torch.arange(sum(s) * 3.0, dtype=torch.float64).view(-1, 3) + 100 * j for j, s in enumerate(sends)]
            recv = comm.exchange_counts(torch.tensor(sends[rank]).view(WORLD, 1)).view(-1).tolist()
            assert recv == [sends[j][rank] for j in range(WORLD)], (sends, recv)
            x = xs[rank].clone().requires_grad_()
            y = comm.all_to_all(x, sends[rank], recv)
            want = torch.cat([xs[j].split(sends[j])[rank] for j in range(WORLD)])
            _close(y.detach(), want, f"{impl} exchange of {sends}")
            (y * (torch.arange(y.shape[0], dtype=y.dtype)[:, None] + 1 + 10 * rank)).sum().backward()
            grads = []  # rows sent to rank i sit after the rows lower ranks sent to i
            for i in range(WORLD):
                off = sum(sends[j][i] for j in range(rank))
                grads.append(torch.arange(off, off + sends[rank][i], dtype=torch.float64) + 1 + 10 * i)
            _close(x.grad, torch.cat(grads)[:, None].expand(-1, 3), f"{impl} grad of {sends}")
    finally:
        comm.set_impl("native")


def check_layer(rank: int, name: str) -> None:
    moe_kw, ep_kw, *sizes = LAYERS[name]
    layer = _layer(**moe_kw)
    xs = _inputs(tuple(sizes))
    ep = ExpertParallelMoE.from_moe(layer, **ep_kw)
    assert isinstance(ep, MoE) and all(getattr(p, "_moelab_expert_shard", False) for p in ep.experts.parameters())
    x = xs[rank].clone().requires_grad_()
    y, aux = ep(x)
    if x.shape[0] == 0:  # no tokens here (the single-process layer rejects an empty batch): only take part
        assert y.shape == (0, layer.out_dim)
        y.sum().backward()
        return
    _loss(y, aux).backward()
    refs = [xx.clone().requires_grad_() for xx in xs]
    total = 0.0
    for i, xi in enumerate(refs):
        if xi.shape[0] == 0:
            continue
        yi, ai = layer(xi)
        li = _loss(yi, ai)
        if i == rank:
            _close(y, yi, "output")
            _close(aux.loss, ai.loss, "aux loss")
            _close(aux.expert_counts, ai.expert_counts, "expert counts")
            rg = torch.autograd.grad(li, list(layer.router.parameters()), retain_graph=True, allow_unused=True)
        total = total + li
    total.backward()
    _close(x.grad, refs[rank].grad, "input grad")
    for (n, p), g in zip(ep.router.named_parameters(), rg):
        _close(p.grad, g, f"router grad {n}")
    lo, hi = ep.experts.expert_range
    if moe_kw.get("module_experts"):
        for m_ep, m_ref in zip(ep.experts.local.experts, layer.experts.experts[lo:hi]):
            for (n, p), q in zip(m_ep.named_parameters(), m_ref.parameters()):
                _close(p.grad, q.grad, f"expert grad {n}")
    else:
        for n, p in ep.experts.local.named_parameters():
            _close(p.grad, getattr(layer.experts, n).grad[lo:hi], f"expert shard grad {n}")


def check_static_capacity(rank: int) -> None:
    """exchange="padded", capacity=2: each expert keeps its first 2 rows (token order), others give zero."""
    layer = _layer(router="topk", k=2)
    xs = _inputs((12, 9))
    ep = ExpertParallelMoE.from_moe(layer, exchange="padded", capacity=2)
    x = xs[rank].clone().requires_grad_()
    y, aux = ep(x)
    y.sum().backward()
    xr = xs[rank].clone().requires_grad_()
    r = layer.router(xr)
    e, cap = layer.num_experts, 2
    onehot = F.one_hot(r.indices.reshape(-1), e)  # (N*k, E) in assignment order n*k + j
    keep = ((onehot.cumsum(0) * onehot).sum(1) <= cap).view_as(r.indices)
    yr = layer.experts.forward_sparse(xr, r.indices, r.weights, keep)
    yr.sum().backward()
    assert not keep.all(), "capacity 2 should drop something in this case"
    _close(y, yr, "output with drops")
    _close(x.grad, xr.grad, "input grad with drops")


def check_gather(rank: int) -> None:
    layer = _layer(router="topk", k=2)
    ep = ExpertParallelMoE.from_moe(layer)
    twin = copy.deepcopy(ep)  # copies the shard, shares the process group
    assert twin.experts.group is ep.experts.group and twin.experts.local.w1 is not ep.experts.local.w1
    x = _inputs((5, 5))[rank]
    _close(twin(x)[0], ep(x)[0], "deep copy output")
    full = ep.to_moe()
    assert type(full) is MoE
    for (n, p), q in zip(layer.state_dict().items(), full.state_dict().values()):
        _close(q, p, f"gathered {n}")
    _close(full(x)[0], layer(x)[0], "gathered layer output")


class _Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(5, 6), nn.Linear(6, 3)
        self.moe = MoE(6, 4, 8, router="topk", k=2, aux_loss_weights={"balance": 0.0})

    def forward(self, x):
        return self.out(self.moe(torch.tanh(self.inp(x)))[0])


def _train(model: nn.Module, batches, x, y, ep: bool) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for idx, w in batches:
        opt.zero_grad()
        (F.cross_entropy(model(x[idx]), y[idx]) * w).backward()
        if ep:
            sync_expert_grads(model)
        opt.step()


def check_train(rank: int, ep_size: int) -> None:
    """DDP (replicated params) + expert parallelism: 2 epochs equal single-process training."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(23, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (23,), generator=g)
    ref = _Net().double()
    order = [shard_indices(23, torch.Generator().manual_seed(e), batch_size=8, with_weights=True,
                           ctx=DistContext()) for e in range(2)]
    _train(ref, [b for ep in order for b in ep], x, y, ep=False)
    ep_group, dp_group = make_groups(ep_size)
    net = expert_parallel(_Net().double(), ep_group, dp_group=dp_group)
    assert shard_params(net), "no expert shard found"
    model = wrap_model(net)
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    batches = [b for e in range(2) for b in shard_indices(23, torch.Generator().manual_seed(e), batch_size=8,
                                                          with_weights=True)]
    _train(model, batches, x, y, ep=True)
    got = net.moe.to_moe()
    for n, p in ref.named_parameters():
        q = got.get_parameter(n[4:]) if n.startswith("moe.") else net.get_parameter(n)
        _close(q, p, f"trained {n}")


def check_bench(rank: int, out_dir: str) -> None:
    """The timing worker of ``moelab bench layer --ep`` on a tiny config."""
    from moelab.bench.ep import _worker as bench_worker

    cfg = dict(dim=8, hidden=16, experts=4, k=2, tokens=32, dtype="fp32", exchange="dropless", warmup=1,
               repeats=2, threads=1, seed=0)
    bench_worker(rank, cfg, f"{out_dir}/bench.json")
    if rank == 0:
        row = json.loads(open(f"{out_dir}/bench.json").read())
        assert row["world"] == 2 and row["global_tokens"] == 64 and row["backend"] == "gloo"
        assert row["ep_ms"] > 0 and row["single_ms"] > 0
        assert row["ratio"] == pytest.approx(row["ep_tok_s"] / row["single_tok_s"])


def _worker(rank: int, out_dir: str) -> None:
    results, times = {}, {}
    jobs = {"comm_native": lambda: check_comm(rank, "native"), "comm_p2p": lambda: check_comm(rank, "p2p"),
            **{n: (lambda n=n: check_layer(rank, n)) for n in LAYERS},
            "padded_static_capacity_drops": lambda: check_static_capacity(rank),
            "gather_to_moe": lambda: check_gather(rank),
            "train_ep2_ddp": lambda: check_train(rank, 2), "train_ep1_dp2": lambda: check_train(rank, 1),
            "bench_worker": lambda: check_bench(rank, out_dir)}
    for name in CHECKS:
        t0 = time.perf_counter()
        try:
            jobs[name]()
            results[name] = "ok"
            times[name] = round(time.perf_counter() - t0, 3)
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()  # a failed check must not leave the other rank in a different collective
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    if rank == 0:
        print("check times (s):", times, flush=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ep")
    spawn(_worker, WORLD, (str(out),), backend="gloo", timeout_s=30)  # CPU tensors, also on a GPU machine
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)}


@pytest.mark.parametrize("check", CHECKS)
def test_expert_parallel(results, check):
    for rank in range(WORLD):
        assert results[rank][check] == "ok", f"rank {rank}:\n{results[rank][check]}"
