"""Run an experiment: resolve its config, open the run directory, call the family, write the summary."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from moelab.analysis.rundir import read_summary
from moelab.config import apply_overrides, flatten, read_toml
from moelab.errors import ConfigError, DataError, MoelabError
from moelab.experiments import get_family, resolve_config, resolve_file, validate_config
from moelab.train.run import Run, RunFinished


def default_out_dir(name: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-s{seed}-{stamp}"


def run_experiment(
    name_or_path: str | None,
    overrides: list[str] | None = None,
    *,
    out: str | Path | None = None,
    data_dir: str | None = None,
    seed: int | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
    is_main: bool = True,
    device: str = "cpu",
    shared_rows=None,
) -> dict:
    """Run one experiment end to end; returns the summary (also written to ``RUN_DIR/summary.json``).

    ``resume``: continue the run in that directory with its own ``config.toml``; ``overrides`` may then
    change only the family's resumable keys. ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``
    (:func:`moelab.device.resolve_device`; a resumed run may change it). ``shared_rows``: a study's
    :class:`moelab.experiments.baselines.SharedRows`. Every value is checked before the run directory is made; a
    run refused once its data set is known (a size that does not fit it) leaves no run directory."""
    if resume is not None:
        out = Path(resume)
        name, seed, cfg, mutable = resume_config(out, name_or_path, overrides or [], seed)
    elif name_or_path is None:
        raise MoelabError("moelab run: name a built-in experiment or a .toml config (see `moelab list`).")
    else:
        name, cfg = resolve_config(name_or_path, overrides)
        seed, mutable = 0 if seed is None else seed, ()
    out = Path(out) if out is not None else default_out_dir(name, seed)
    fam = get_family(cfg["family"])
    existed = out.exists()
    try:
        with Run(out, name, cfg, seed=seed, data_dir=data_dir, resume=resume is not None, is_main=is_main,
                 quiet=quiet, mutable=mutable, device=device) as run:
            run.shared_rows = shared_rows  # a study's dense rows, reused across its cells (experiments.baselines)
            run.log(f"moelab run {name} (family {fam.name}, seed {seed}, device {run.device}) -> {out}")
            summary = fam.run(cfg, run)
            summary = run.write_summary(summary)
            run.log(format_summary(summary))
            run.log(f"run directory: {out}")
    except RunFinished:  # resuming a finished run changes nothing
        if is_main and not quiet:
            print(f"moelab: '{out}' has finished (summary.json is there); nothing to resume, nothing changed. "
                  f"`moelab report {out}` shows its results.")
        return read_summary(out)
    except (ConfigError, DataError, OSError):
        if resume is None and is_main:  # refused before training (a value, the data, the disk): leave no run
            with contextlib.suppress(OSError):
                _remove_unstarted(out, existed)
        raise
    return summary


def resume_config(run_dir: Path, name_or_path: str | None, overrides: list[str], seed: int | None):
    """(name, seed, config, changed keys) to continue ``run_dir``: its saved config, with ``overrides``
    allowed only on the family's resumable keys (others refused by name)."""
    saved = _saved_config(run_dir)
    run_meta = saved.pop("run")
    name, run_seed = run_meta["name"], int(run_meta.get("seed", 0))
    where = str(run_dir / "config.toml")
    if name_or_path is not None:
        asked = Path(name_or_path).stem if name_or_path.endswith(".toml") else name_or_path
        if asked != name:
            raise MoelabError(f"cannot resume '{run_dir}': it is a run of '{name}', not '{asked}'.")
    if seed is not None and seed != run_seed:
        raise MoelabError(f"cannot resume '{run_dir}': it is a run with seed {run_seed}, not --seed {seed}.")
    base = resolve_file(saved, where)
    cfg = apply_overrides(base, overrides)
    fam = get_family(cfg["family"])
    was, now = flatten(base), flatten(cfg)
    changed = tuple(k for k in now if now[k] != was.get(k))
    refused = [k for k in changed if k not in fam.resumable]
    if refused:
        shown = "; ".join(f"{k}: run has {was.get(k)!r}, asked {now[k]!r}" for k in refused[:8])
        raise MoelabError(
            f"cannot resume '{run_dir}': {', '.join(refused)} cannot change on resume ({shown}); the run "
            f"continues with its own config.toml. Keys a resumed run may change: "
            f"{', '.join(fam.resumable) or 'none'}. To train with other values, start a new run.")
    return name, run_seed, validate_config(cfg, where), changed


def _remove_unstarted(out: Path, existed: bool) -> None:
    """A run refused before training (no checkpoint, no metrics): remove what it wrote."""
    if any(out.glob("ckpt/*.safetensors")) or (out / "metrics.jsonl").is_file() and \
            (out / "metrics.jsonl").stat().st_size > 0:
        return
    for f in ("config.toml", "metrics.jsonl", "run.log", ".lock"):
        (out / f).unlink(missing_ok=True)
    for d in (out / "ckpt", out / "eval"):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


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
    cost = any("params" in r for r in models.values())
    head = f"{'model':<{width}}  test acc  test err" + ("      params  FLOPs/ex  train s" if cost else "")
    lines = [head, f"{'-' * width}  --------  --------" + ("  ----------  --------  -------" if cost else "")]
    for m, r in models.items():
        acc = r.get("test_accuracy")
        line = (f"{m:<{width}}       n/a       n/a" if acc is None else
                f"{m:<{width}}  {100 * acc:7.2f}%  {100 * (1 - acc):7.2f}%")
        if cost:
            p, f, t = r.get("params"), r.get("flops_per_example"), r.get("train_time_s")
            line += (f"  {p:>10,}" if isinstance(p, int) else f"  {'n/a':>10}") + \
                (f"  {f:>8.0f}" if isinstance(f, int | float) else f"  {'n/a':>8}") + \
                (f"  {t:>7.1f}" if isinstance(t, int | float) else f"  {'n/a':>7}")
            if r.get("same_model_as"):
                line += f"  (= {r['same_model_as']}, trained once)"
            elif str(r.get("note", "")).startswith("smaller network"):
                line += "  (smaller network)"
        lines.append(line)
    lines.append(f"wall time {summary.get('wall_time_s', float('nan')):.1f} s")
    return "\n".join(lines)
