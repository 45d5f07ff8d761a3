"""``moelab compare RUN_DIR...``: one table over runs, seeds of one config shown as mean +- std.

Runs are grouped by their config (``config.toml`` without ``run.seed``); a folder that is not a
run is searched for runs below it (e.g. the ``OUT`` of ``moelab run NAME --seeds 3``). Each row
is one (config, model): test accuracy and error, the model's cost as its summary row records it
(``params``, ``flops_per_example``, ``train_time_s``; the equal-cost baselines of issue #15), the
mixture's specialisation index when its eval file has gates, wall time, and a note where a row repeats
another model (``same_model_as``: a dense-gated mixture's equal-params and equal-FLOPs networks are one
network, trained once) or is a smaller network than the mixture (``single``). Unfinished runs (no summary.json) are skipped with a warning.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moelab.analysis.routing import routing_analysis
from moelab.analysis.rundir import RunDir, find_runs, open_run
from moelab.config import RENAMED_KEYS, flatten
from moelab.errors import MoelabError
from moelab.io import atomic_write_text

CSV_FIELDS = ["config", "model", "runs", "seeds", "test_accuracy_mean", "test_accuracy_std", "test_error_pct_mean",
              "test_error_pct_std", "params", "flops_per_example", "train_time_s_mean", "specialisation_mean",
              "specialisation_std", "wall_time_s_mean", "note", "run_dirs"]


@dataclass
class Group:
    """Finished runs sharing one config (they differ only in seed)."""

    key: tuple
    runs: list[RunDir] = field(default_factory=list)
    label: str = ""


def config_key(run: RunDir) -> tuple:
    flat = {RENAMED_KEYS.get(k, k): v for k, v in flatten(run.config).items()}  # runs written before a rename too
    flat.pop("run.seed", None)
    return tuple(sorted((k, repr(v)) for k, v in flat.items()))


def group_runs(runs: list[RunDir]) -> list[Group]:
    """Group by config; label each group by its run name, plus the keys that tell apart groups of one name."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        groups.setdefault(config_key(r), Group(config_key(r))).runs.append(r)
    out = list(groups.values())
    for g in out:
        name = g.runs[0].name
        same = [h for h in out if h.runs[0].name == name]
        if len(same) == 1:
            g.label = name
            continue
        keys = {k for h in same for k, _ in h.key}
        varying = sorted(k for k in keys if len({dict(h.key).get(k) for h in same}) > 1)
        mine = dict(g.key)
        g.label = f"{name} [" + ", ".join(f"{k}={mine.get(k, '-')}" for k in varying) + "]"
    return sorted(out, key=lambda g: g.label)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN std for a single value); NaN values are left out."""
    vals = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan


def _model_accuracies(run: RunDir) -> dict[str, float]:
    s = run.summary or {}
    models = {m: r.get("test_accuracy") for m, r in (s.get("models") or {}).items() if isinstance(r, dict)}
    return models or {"model": s.get("test_accuracy")}


def _row_value(run: RunDir, model: str, key: str):
    r = ((run.summary or {}).get("models") or {}).get(model)
    return r.get(key) if isinstance(r, dict) else None


def _note(runs: list[RunDir], model: str) -> str:
    same = next((v for v in (_row_value(r, model, "same_model_as") for r in runs) if v), None)
    if same:
        return f"same model as {same} (trained once)"
    note = next((v for v in (_row_value(r, model, "note") for r in runs) if v), "")
    return "smaller network" if str(note).startswith("smaller network") else str(note)


def _specialisation(run: RunDir, model: str) -> float:
    if model not in run.eval_models():
        return math.nan
    t, _ = run.load_eval(model)
    if "gates" not in t:
        return math.nan
    return routing_analysis(t["labels"], t["probs"], t["gates"])["specialisation"]


def compare_rows(groups: list[Group]) -> list[dict]:
    """One dict per (group, model) with the CSV_FIELDS."""
    rows = []
    for g in groups:
        models: list[str] = []
        for r in g.runs:
            models += [m for m in _model_accuracies(r) if m not in models]
        for m in models:
            acc = mean_std([_num(_model_accuracies(r).get(m)) for r in g.runs])
            err = mean_std([100 * (1 - a) for a in (_num(_model_accuracies(r).get(m)) for r in g.runs)])
            params = mean_std([_num(_row_value(r, m, "params")) for r in g.runs])[0]
            flops = mean_std([_num(_row_value(r, m, "flops_per_example")) for r in g.runs])[0]
            train_s = mean_std([_num(_row_value(r, m, "train_time_s")) for r in g.runs])[0]
            spec = mean_std([_specialisation(r, m) for r in g.runs])
            wall = mean_std([_num((r.summary or {}).get("wall_time_s")) for r in g.runs])
            rows.append({
                "config": g.label, "model": m, "runs": len(g.runs),
                "seeds": " ".join(str(r.config.get("run", {}).get("seed", "?")) for r in g.runs),
                "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
                "test_error_pct_mean": err[0], "test_error_pct_std": err[1],
                "params": params, "flops_per_example": flops, "train_time_s_mean": train_s,
                "note": _note(g.runs, m),
                "specialisation_mean": spec[0], "specialisation_std": spec[1],
                "wall_time_s_mean": wall[0], "run_dirs": " ".join(str(r.path) for r in g.runs),
            })
    return rows


def _num(v) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(std) else f"{text} +- {scale * std:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    """The printed table: accuracy in %, mean +- std over the seeds of each config."""
    headers = ["config", "model", "runs", "test acc %", "test err %", "params", "FLOPs/ex", "train s",
               "specialisation", "wall s", "note"]
    body = [[r["config"], r["model"], str(r["runs"]), _pm(r["test_accuracy_mean"], r["test_accuracy_std"], 100),
             _pm(r["test_error_pct_mean"], r["test_error_pct_std"]), _count(r["params"]),
             _count(r["flops_per_example"]), _pm(r["train_time_s_mean"], math.nan, 1, 1),
             _pm(r["specialisation_mean"], r["specialisation_std"], 1, 3), _pm(r["wall_time_s_mean"], math.nan, 1, 1),
             r["note"]]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 or i == len(widths) - 1 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    return "\n".join(line.rstrip() for line in [*lines, *(fmt.format(*b) for b in body)])


def _count(v: float) -> str:
    """A parameter or FLOP count: 57035 -> 57.0k, 1.13e6 -> 1.13M."""
    if math.isnan(v):
        return "n/a"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.{2 if v < 10 * div else 1 if v < 100 * div else 0}f}{unit}"
    return f"{v:.0f}"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return buf.getvalue()


def compare(run_dirs: list[str | Path]) -> list[dict]:
    """Find, read and group the runs under ``run_dirs``; the rows of the comparison."""
    return _compare(run_dirs)[0]


def _compare(run_dirs: list[str | Path]) -> tuple[list[dict], list[RunDir]]:
    runs = [open_run(p) for p in find_runs(run_dirs)]
    finished = [r for r in runs if r.finished]
    for r in runs:
        if not r.finished:
            print(f"moelab compare: skipping '{r.path}': not finished (no summary.json).", file=sys.stderr)
    if not finished:
        raise MoelabError(f"no finished run among {', '.join(map(str, run_dirs))}: nothing to compare.")
    return compare_rows(group_runs(finished)), finished


def default_csv_path(run_paths: list[Path]) -> Path:
    """``compare.csv`` in the folder that holds the runs (``runs/m3`` for ``runs/m3/seed-*``), not wherever
    the command happens to be run: the table stays beside what it summarises."""
    parents = [os.path.abspath(p.parent) for p in run_paths]
    common = Path(os.path.commonpath(parents))
    if common == Path(common.anchor):
        raise MoelabError(f"the runs {', '.join(map(str, run_paths))} share no folder but {common}; say where "
                          f"the CSV goes with --csv FILE.")
    here = Path.cwd()
    return common.relative_to(here) / "compare.csv" if common.is_relative_to(here) else common / "compare.csv"


def compare_main(run_dirs: list[str | Path], csv_path: str | Path | None = None, quiet: bool = False) -> int:
    """Print the comparison table and write it as CSV (default: :func:`default_csv_path`)."""
    rows, runs = _compare(run_dirs)
    csv_path = Path(csv_path) if csv_path is not None else default_csv_path([r.path for r in runs])
    atomic_write_text(csv_path, to_csv(rows))
    if not quiet:
        print(format_table(rows))
        print(f"wrote {csv_path}")
    return 0
