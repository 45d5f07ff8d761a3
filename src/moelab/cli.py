"""The ``moelab`` command: each sub-command is a thin call into a package below."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from moelab.errors import MoelabError
from moelab.io import os_error_of
from moelab.runtime import tune_allocator

BENCHES = {
    "layer": "our MoE layer vs a naive loop vs a dense FFN of equal active FLOPs (--ep N: expert-parallel)",
    "conv": "ways to run the ten CNN experts (ConvExperts implementations), side by side",
    "cnn": "the cifar10-moe MoE CNNs vs their dense-equal-FLOPs CNNs, training images/s",
    "steps": "each experiment's own MoE vs its dense-equal-FLOPs network: training step time, where it goes",
}


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


def _cmd_study(a: argparse.Namespace) -> int:
    from moelab.study import run_study

    run_study(a.experiment, a.grid, sets=a.set, out=a.out, seeds=a.seeds, seed=a.seed, data_dir=a.data_dir,
              device=a.device, quiet=a.quiet, jobs=a.jobs)
    return 0


def _cmd_map(a: argparse.Namespace) -> int:
    from moelab.study.map import main

    return main(a.studies, a.label, a.out)


def _cmd_list(a: argparse.Namespace) -> int:
    from moelab.experiments import describe_builtins

    rows = describe_builtins()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


def _cmd_data_check(a: argparse.Namespace) -> int:
    from moelab.data import check_datasets
    from moelab.data.check import check_verdict, format_check_report

    rows = check_datasets(a.data_dir)
    print(format_check_report(rows))
    ok, verdict = check_verdict(rows, a.data_dir)
    print(verdict, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _bench_help() -> str:
    width = max(map(len, BENCHES))
    lines = [f"usage: moelab bench {{{','.join(BENCHES)}}} [OPTIONS]", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in BENCHES.items()]
    lines += ["", "`moelab bench NAME --help` lists a benchmark's options."]
    return "\n".join(lines)


def _cmd_bench(a: argparse.Namespace, rest: list[str]) -> int:
    if a.what == "layer" and any(r == "--ep" or r.startswith("--ep=") for r in rest):
        from moelab.bench.ep import main
    elif a.what == "layer":
        from moelab.bench.layer import main
    elif a.what == "cnn":  # the benchmarks know no experiment: the CLI hands them the family's networks
        from moelab.bench.cnn import main as bench_cnn
        from moelab.experiments.bench_models import VARIANTS, cnn_pair

        return bench_cnn(rest, cnn_pair, VARIANTS) or 0
    elif a.what == "steps":
        from moelab.bench.steps import main as bench_steps
        from moelab.experiments.bench_models import SIZES, step_pair

        return bench_steps(rest, step_pair, tuple(SIZES)) or 0
    else:
        from moelab.bench.conv import main
    return main(rest) or 0


def _cmd_gradcheck(a: argparse.Namespace) -> int:
    from moelab.experiments.jacobs.gradcheck import gradcheck_main

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

    st = sub.add_parser("study", help="an experiment over a grid of settings x seeds: MoE vs dense at equal cost")
    st.add_argument("experiment", nargs="?", help="built-in experiment name or path to a .toml config")
    st.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a config key and its values (repeatable: the grid is every combination)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key in every cell")
    st.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per cell (default 3)")
    st.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    st.add_argument("--out", help="study folder (default runs/NAME-study-TIMESTAMP); run again to continue it")
    st.add_argument("--data-dir", help="where data sets live (default: $MOELAB_DATA_DIR, then the user cache)")
    st.add_argument("--device", default="auto", metavar="DEVICE", help="cpu, cuda, cuda:N or auto")
    st.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="cells run at once, each in its own process (default 1; a CPU with N free cores)")
    st.add_argument("--quiet", action="store_true", help="print nothing but errors")
    st.set_defaults(func=_cmd_study)

    mp = sub.add_parser("map", help="where the mixture pays: MoE - dense-equal-flops along each study's swept key")
    mp.add_argument("studies", nargs="+", help="study folders (moelab study --out), one swept key each")
    mp.add_argument("--label", action="append", default=[], help="a name per study, in order (default: folder names)")
    mp.add_argument("--out", help="write the figure (PNG) here; the table is printed")
    mp.set_defaults(func=_cmd_map)

    sub.add_parser("list", help="list the built-in experiments").set_defaults(func=_cmd_list)

    d = sub.add_parser("data", help="data set utilities")
    dsub = d.add_subparsers(dest="data_cmd", required=True, metavar="SUBCOMMAND")
    dc = dsub.add_parser("check", help="find, verify and time-load every data set")
    dc.add_argument("--data-dir", help="where data sets live (default: $MOELAB_DATA_DIR, then the user cache)")
    dc.set_defaults(func=_cmd_data_check)

    b = sub.add_parser("bench", help="benchmarks: layer, conv, cnn (`moelab bench --help`)", add_help=False)
    b.add_argument("what", choices=list(BENCHES))
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
    c.add_argument("--csv", metavar="FILE",
                   help="write the table as CSV to FILE (default: compare.csv in the folder that holds the runs)")
    c.set_defaults(func=_cmd_compare)
    return p


# What to do about a failed read or write, by errno (the message names the path and the reason).
_OS_HINTS = {
    errno.EROFS: "the file system is read-only: choose a writable place (--out, --csv), or copy the run "
                 "folder to one and work on the copy",
    errno.EACCES: "no permission to write there: choose a folder you can write to (--out, --csv), or change "
                  "its permissions",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "that is a folder: give a file path in it (e.g. FOLDER/compare.csv)",
    errno.ENOSPC: "the disk is full: free some space, then {again}",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
}
_OS_HINTS[errno.EPERM] = _OS_HINTS[errno.EACCES]
_OS_HINTS[errno.EDQUOT] = _OS_HINTS[errno.ENOSPC].replace("the disk is full", "the disk quota is used up")


def _os_error_line(e: OSError, a: argparse.Namespace | None) -> str:
    """One line for a failed read/write: the path, the system's reason, what to do."""
    path = e.filename if e.filename is not None else _written_path(a)
    reason = e.strerror or str(e)
    hint = _OS_HINTS.get(e.errno, "check the path and the disk").format(again=_again(a))
    return f"moelab: error: {f'{path}: ' if path else ''}{reason}; {hint}.".replace("\n", " ")


