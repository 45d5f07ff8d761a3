"""``moelab bench layer``: our top-k MoE layer vs a naive loop vs a dense FFN of equal active FLOPs.

For each config (d, h, E, k, tokens) and dtype, one run times forward + backward of

* ``ours``:  ``MoE(d, E, h, router="topk", k)`` (sort -> gather -> grouped GEMMs -> weighted combine),
  router epilogue, dispatch and combine on the fused CPU kernels (``moelab.kernels``)
* ``ours_pytorch``: the same layer with the fused kernels off (their PyTorch twins)
* ``naive``: the same router and weights, experts as a Python loop with index_select / index_add
  (``ModuleExperts``, the test oracle)
* ``dense``: ``Linear(d, k*h) -> GELU -> Linear(k*h, d)``, the FFN with the same active FLOPs

GFLOP/s count useful expert FLOPs only: 2 * tokens * k * (d*h + h*d) forward, x3 for forward +
backward (the router, dispatch and losses are overhead). bf16 is fp32 weights under
``torch.autocast(bfloat16)``. Times are medians of ``repeats`` interleaved calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
from torch import nn

from moelab import kernels
from moelab.bench.common import amp_context, format_table, time_interleaved
from moelab.errors import MoelabError
from moelab.moe.layer import MoE
from moelab.precision import cpu_bf16_isa
from moelab.runtime import allocator_state

#: (d, h, E, k, tokens)
CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (256, 1024, 8, 2, 4096),
    (512, 2048, 16, 2, 8192),
    (128, 256, 64, 2, 8192),
)
IMPLS = ("ours", "ours_pytorch", "naive", "dense")


def useful_flops(d: int, h: int, k: int, tokens: int) -> float:
    """Expert FLOPs of forward + backward: 3 * 2 * tokens * k * (d*h + h*d)."""
    return 3.0 * 2.0 * tokens * k * (d * h + h * d)


def build(d: int, h: int, e: int, k: int, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    ours = MoE(dim=d, num_experts=e, hidden_dim=h, router="topk", k=k)
    naive = MoE(dim=d, num_experts=e, router="topk", k=k, experts=ours.experts.to_module_experts())
    naive.router.load_state_dict(ours.router.state_dict())
    dense = nn.Sequential(nn.Linear(d, k * h), nn.GELU(), nn.Linear(k * h, d))
    return {"ours": ours, "naive": naive, "dense": dense}


def _step(model: nn.Module, x: torch.Tensor, g: torch.Tensor, amp, fused: bool = True) -> callable:
    params = list(model.parameters())

    def step():
        with kernels.use(fused), amp():
            out = model(x)
        if isinstance(out, tuple):
            torch.autograd.backward([out[0], out[1].loss], [g.to(out[0].dtype), torch.ones_like(out[1].loss)])
        else:
            out.backward(g.to(out.dtype))
        x.grad = None
        for p in params:
            p.grad = None

    return step


def bench_layer(configs: Sequence[tuple[int, int, int, int, int]] | None = None,
                dtypes: Sequence[str] = ("fp32", "bf16"), repeats: int = 5, json_out: bool = False,
                threads: int | None = None, warmup: int = 2, impls: Sequence[str] = IMPLS,
                device: str = "cpu", seed: int = 0, verbose: bool = True, cpu_time: bool = False) -> list[dict]:
    """Time ours / naive / dense per config and dtype; one dict per (config, dtype); prints a table
    (or JSON with ``json_out``) when ``verbose``. ``cpu_time``: process CPU time instead of wall time
    (for shared machines; use with ``threads=1``)."""
    bad = [i for i in impls if i not in IMPLS]
    if bad or "ours" not in impls:
        raise MoelabError(f"impls must include 'ours' and be among {IMPLS}, got {list(impls)}")
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for d, h, e, k, n in configs or CONFIGS:
        models = build(d, h, e, k, seed)
        for m in models.values():
            m.to(device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
        g = torch.randn(n, d, generator=gen).to(device)
        flops = useful_flops(d, h, k, n)
        for dt in dtypes:
            amp = amp_context(dt, torch.device(device).type)
            fns = {name: _step(models["ours" if name == "ours_pytorch" else name], x, g, amp,
                               fused=name != "ours_pytorch") for name in impls}
            secs = time_interleaved(fns, warmup=warmup, repeats=repeats, device=device, cpu_time=cpu_time)
            row: dict = {"d": d, "h": h, "E": e, "k": k, "tokens": n, "dtype": dt, "device": str(device),
                         "tf32": _tf32(device),
                         "threads": torch.get_num_threads(), "timer": "cpu" if cpu_time else "wall",
                         "allocator": allocator_state(), "kernels": kernels.status(), "cpu_bf16": cpu_bf16_isa()}
            for name, s in secs.items():
                row[f"{name}_ms"] = s * 1e3
                row[f"{name}_tok_s"] = n / s
                row[f"{name}_gflops"] = flops / s / 1e9
            if "dense" in secs:
                row["ours_vs_dense"] = secs["dense"] / secs["ours"]
            if "naive" in secs:
                row["ours_vs_naive"] = secs["naive"] / secs["ours"]
            if "ours_pytorch" in secs:
                row["kernel_speedup"] = secs["ours_pytorch"] / secs["ours"]
            rows.append(row)
    if verbose:
        print(json.dumps(rows, indent=1) if json_out else format_rows(rows))
    return rows


def _tf32(device: str | torch.device) -> bool | None:
    """Whether fp32 matmuls run in TF32 on ``device`` (None off CUDA)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) if torch.device(device).type == "cuda" else None


