"""``moelab bench steps``: each experiment's own MoE against its dense-equal-flops network, one training step.

For every size (an experiment's built-in config, with ``--set``-style changes), the mixture the experiment
trains and the dense network whose counted inference FLOPs per example match it
(:func:`moelab.cost.match_width`) come from a builder the caller passes (the CLI passes
:func:`moelab.experiments.bench_models.step_pair`: this module knows no experiment), and one training step of each
(forward, cross-entropy + auxiliary losses, backward, the optimizer step) is timed on one random batch of
the experiment's batch size, interleaved. ``moe/dense`` is the dense network's step time over the
mixture's: 1.0 is the best a sparse network of equal FLOPs can do.

Where the mixture's step goes comes from a :mod:`torch.profiler` trace of a few steps: the self CPU time of
every op, grouped by what it does (expert GEMMs, other GEMMs, routing, permute / combine, activations and
norms, allocation and copies, the optimizer, the rest), an op inside a backward node or the optimizer step
counted where that node or step belongs.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moelab.bench.common import amp_context, format_table, time_interleaved
from moelab.cost import flop_split, flops_per_example

#: build(size) -> (mixture, dense-equal-flops network, a batch x, labels y, {"batch", "dense_width"})
Builder = Callable[[str], tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, dict]]

#: op-name fragments -> where the time goes (first match wins; matched against the lower-cased name of the
#: op, else of the nearest enclosing autograd node or range: ``GeluBackward0`` is an activation's backward)
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("expert GEMMs", ("bmm", "_grouped_mm", "moelab::expert", "moelab::grouped_mlp")),
    ("other GEMMs", ("aten::mm", "aten::addmm", "aten::linear", "convolution", "conv2d", "mkldnn", "mmbackward",
                     "addmmbackward")),
    ("routing", ("topk", "sort", "softmax", "cumsum", "bincount", "histc", "one_hot", "logsumexp", "plan")),
    ("permute / combine", ("permute", "split", "index", "gather", "scatter", "take", "repeat_interleave", "combine",
                           "moelab::")),
    ("activations / norms", ("gelu", "relu", "silu", "sigmoid", "tanh", "norm")),
    ("allocation / copies", ("copy_", "empty", "zeros", "full", "clone", "contiguous", "_to_copy", "cat", "stack",
                             "fill_", "resize_")),
)


def category(op: str) -> str:
    name = op.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def _where_event(ev) -> str:
    """An event's category: the optimizer for anything under ``Optimizer.step``, an activation as itself, expert
    GEMMs for anything else under a grouped or batched GEMM (CPU ``_grouped_mm`` runs one ``mm`` per expert; the
    grouped MLP kernel its GEMMs and activation), else its own name's, else
    (``other``) that of the nearest enclosing event that has one."""
    chain, node = [], ev
    while node is not None:
        chain.append(node.name)
        node = node.cpu_parent
    if any(n.startswith(("Optimizer.step", "Optimizer.zero_grad")) for n in chain):
        return "optimizer"
    cats = [category(n) for n in chain]
    if cats[0] == "activations / norms":  # the activation a grouped MLP kernel runs between its GEMMs
        return cats[0]
    if "expert GEMMs" in cats:
        return "expert GEMMs"
    return next((c for c in cats if c != "other"), "other")


def breakdown(step: Callable[[], object], steps: int = 5) -> dict[str, float]:
    """Share of ``step``'s self CPU time per category (a :mod:`torch.profiler` trace of ``steps`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        per[_where_event(ev)] += ev.self_cpu_time_total
    total = sum(per.values()) or 1.0
    return {k: v / total for k, v in sorted(per.items(), key=lambda kv: -kv[1])}


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp, lr: float = 1e-3) -> Callable[[], None]:
    """One AdamW step of ``net`` on ``(x, y)``: forward, cross-entropy + the auxiliary losses, backward (the
    fused AdamW the experiments train with)."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, fused=True)
    net.train()

    def step():
        with amp():
            logits, aux, _ = net.forward_with_aux(x)
        loss = F.cross_entropy(logits.float(), y) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_steps(build: Builder, sizes: Sequence[str], dtype: str = "fp32", repeats: int = 10, warmup: int = 3,
                profile_steps: int = 5, cpu_time: bool = False) -> list[dict]:
    """One row per size: both networks' step times (interleaved), counted FLOPs, rho and where the time goes."""
    amp = amp_context(dtype)
    rows = []
    for size in sizes:
        moe, dense, x, y, info = build(size)
        probe = x[:256]
        flops, rho = flop_split(moe, probe)
        steps = {"moe": train_step(moe, x, y, amp), "dense": train_step(dense, x, y, amp)}
        t = time_interleaved(steps, warmup=warmup, repeats=repeats, cpu_time=cpu_time)
        rows.append({"size": size, "dtype": dtype, "batch": info["batch"], "moe_ms": 1e3 * t["moe"],
                     "dense_ms": 1e3 * t["dense"], "ratio": t["dense"] / t["moe"], "dense_width": info["dense_width"],
                     "flops": flops, "dense_flops": flops_per_example(dense, probe), "rho": rho,
                     "moe_where": breakdown(steps["moe"], profile_steps) if profile_steps else {},
                     "dense_where": breakdown(steps["dense"], profile_steps) if profile_steps else {}})
    return rows


COLUMNS = [("size", "size", "s"), ("dtype", "dtype", "s"), ("batch", "batch", "d"), ("moe_ms", "moe ms/step", ".2f"),
           ("dense_ms", "dense-eq-flops ms/step", ".2f"), ("ratio", "moe/dense", ".2f"),
           ("flops", "moe FLOPs/ex", ",.0f"), ("dense_flops", "dense FLOPs/ex", ",.0f"), ("rho", "rho", ".3f")]


def _where(share: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in share.items() if v >= 0.01)


def main(argv: Sequence[str] | None, build: Builder, sizes: Sequence[str]) -> int:
    """``moelab bench steps`` on the networks ``build`` makes; ``sizes``: the names it knows (all by default)."""
    p = argparse.ArgumentParser(prog="moelab bench steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(sizes), help=f"comma list of {', '.join(sizes)}")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--profile-steps", type=int, default=5, help="steps profiled for the breakdown (0: none)")
    p.add_argument("--cpu-time", action="store_true", help="time with process CPU time (shared machines, --threads 1)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = bench_steps(build, [s for s in a.sizes.split(",") if s], a.dtype, a.repeats, a.warmup, a.profile_steps,
                       a.cpu_time)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"training step (AdamW), {a.dtype}, {torch.get_num_threads()} threads, "
          f"{'CPU' if a.cpu_time else 'wall'} time, median of {a.repeats}")
    print(format_table(rows, COLUMNS))
    for r in rows:
        if r["moe_where"]:
            print(f"\n{r['size']}: where the mixture's step goes: {_where(r['moe_where'])}")
            print(f"{' ' * len(r['size'])}  and the dense network's: {_where(r['dense_where'])}")
    return 0
