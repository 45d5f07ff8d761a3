"""``moelab bench layer --ep N``: the expert-parallel MoE layer on N local processes vs one process.

Both time forward + backward of the same ``MoE(d, E, h, router="topk", k)`` (same seed, same
weights) on the same global batch of ``N * tokens`` tokens:

* ``single``: one process (``--threads`` threads) runs the whole layer on the global batch;
* ``ep``: N processes (``--threads`` threads each) join a process group (gloo on CPU, nccl on GPU),
  rank r keeps experts [r*E/N, (r+1)*E/N) (``ExpertParallelMoE``) and runs its ``tokens`` tokens;
  tokens travel to their experts' ranks and back by all-to-all. A step's time is the slowest rank's.

Throughput is global tokens per second; ``ratio`` = ep / single (> 1: expert parallelism is faster).
Times are medians of ``repeats`` steps after ``warmup``; ranks start each step together (barrier).
On one machine the N processes share its cores and memory bandwidth, so this measures the
exchange's overhead more than multi-node scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch

from moelab.bench.common import amp_context, format_table, sync
from moelab.errors import MoelabError


def _step_fn(layer, x: torch.Tensor, g: torch.Tensor, amp):
    def step():
        with amp():
            y, aux = layer(x)
        torch.autograd.backward([y, aux.loss], [g.to(y.dtype), torch.ones_like(aux.loss)])
        for p in layer.parameters():
            p.grad = None

    return step


def _time(step, warmup: int, repeats: int, dev: torch.device, barrier=None) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(repeats):
        if barrier is not None:
            barrier()
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def _worker(rank: int, cfg: dict, path: str) -> None:
    import torch.distributed as dist

    from moelab.moe.layer import MoE
    from moelab.parallel.ddp import default_device
    from moelab.parallel.expert_parallel import ExpertParallelMoE

    dev = default_device()
    world = dist.get_world_size()
    torch.manual_seed(cfg["seed"])
    layer = MoE(cfg["dim"], cfg["experts"], cfg["hidden"], router="topk", k=cfg["k"]).to(dev)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    x = torch.randn(world * cfg["tokens"], cfg["dim"], generator=g).to(dev)  # the global batch
    gy = torch.randn(world * cfg["tokens"], cfg["dim"], generator=g).to(dev)
    amp = amp_context(cfg["dtype"], dev.type)
    ep = ExpertParallelMoE.from_moe(layer, exchange=cfg["exchange"])
    mine = slice(rank * cfg["tokens"], (rank + 1) * cfg["tokens"])
    ts = _time(_step_fn(ep, x[mine], gy[mine], amp), cfg["warmup"], cfg["repeats"], dev, dist.barrier)
    t = torch.tensor(ts, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank ends
    single = None
    if rank == 0:  # the others wait in the barrier below (blocked, not computing)
        single = _time(_step_fn(layer, x, gy, amp), cfg["warmup"], cfg["repeats"], dev)
        tokens = world * cfg["tokens"]
        ep_s, single_s = statistics.median(t.tolist()), statistics.median(single)
        row = {**cfg, "world": world, "device": str(dev), "backend": dist.get_backend(),
               "global_tokens": tokens, "single_ms": 1e3 * single_s, "ep_ms": 1e3 * ep_s,
               "single_tok_s": tokens / single_s, "ep_tok_s": tokens / ep_s, "ratio": single_s / ep_s}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(row, f)
    dist.barrier()


def bench_ep(nproc: int = 2, dim: int = 256, hidden: int = 1024, experts: int = 8, k: int = 2, tokens: int = 2048,
             dtype: str = "fp32", exchange: str = "dropless", warmup: int = 2, repeats: int = 5, threads: int = 1,
             seed: int = 0) -> dict:
    """Time the EP layer on ``nproc`` processes and the single-process layer; returns one result row."""
    from moelab.parallel.launch import spawn

    if nproc < 2:
        raise MoelabError(f"--ep needs at least 2 processes, got {nproc}")
    if experts % nproc:
        raise MoelabError(f"--experts ({experts}) must be divisible by --ep ({nproc})")
    cfg = dict(dim=dim, hidden=hidden, experts=experts, k=k, tokens=tokens, dtype=dtype, exchange=exchange,
               warmup=warmup, repeats=repeats, threads=threads, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        spawn(_worker, nproc, (cfg, path), threads=threads, timeout_s=300)
        with open(path, encoding="utf-8") as f:
            return json.load(f)


COLUMNS = (("world", "procs", "d"), ("experts", "E", "d"), ("k", "k", "d"), ("global_tokens", "tokens", "d"),
           ("single_ms", "single ms", ".1f"), ("ep_ms", "ep ms", ".1f"), ("single_tok_s", "single tok/s", ",.0f"),
           ("ep_tok_s", "ep tok/s", ",.0f"), ("ratio", "ep/single", ".2f"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moelab bench layer --ep N", description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, default=2, help="processes (experts sharded over them)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per process (global batch = ep * tokens)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--exchange", choices=["dropless", "padded"], default="dropless")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (single uses the same)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(list(argv) if argv is not None else None)
    row = bench_ep(a.ep, a.dim, a.hidden, a.experts, a.k, a.tokens, a.dtype, a.exchange, a.warmup, a.repeats,
                   a.threads, a.seed)
    if a.json:
        print(json.dumps(row, indent=2))
    else:
        print(f"expert-parallel MoE layer, fwd+bwd, d={a.dim} h={a.hidden} {a.dtype} {a.exchange}, "
              f"{row['backend']} on {row['device']}, {a.threads} thread(s) per process")
        print(format_table([row], COLUMNS))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