def _written_path(a: argparse.Namespace | None) -> str | None:
    """Where the command writes, to name when the failed call named no file (a write() on a full disk)."""
    cmd = getattr(a, "cmd", None)
    if cmd == "run":
        return a.resume or a.out
    if cmd == "study":
        return a.out
    if cmd == "compare":
        return a.csv
    if cmd == "map":
        return a.out
    if cmd == "report":
        return ", ".join(a.run_dirs)
    return None


def _again(a: argparse.Namespace | None) -> str:
    """How to carry on once there is space: a run that got as far as its config continues with --resume."""
    if getattr(a, "cmd", None) == "run" and getattr(a, "seeds", None) is None:
        run_dir = a.resume or a.out
        if run_dir is None:
            return "continue the run with `moelab run --resume RUN_DIR` (its last checkpoint is kept)"
        if os.path.isfile(os.path.join(run_dir, "config.toml")):
            return f"continue the run with `moelab run --resume {run_dir}` (its last checkpoint is kept)"
    return "run the same command again"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tune_allocator()  # keep freed tensors in the heap: see moelab.runtime
    parser = build_parser()
    a = None
    try:
        if argv[:1] == ["bench"]:
            if argv[1:2] in (["-h"], ["--help"]):
                print(_bench_help())
                return 0
            if len(argv) == 1 or argv[1] not in BENCHES:
                got = f"'{argv[1]}'" if len(argv) > 1 else "nothing"
                raise MoelabError(f"moelab bench: expected a benchmark ({', '.join(BENCHES)}), got {got}; "
                                  f"`moelab bench --help` lists them.")
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
    except BrokenPipeError:  # `moelab ... | head`: the reader left; nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # the disk (full, read-only, permissions, a path through a file): one line
        err = os_error_of(e)
        if err is None or (err.errno not in _OS_HINTS and err.filename is None):  # not about a path: a bug
            raise
        print(_os_error_line(err, a), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
