"""``moelab bench cnn``: training throughput of the cifar10-moe MoE CNNs against their dense-equal-flops CNNs.

For each MoE variant (a ``--set``-style spec of the ``cifar_moe`` model section) the dense FastCNN whose
counted inference FLOPs per example match it (:func:`moelab.cost.match_width`) is built too, and one
training step (forward, summed cross-entropy, backward, SGD step) of each is timed, interleaved, on the
same random batch; the table gives images/s, the ratio to the variant's own dense-equal-flops network
measured in the same run, both networks' counted FLOPs and parameters, and the share of the MoE
network's forward time spent routing (CondConv: the routing MLP and the kernel mix; MoE blocks: the
router and the dispatch plan, timed in isolation on the layer's real input).

The networks come from a builder the caller passes (``build(spec, width, probe) -> (mixture, dense,
dense width)``): the CLI passes the cifar10-moe family's (:func:`moelab.experiments.bench_models.cnn_pair`),
so this module knows no experiment.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moelab.bench.common import amp_context, format_table, time_interleaved
from moelab.cost import count_params, flops_per_example
from moelab.moe import CondConv2d, MoE
from moelab.precision import fast_bf16

#: build(spec, width, probe) -> (mixture, dense-equal-flops network, its width)
Builder = Callable[[str, int, torch.Tensor], tuple[nn.Module, nn.Module, int]]


def _route_time(model: nn.Module, x: torch.Tensor, amp, repeats: int) -> float:
    """Seconds per forward spent in the routing parts of ``model``'s MoE modules, timed on their inputs."""
    inputs: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(mod, args[0].detach()))
             for m in model.modules() if isinstance(m, CondConv2d | MoE)]
    with torch.no_grad(), amp():
        model(x)
    for h in hooks:
        h.remove()

    def route():
        for mod, inp in inputs.items():
            if isinstance(mod, CondConv2d):
                r = mod.routing_weights(inp)
                (r.to(mod.weight.dtype) @ mod.weight)  # the kernel mix
            else:  # per-position routing (dim set) routes (tokens, C) rows, as the layer does
                mod.router(inp if mod.dim is None else inp.reshape(-1, mod.dim))
    with torch.no_grad(), amp():
        t = time_interleaved({"route": route}, warmup=1, repeats=repeats)["route"]
    return t


def bench_cnn(build: Builder, variants: Sequence[str], width: int = 128, batch: int = 256, dtype: str = "bf16",
              repeats: int = 3, channels_last: bool = True, seed: int = 0) -> list[dict]:
    """One row per variant: both networks' training images/s (one step timed interleaved), counts, routing share."""
    torch.manual_seed(seed)
    amp = amp_context(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    probe = x[:2]
    rows = []
    for spec in variants:
        moe, dense, w = build(spec, width, probe)
        moe, dense = moe.to(memory_format=fmt), dense.to(memory_format=fmt)
        target = flops_per_example(moe, probe)
        steps = {}
        for name, net in (("moe", moe), ("dense", dense)):
            opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

            def step(net=net, opt=opt):
                with amp():
                    logits, aux, _ = net.forward_with_aux(x)
                loss = F.cross_entropy(logits.float(), y, reduction="sum") + aux
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            steps[name] = step
        t = time_interleaved(steps, warmup=1, repeats=repeats)
        moe.eval()
        with torch.no_grad(), amp():
            fwd = time_interleaved({"f": lambda net=moe: net(x)}, warmup=1, repeats=repeats)["f"]
        share = _route_time(moe, x, amp, repeats) / fwd
        rows.append({"variant": spec, "moe_img_s": batch / t["moe"], "dense_img_s": batch / t["dense"],
                     "ratio": t["dense"] / t["moe"], "dense_width": w, "moe_mflops": target / 1e6,
                     "dense_mflops": flops_per_example(dense, probe) / 1e6, "moe_params": count_params(moe),
                     "dense_params": count_params(dense), "route_share": share})
    return rows


COLUMNS = [("variant", "variant", "s"), ("moe_img_s", "moe img/s", ".0f"), ("dense_img_s", "dense-eq-flops img/s", ".0f"),
           ("ratio", "moe/dense", ".2f"), ("dense_width", "dense width", "d"), ("moe_mflops", "moe MFLOPs", ".1f"),
           ("dense_mflops", "dense MFLOPs", ".1f"), ("moe_params", "moe params", ",d"),
           ("dense_params", "dense params", ",d"), ("route_share", "routing share of fwd", ".1%")]


def main(argv: Sequence[str] | None, build: Builder, variants: Sequence[str]) -> int:
    """``moelab bench cnn`` on the networks ``build`` makes; ``variants``: the default specs."""
    p = argparse.ArgumentParser(prog="moelab bench cnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=";".join(variants),
                   help="';'-separated specs, e.g. 'condconv:E=4:blocks=3;blocks:E=8:k=1:router=switch'")
    p.add_argument("--width", type=int, default=128, help="the MoE networks' model.width")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast where this machine computes bf16 natively, fp32 otherwise")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.dtype == "auto":
        a.dtype = "bf16" if fast_bf16("cpu") else "fp32"
    t0 = time.perf_counter()
    rows = bench_cnn(build, a.variants.split(";"), a.width, a.batch, a.dtype, a.repeats)
    print(f"training step, batch {a.batch}, {a.dtype}, {torch.get_num_threads()} threads "
          f"({time.perf_counter() - t0:.0f} s)")
    print(format_table(rows, COLUMNS))
    return 0
