"""``moelab bench conv``: throughput of the ConvExperts implementations side by side.

Every (dtype, mode) cell times each implementation on the same input, taking turns, and reports
images/s, ms per batch, process CPU ms per batch and the speed ratio to ``"separate"`` (the loop of E
CNNs) measured in the same cell. bf16 means fp32 weights under ``torch.autocast(dtype=torch.bfloat16)``
(mixed precision, as training runs). "train" is forward + cross-entropy + backward (no optimizer step:
the same for every implementation). One Seed1CNN is timed too, for scale. Each figure is the best of
``iters`` batches after ``warmup``. On a machine shared with other jobs, wall times measure the
neighbours too: compare the cpu ms (with ``--threads 1`` it is free of OpenMP spin-waiting).

The default run (10 experts, batch 256, fp32+bf16, infer+train, vmap in inference only) takes about
1.5-2 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import MoelabError
from moelab.models.cifar_cnn import Seed1CNN
from moelab.precision import cpu_bf16_isa
from moelab.reproductions.conv_experts import ConvExperts
from moelab.runtime import allocator_state, tune_allocator

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
MODES = ("infer", "train")
IMPLS = ("separate", "grouped", "vmap")


def _step_fn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, amp: torch.dtype | None
) -> Callable:
    dev = x.device.type
    amp_ctx = (lambda: torch.autocast(dev, dtype=amp)) if amp is not None else contextlib.nullcontext

    def infer():
        with torch.inference_mode(), amp_ctx():
            model(x)

    def train():
        with amp_ctx():
            out = model(x)  # (E, N, K) or (N, K)
            logits = out.reshape(-1, out.shape[-1]).float()  # (E*N, K)
            loss = F.cross_entropy(logits, y.repeat(logits.shape[0] // y.shape[0]))
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return infer if mode == "infer" else train


def _time_interleaved(
    fns: dict[str, Callable], warmup: int, iters: int, sync: Callable
) -> dict[str, tuple[float, float] | str]:
    """Best (wall, process CPU) seconds per call of each fn, the fns taking turns so that load drift
    hits all alike; an error message instead for a fn that raises."""
    best: dict[str, tuple[float, float] | str] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            sync()
            best[name] = (float("inf"), float("inf"))
        except Exception as e:  # an impl unsupported on this platform: report it, keep the table
            best[name] = f"{type(e).__name__}: {e}"[:200]
    for _ in range(iters):
        for name, fn in fns.items():
            if isinstance(best[name], str):
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def bench_conv(
    num_experts: int = 10,
    batch: int = 256,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    modes: Sequence[str] = MODES,
    impls: Sequence[str] = IMPLS,
    train_impls: Sequence[str] | None = ("separate", "grouped"),
    compile: bool = False,
    channels_last: bool = True,
    iters: int = 1,
    warmup: int = 1,
    single: bool = True,
    device: str = "cpu",
    seed: int = 0,
    tune_malloc: bool = False,
    threads: int | None = None,
) -> list[dict]:
    """Time ``ConvExperts(num_experts)`` per impl x dtype x mode (+ one Seed1CNN); one dict per row.

    ``train_impls`` (None: same as ``impls``) are the implementations timed in "train" mode; vmap is left
    out by default since it trains ~4x slower than separate and would double the run time.
    """
    train_impls = impls if train_impls is None else train_impls
    for name, values, known in (
        ("dtype", dtypes, DTYPES),
        ("mode", modes, MODES),
        ("impl", [*impls, *train_impls], IMPLS),
    ):
        for v in values:
            if v not in known:
                raise MoelabError(f"bench conv: unknown {name} {v!r}; expected one of {', '.join(known)}")
    if iters < 1 or warmup < 0 or batch < 1:
        raise MoelabError(
            f"bench conv: need iters >= 1, warmup >= 0, batch >= 1; got {iters}, {warmup}, {batch}"
        )
    malloc = tune_allocator() if tune_malloc else allocator_state()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=dev)
    experts = ConvExperts(num_experts).to(dev)
    base = {
        "num_experts": num_experts,
        "batch": batch,
        "compile": compile,
        "channels_last": channels_last,
        "device": dev.type,
        "threads": torch.get_num_threads(),
        "malloc": malloc,
    }
    rows = []
    for dtype in dtypes:
        for mode in modes:
            models: dict[str, nn.Module] = {}
            for impl in (
                train_impls if mode == "train" else impls
            ):  # one ConvExperts per impl (same weights): each may be compiled
                models[impl] = copy.deepcopy(experts)
                models[impl].impl = impl
            if single:
                models["Seed1CNN"] = Seed1CNN().to(dev)
            fns = {}
            for name, model in models.items():
                model.train(mode == "train")
                fns[name] = _step_fn(torch.compile(model) if compile else model, x, y, mode, DTYPES[dtype])
            secs = _time_interleaved(fns, warmup, iters, sync)
            ref = secs.get("separate")
            for name, sec in secs.items():
                row = {**base, "what": "experts", "impl": name, "dtype": dtype, "mode": mode}
                if name == "Seed1CNN":
                    row |= {"what": "single", "num_experts": 1}
                if isinstance(sec, str):
                    row |= {"images_per_s": None, "ms_per_batch": None, "cpu_ms_per_batch": None}
                    row |= {"vs_separate": None, "error": sec}
                    rows.append(row)
                    continue
                ratio = ref[0] / sec[0] if not isinstance(ref, str | None) and name != "Seed1CNN" else None
                row |= {"images_per_s": batch / sec[0], "ms_per_batch": 1e3 * sec[0]}
                row |= {"cpu_ms_per_batch": 1e3 * sec[1], "vs_separate": ratio, "error": None}
                rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows as a text table. cpu ms/batch (process CPU time, all threads) is the steadier figure on a
    machine shared with other jobs: wall time there measures the neighbours too."""
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    lines = [
        f"{r0['device']}, {r0['threads']} threads, batch {r0['batch']}, channels_last={r0['channels_last']}, "
        f"compile={r0['compile']}, malloc={r0['malloc']}"
    ]
    head = f"{'dtype':5} {'mode':5} {'model':16} {'images/s':>9} {'ms/batch':>9} {'cpu ms/batch':>12} {'vs separate':>11}"
    lines += [head, "-" * len(head)]
    for r in rows:
        model = f"{r['num_experts']} x {r['impl']}" if r["what"] == "experts" else "1 x Seed1CNN"
        if r["error"]:
            lines.append(f"{r['dtype']:5} {r['mode']:5} {model:16} n/a  ({r['error']})")
            continue
        ratio = f"{r['vs_separate']:.2f}x" if r["vs_separate"] else ""
        lines.append(
            f"{r['dtype']:5} {r['mode']:5} {model:16} {r['images_per_s']:9.0f} {r['ms_per_batch']:9.0f}"
            f" {r['cpu_ms_per_batch']:12.0f} {ratio:>11}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moelab bench conv", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--modes", default="infer,train", help="comma list of infer, train")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ", ".join(IMPLS))
    p.add_argument("--train-impls", default="separate,grouped", help="impls timed in train mode")
    p.add_argument("--iters", type=int, default=1, help="timed batches per row (best is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile every model (slow warm-up)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--no-single", dest="single", action="store_false", help="skip the single Seed1CNN rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument(
        "--tune-malloc", action="store_true", help="glibc: no mmap for big blocks (moelab.runtime.tune_allocator; the moelab command already does this)"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = p.parse_args(argv)
    rows = bench_conv(
        a.experts,
        a.batch,
        a.dtypes.split(","),
        a.modes.split(","),
        a.impls.split(","),
        a.train_impls.split(","),
        compile=a.compile,
        channels_last=a.channels_last,
        iters=a.iters,
        warmup=a.warmup,
        single=a.single,
        device=a.device,
        tune_malloc=a.tune_malloc,
        threads=a.threads,
    )
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        print(f"(CPU bf16: {cpu_bf16_isa()}; without AMX / AVX512-BF16, bf16 runs emulated and slower than fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
