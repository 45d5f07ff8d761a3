"""``moelab bench cnn``: training throughput of the cifar10-moe MoE CNNs against their dense-equal-flops CNNs.

For each MoE variant (a ``--set``-style spec of the ``cifar_moe`` model section) the dense FastCNN whose
counted inference FLOPs per example match it (:func:`moelab.cost.match_width`) is built too, and one
training step (forward, summed cross-entropy, backward, SGD step) of each is timed, interleaved, on the
same random batch; the table gives images/s, the ratio to the variant's own dense-equal-flops network
measured in the same run, both networks' counted FLOPs and parameters, and the share of the MoE
network's forward time spent routing (CondConv: the routing MLP and the kernel mix; MoE blocks: the
router and the dispatch plan, timed in isolation on the layer's real input).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moelab.bench.common import amp_context, format_table, time_interleaved
from moelab.cost import count_params, flops_per_example, match_width
from moelab.errors import MoelabError
from moelab.experiments.cifar_moe import Model, build_model
from moelab.models.fast_cnn import FastCNN
from moelab.moe import CondConv2d, MoE
from moelab.precision import fast_bf16

VARIANTS = ("condconv:E=4:blocks=3", "condconv:E=4:blocks=2,3", "blocks:E=4:k=2", "blocks:E=4:router=switch",
            "blocks:E=8:router=switch", "blocks:E=4:router=switch:expert=resnet", "tokens:E=8:k=2:blocks=3:hidden=8w")


def parse_variant(spec: str, width: int) -> Model:
    """``"condconv:E=4:blocks=2,3"`` / ``"blocks:E=8:k=1:router=switch"`` / ``"tokens:E=8:k=2:hidden=8w"`` -> the
    cifar_moe model section (``hidden``: the token experts' hidden width, ``Nw`` = N x ``width``)."""
    kind, *opts = spec.split(":")
    if kind not in ("condconv", "blocks", "tokens"):
        raise MoelabError(f"bench cnn: variant {spec!r}: expected condconv:..., blocks:... or tokens:..., got {kind!r}")
    m: dict = {"moe": kind, "width": width}
    keys = {"E": "num_experts", "k": "k", "blocks": "moe_blocks", "router": "router", "routing": "routing",
            "expert": "expert_block", "hidden": "expert_hidden"}
    for opt in opts:
        key, _, val = opt.partition("=")
        if key not in keys or not val:
            raise MoelabError(f"bench cnn: variant {spec!r}: unknown option {opt!r} (expected one of "
                              f"{', '.join(k + '=' for k in keys)})")
        if key == "blocks":
            m["moe_blocks"] = [int(b) for b in val.split(",")]
        elif key == "hidden":
            m[keys[key]] = int(val[:-1]) * width if val.endswith("w") else int(val)
        elif key in ("E", "k"):
            m[keys[key]] = int(val)
        else:
            m[keys[key]] = val
    return dataclasses.replace(Model(), **m)


def _route_time(model: FastCNN, x: torch.Tensor, amp, repeats: int) -> float:
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


def bench_cnn(variants: Sequence[str] = VARIANTS, width: int = 128, batch: int = 256, dtype: str = "bf16",
              repeats: int = 3, channels_last: bool = True, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    amp = amp_context(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    probe = x[:2]
    rows = []
    for spec in variants:
        m = parse_variant(spec, width)
        moe = build_model(m).to(memory_format=fmt)
        target = flops_per_example(moe, probe)
        w = match_width(lambda w, m=m: flops_per_example(build_model(m, w, dense=True), probe), target, hi=8 * width)
        dense = build_model(m, w, dense=True).to(memory_format=fmt)
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moelab bench cnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=";".join(VARIANTS),
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
    rows = bench_cnn(a.variants.split(";"), a.width, a.batch, a.dtype, a.repeats)
    print(f"training step, batch {a.batch}, {a.dtype}, {torch.get_num_threads()} threads "
          f"({time.perf_counter() - t0:.0f} s)")
    print(format_table(rows, COLUMNS))
    return 0
