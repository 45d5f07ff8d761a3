"""``moelab run NAME --seeds N``: one experiment over seeds ``seed .. seed+N-1``, then a comparison.

Runs go to ``OUT/seed-<seed>`` (default OUT ``runs/NAME-seeds-TIMESTAMP``); the table of
``moelab compare OUT`` (mean +- std over the seeds) is printed and written to ``OUT/compare.csv``.
Started again with the same OUT, finished seeds are kept and an interrupted one is resumed.
"""

from __future__ import annotations

import time
from pathlib import Path

from moelab.analysis.compare import compare_main
from moelab.analysis.rundir import read_summary
from moelab.errors import ConfigError, MoelabError
from moelab.experiments import resolve_config
from moelab.experiments.runner import run_experiment


def default_seeds_dir(name: str) -> Path:
    return Path("runs") / f"{name}-seeds-{time.strftime('%Y%m%d-%H%M%S')}"


def run_seeds(
    experiment: str | None,
    overrides: list[str] | None = None,
    *,
    out: str | Path | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    n: int = 3,
    quiet: bool = False,
    device: str = "cpu",
) -> list[dict]:
    """Run ``experiment`` for ``n`` seeds; returns their summaries."""
    if experiment is None:
        raise MoelabError("moelab run --seeds: name a built-in experiment or a .toml config (see `moelab list`).")
    if n < 1:
        raise MoelabError(f"--seeds N expects N >= 1 (the number of seeds to run), got {n}.")
    name, _ = resolve_config(experiment, overrides)  # fails early on a bad name or override
    out = Path(out) if out is not None else default_seeds_dir(name)
    summaries, dirs = [], [out / f"seed-{s}" for s in range(seed, seed + n)]
    existed = out.exists()
    try:
        _run_all(experiment, overrides, dirs, seed, data_dir, quiet, summaries, device)
    except ConfigError:  # refused before training (a size that does not fit the data): leave nothing behind
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    compare_main(dirs, csv_path=out / "compare.csv", quiet=quiet)
    return summaries


def _run_all(experiment: str, overrides: list[str] | None, dirs: list[Path], seed: int, data_dir: str | None,
             quiet: bool, summaries: list[dict], device: str = "cpu") -> None:
    for s, run_dir in zip(range(seed, seed + len(dirs)), dirs):
        if (run_dir / "summary.json").is_file():
            if not quiet:
                print(f"seed {s}: already finished in {run_dir}")
            summaries.append(read_summary(run_dir))
            continue
        resume = run_dir if (run_dir / "config.toml").is_file() else None
        summaries.append(run_experiment(experiment, overrides, out=run_dir, data_dir=data_dir, seed=s,
                                        resume=resume, quiet=quiet, device=device))
