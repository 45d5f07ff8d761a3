"""Run an experiment: resolve its config, open the run directory, call the family, write the summary."""

from __future__ import annotations

import time
from pathlib import Path

from moelab.config import apply_overrides, read_toml
from moelab.errors import MoelabError
from moelab.experiments import _resolve_file, get_family, resolve_config
from moelab.train.run import Run


def default_out_dir(name: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-s{seed}-{stamp}"


def run_experiment(
    name_or_path: str | None,
    overrides: list[str] | None = None,
    *,
    out: str | Path | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    resume: str | Path | None = None,
    quiet: bool = False,
    is_main: bool = True,
) -> dict:
    """Run one experiment end to end; returns the summary (also written to ``RUN_DIR/summary.json``)."""
    if resume is not None:
        resume = Path(resume)
        out = resume
    if resume is not None and name_or_path is None:  # take the experiment from the run directory itself
        saved = _saved_config(resume)
        run_meta = saved.pop("run")
        name, seed = run_meta["name"], run_meta["seed"]
        cfg = apply_overrides(_resolve_file(saved, str(resume / "config.toml")), overrides or [])
    elif name_or_path is None:
        raise MoelabError("moelab run: name a built-in experiment or a .toml config (see `moelab list`).")
    else:
        name, cfg = resolve_config(name_or_path, overrides)
    out = Path(out) if out is not None else default_out_dir(name, seed)
    fam = get_family(cfg["family"])
    with Run(out, name, cfg, seed=seed, data_dir=data_dir, resume=resume is not None, is_main=is_main,
             quiet=quiet) as run:
        run.log(f"moelab run {name} (family {fam.name}, seed {seed}) -> {out}")
        summary = fam.run(cfg, run)
        summary = run.write_summary(summary)
        run.log(format_summary(summary))
        run.log(f"run directory: {out}")
    return summary


def _saved_config(run_dir: Path) -> dict:
    path = run_dir / "config.toml"
    if not path.is_file():
        raise MoelabError(f"cannot resume: '{run_dir}' is not a moelab run directory (no config.toml).")
    cfg = read_toml(path)
    if "run" not in cfg or "name" not in cfg["run"]:
        raise MoelabError(f"cannot resume: '{path}' has no [run] name; was it written by moelab?")
    return cfg


def format_summary(summary: dict) -> str:
    """A short result table: one row per trained model."""
    models = summary.get("models") or {"model": {"test_accuracy": summary.get("test_accuracy")}}
    width = max(len("model"), *(len(m) for m in models))
    lines = [f"{'model':<{width}}  test acc  test err", f"{'-' * width}  --------  --------"]
    for m, r in models.items():
        acc = r.get("test_accuracy")
        if acc is None:
            lines.append(f"{m:<{width}}       n/a       n/a")
        else:
            lines.append(f"{m:<{width}}  {100 * acc:7.2f}%  {100 * (1 - acc):7.2f}%")
    lines.append(f"wall time {summary.get('wall_time_s', float('nan')):.1f} s")
    return "\n".join(lines)