def format_rows(rows: Sequence[dict]) -> str:
    out = []
    for r in rows:
        r = dict(r, config=f"d={r['d']} h={r['h']} E={r['E']} k={r['k']} T={r['tokens']}")
        out.append(r)
    cols = [("config", "config", ""), ("dtype", "dtype", "")]
    for name in IMPLS:
        if f"{name}_ms" in rows[0]:
            cols += [(f"{name}_ms", f"{name} ms", ".1f"), (f"{name}_tok_s", f"{name} tok/s", ".0f"),
                     (f"{name}_gflops", f"{name} GFLOP/s", ".1f")]
    cols += [("ours_vs_dense", "ours/dense", ".2f"), ("ours_vs_naive", "ours/naive", ".2f"),
             ("kernel_speedup", "ours/ours_pytorch", ".2f")]
    cols = [c for c in cols if c[0] in out[0]]
    dev = rows[0].get("device", "cpu")
    where = (f"heap allocator: {rows[0]['allocator']}; kernels: {rows[0]['kernels']}; CPU bf16: {rows[0]['cpu_bf16']}"
             if dev == "cpu" else f"device {dev}; fp32 matmuls in TF32: {rows[0].get('tf32')}")
    note = f"(ratios are throughput ratios; target ours/dense >= 0.80; {where})"
    return format_table(out, cols) + "\n" + note


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moelab bench layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON rows")
    p.add_argument("--quick", action="store_true", help="1 warm-up, 3 repeats")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--configs", default=None, help="semicolon list of d,h,E,k,tokens (default: the three standard)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda, cuda:N or auto; a CUDA device runs fp32 matmuls in TF32 as the "
                        "experiments do (MOELAB_TF32=0: full fp32)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with process CPU time (shared machines; use with --threads 1)")
    a = p.parse_args(argv)
    configs = None
    if a.configs:
        try:
            configs = [tuple(int(v) for v in c.split(",")) for c in a.configs.split(";")]
        except ValueError as err:
            raise MoelabError(f"--configs: expected 'd,h,E,k,tokens;...', got {a.configs!r}") from err
        if any(len(c) != 5 for c in configs):
            raise MoelabError(f"--configs: each config needs 5 ints d,h,E,k,tokens, got {a.configs!r}")
    repeats = a.repeats if a.repeats is not None else (3 if a.quick else 5)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    from moelab.device import resolve_device

    device = str(resolve_device(a.device))  # a CUDA device that is not there is refused with the reason
    bench_layer(configs, a.dtypes.split(","), repeats=repeats, json_out=a.json, threads=a.threads,
                warmup=warmup, impls=a.impls.split(","), device=device, cpu_time=a.cpu_time)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
