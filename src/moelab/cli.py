"""The ``moelab`` command: each sub-command is a thin call into a package below."""

from __future__ import annotations

import argparse
import sys

from moelab.errors import MoelabError
from moelab.runtime import tune_allocator


def _cmd_run(a: argparse.Namespace) -> int:
    if a.nproc < 0:
        raise MoelabError(f"--nproc N expects N >= 1 (local processes; 0 or 1: one), got {a.nproc}.")
    if a.nproc and a.nproc > 1:
        from moelab.parallel.launch import launch_local

        return launch_local(a.nproc, sys.argv[1:])
    from moelab.experiments.runner import run_experiment

    if a.seeds is not None:
        from moelab.experiments.seeds import run_seeds

        if a.resume:
            raise MoelabError("moelab run: --seeds and --resume do not go together; run the same --seeds "
                              "command with the same --out again to continue its unfinished seeds.")
        run_seeds(a.experiment, a.set, out=a.out, data_dir=a.data_dir, seed=a.seed or 0, n=a.seeds, quiet=a.quiet,
                  device=a.device)
        return 0
    from moelab.device import resolve_device
    from moelab.parallel.ddp import maybe_init_from_env

    cpu = resolve_device(a.device).type == "cpu"  # a bad --device is refused here, before any process group
    with maybe_init_from_env("gloo" if cpu else None) as dist_ctx:
        run_experiment(
            a.experiment, a.set, out=a.out, data_dir=a.data_dir, seed=a.seed, resume=a.resume,
            quiet=a.quiet, is_main=dist_ctx.is_main, device=a.device,
        )
    return 0


def _cmd_list(a: argparse.Namespace) -> int:
    from moelab.experiments import describe_builtins

    rows = describe_builtins()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


def _cmd_data_check(a: argparse.Namespace) -> int:
    from moelab.data import check_datasets
    from moelab.data.check import format_check_report

    rows = check_datasets(a.data_dir)
    print(format_check_report(rows))
    return 0 if all(r["status"] in ("OK", "MISSING") for r in rows) else 1


def _cmd_bench(a: argparse.Namespace, rest: list[str]) -> int:
    if a.what == "layer" and any(r == "--ep" or r.startswith("--ep=") for r in rest):
        from moelab.bench.ep import main
    elif a.what == "layer":
        from moelab.bench.layer import main
    elif a.what == "cnn":
        from moelab.bench.cnn import main
    else:
        from moelab.bench.conv import main
    return main(rest) or 0


def _cmd_gradcheck(a: argparse.Namespace) -> int:
    from moelab.experiments.jacobs_gradcheck import gradcheck_main

    return gradcheck_main(a.experiment, a.set, data_dir=a.data_dir, seed=a.seed)


def _cmd_report(a: argparse.Namespace) -> int:
    from moelab.analysis.report import write_report

    for run_dir in a.run_dirs:
        html, md = write_report(run_dir)
        print(f"wrote {html}\nwrote {md}")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from moelab.analysis.compare import compare_main

    return compare_main(a.run_dirs, csv_path=a.csv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab", description="Mixture-of-Experts experiments for image classification.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run an experiment (a built-in name or a .toml file)")
    r.add_argument("experiment", nargs="?", help="built-in experiment name (see `moelab list`) or path to a .toml config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--out", help="run directory (default runs/NAME-sSEED-TIMESTAMP)")
    r.add_argument("--data-dir", help="where data sets live (default: $MOELAB_DATA_DIR, then the user cache)")
    r.add_argument("--seed", type=int, default=None, help="random seed (default 0; on --resume: the run's)")
    r.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run N >= 1 seeds (seed, seed+1, ...) into OUT/seed-K folders, then compare them")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR")
    r.add_argument("--nproc", type=int, default=0, help="data-parallel on N local processes (torchrun)")
    r.add_argument("--device", default="auto", metavar="DEVICE",
                   help="cpu, cuda, cuda:N or auto (default: auto = CUDA when available, else the CPU)")
    r.add_argument("--quiet", action="store_true", help="print nothing but errors")
    r.set_defaults(func=_cmd_run)

    sub.add_parser("list", help="list the built-in experiments").set_defaults(func=_cmd_list)

    d = sub.add_parser("data", help="data set utilities")
    dsub = d.add_subparsers(dest="data_cmd", required=True, metavar="SUBCOMMAND")
    dc = dsub.add_parser("check", help="find, verify and time-load every data set")
    dc.add_argument("--data-dir", help="where data sets live (default: $MOELAB_DATA_DIR, then the user cache)")
    dc.set_defaults(func=_cmd_data_check)

    b = sub.add_parser("bench", help="benchmarks (`moelab bench layer --help`)", add_help=False)
    b.add_argument("what", choices=["layer", "conv", "cnn"])
    b.set_defaults(func=None, bench=True)

    g = sub.add_parser("gradcheck", help="autograd vs finite-difference gradients of an experiment's model")
    g.add_argument("experiment")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--data-dir")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_gradcheck)

    rep = sub.add_parser("report", help="write report.html and report.md for finished runs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.set_defaults(func=_cmd_report)

    c = sub.add_parser("compare", help="compare runs (mean +- std over seeds of one config)")
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--csv", help="also write the table as CSV here (default: compare.csv in the current folder)")
    c.set_defaults(func=_cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tune_allocator()  # keep freed tensors in the heap: see moelab.runtime
    parser = build_parser()
    try:
        if argv[:1] == ["bench"]:
            a, rest = parser.parse_known_args(argv)
            return _cmd_bench(a, rest)
        a = parser.parse_args(argv)
        return a.func(a)
    except MoelabError as e:
        print(f"moelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
