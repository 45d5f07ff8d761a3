"""``moelab study EXPERIMENT --grid KEY=V1,V2 ... --seeds N --out DIR``: one ordinary run per cell and seed.

Layout of ``DIR``::

    study.json             what was asked (experiment, --set, grid, seeds): a re-run must ask the same
    <cell>/seed-<K>/       one run directory per cell and seed (``moelab run``'s, with its dense rows)
    shared-rows/           dense rows trained once and reused by the cells that need the same network
    study.csv, study.md, study.html   the table and the plots (``moelab.study.report``)

Started again with the same ``--out`` a study keeps its finished runs, resumes the one that was cut,
and runs the rest; the table and plots are rewritten from every finished run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from moelab.errors import MoelabError
from moelab.experiments.baselines import SharedRows
from moelab.experiments.runner import run_experiment
from moelab.io import atomic_write_json
from moelab.study.grid import make_cells, parse_grid


def default_study_dir(name: str) -> Path:
    return Path("runs") / f"{name}-study-{time.strftime('%Y%m%d-%H%M%S')}"


def run_study(experiment: str | None, grid_options: list[str], *, sets: list[str] | None = None,
              out: str | Path | None = None, seeds: int = 3, seed: int = 0, data_dir: str | None = None,
              device: str = "auto", quiet: bool = False, jobs: int = 1) -> Path:
    """Run every cell x seed (skipping finished runs, resuming a cut one), then write the table and plots.
    Every cell's config is checked before the first run starts. ``jobs`` > 1 runs that many cells at once,
    each in its own process (a CPU with spare cores: each run uses its config's ``compute.threads``); a dense row two
    cells share is still trained once (:meth:`SharedRows.claim`). Returns the study folder."""
    from moelab.study.report import write_study_report

    if experiment is None:
        raise MoelabError("moelab study: name a built-in experiment or a .toml config (see `moelab list`).")
    if seeds < 1:
        raise MoelabError(f"--seeds N expects N >= 1 (seeds per cell), got {seeds}.")
    if jobs < 1:
        raise MoelabError(f"--jobs N expects N >= 1 (cells run at once), got {jobs}.")
    if not grid_options:
        raise MoelabError("moelab study: give at least one --grid KEY=V1,V2,... (e.g. --grid model.num_experts=4,8).")
    sets = list(sets or [])
    grid = parse_grid(grid_options)
    name, cells = make_cells(experiment, sets, grid)
    out = Path(out) if out is not None else default_study_dir(name)
    spec = {"experiment": experiment, "sets": sets, "grid": grid, "seeds": list(range(seed, seed + seeds))}
    _claim(out, spec)
    shared = SharedRows(out / "shared-rows")
    todo, started, done_s = [(cell, s) for cell in cells for s in spec["seeds"]], time.perf_counter(), []
    pending = []
    for i, (cell, s) in enumerate(todo, 1):
        run_dir = cell.run_dir(out, s)
        head = f"[study {i}/{len(todo)}] {', '.join(cell.sets)} seed {s}"
        if (run_dir / "summary.json").is_file():
            _say(quiet, f"{head}: finished earlier ({run_dir})")
            continue
        resume = run_dir if (run_dir / "config.toml").is_file() else None
        pending.append((head, resume, dict(experiment=experiment, sets=[*sets, *cell.sets] if resume is None else [],
                                           out=run_dir, data_dir=data_dir, seed=s, resume=resume, device=device,
                                           shared=shared.dir)))

    def finished(head: str, seconds: float) -> None:
        done_s.append(seconds)
        left = len(pending) - len(done_s)
        eta = left * sum(done_s) / len(done_s) / min(jobs, max(left, 1))
        _say(quiet, f"{head}: done in {seconds:.0f} s; {left} left, ETA {_hms(eta)} "
                    f"(elapsed {_hms(time.perf_counter() - started)})")

    if jobs == 1 or len(pending) <= 1:
        for head, resume, job in pending:
            _say(quiet, f"{head}: {'resuming' if resume else 'running'} -> {job['out']}")
            finished(head, _run_cell(job))
    else:
        _run_parallel(pending, jobs, quiet, finished)
    paths = write_study_report(out, cells, spec)
    _say(quiet, "wrote " + ", ".join(str(p) for p in paths))
    return out


def _run_cell(job: dict) -> float:
    """One cell x seed (in this process or a worker's) -> its seconds."""
    t0 = time.perf_counter()
    run_experiment(job["experiment"], job["sets"], out=job["out"], data_dir=job["data_dir"], seed=job["seed"],
                   resume=job["resume"], quiet=True, device=job["device"], shared_rows=SharedRows(job["shared"]))
    return time.perf_counter() - t0


def _run_parallel(pending: list, jobs: int, quiet: bool, finished) -> None:
    """``pending`` cells on ``jobs`` worker processes (spawned: no state shared but the files); the first
    error stops the rest (the finished and the cut runs stay, to be resumed by running the study again)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for head, resume, job in pending:
            futures[pool.submit(_run_cell, job)] = head
            _say(quiet, f"{head}: {'resuming' if resume else 'queued'} -> {job['out']}")
        left = set(futures)
        try:
            while left:
                done, left = wait(left, return_when=FIRST_COMPLETED)  # a line per cell as it ends
                for f in done:
                    finished(futures[f], f.result())  # re-raises a worker's error here
        except BaseException:
            for f in left:
                f.cancel()
            raise


def _claim(out: Path, spec: dict) -> None:
    """Write ``study.json``, or check that the study already in ``out`` asked the same."""
    path = out / "study.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MoelabError(f"'{path}' is not readable ({e}); choose another --out.") from None
        if old != spec:
            diff = ", ".join(k for k in spec if old.get(k) != spec[k])
            raise MoelabError(f"'{out}' holds a study with another {diff} ({path}); re-run it with the same "
                              f"options to continue it, or choose another --out.")
        return
    if out.exists() and any(out.iterdir()):
        raise MoelabError(f"output folder '{out}' already holds files and no study.json; choose an empty or new --out.")
    atomic_write_json(path, spec)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
