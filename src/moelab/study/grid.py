"""A study's grid: ``--grid KEY=V1,V2,...`` options -> the cells (one ``--set`` list each), checked up front.

Values are split on the commas outside brackets and quotes (``model.moe_blocks=[3],[2,3]`` is two
values), and each cell's config goes through exactly the checks of ``moelab run --set`` before any cell
runs: a bad key or value is one line naming it, and nothing is written.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from moelab.analysis.rundir import read_summary
from moelab.config import flatten, read_toml, renamed_key
from moelab.errors import ConfigError
from moelab.experiments import experiment_file, resolve_config, resolve_file


@dataclass(frozen=True)
class Cell:
    """One point of the grid: the grid's ``KEY=VALUE`` settings and the folder name they make."""

    sets: tuple[str, ...]  # ("model.num_experts=8", ...)

    @property
    def values(self) -> dict[str, str]:
        return dict(s.split("=", 1) for s in self.sets)

    @property
    def slug(self) -> str:
        """A folder name for the cell: ``model.num_experts=8,train.lr=0.01`` made file-system safe."""
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(self.sets)) or "base"

    def run_dir(self, out: Path, seed: int) -> Path:
        """The run folder of this cell's ``seed`` in the study folder ``out``."""
        return out / self.slug / f"seed-{seed}"


def cell_runs(out: Path, cells: list[Cell], seeds: list[int]) -> list[tuple[Cell, int, Path, dict | None]]:
    """(cell, seed, run folder, summary or None) for every run of the study in ``out``."""
    return [(c, s, c.run_dir(out, s), read_summary(c.run_dir(out, s))) for c in cells for s in seeds]


def split_values(text: str) -> list[str]:
    """``"1,2,[3,4],'a,b'"`` -> ``["1", "2", "[3,4]", "'a,b'"]``: commas inside brackets / quotes kept."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_grid(options: list[str]) -> dict[str, list[str]]:
    """``["model.num_experts=4,8"]`` -> ``{"model.num_experts": ["4", "8"]}``; malformed options refused."""
    grid: dict[str, list[str]] = {}
    for opt in options:
        key, sep, raw = opt.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid '{opt}': expected KEY=V1,V2,..., e.g. --grid model.num_experts=4,8,16.")
        values = split_values(raw)
        if any(v == "" for v in values):
            raise ConfigError(f"--grid '{opt}': an empty value; separate the values by single commas.")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; give all its values in one --grid {key}=V1,V2,...")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key}: a value is repeated ({raw}); each cell must be distinct.")
        grid[key] = values
    return grid


def make_cells(experiment: str, sets: list[str], grid: dict[str, list[str]]) -> tuple[str, list[Cell]]:
    """(run name, the cells in order): every cell's config resolved and validated before any runs."""
    keys = list(grid)
    cells = [Cell(tuple(f"{k}={v}" for k, v in zip(keys, combo))) for combo in itertools.product(*grid.values())]
    # old key names (moelab.config.RENAMED_KEYS) warn here as --grid / --set options; cells keep the user's
    # spelling (their folder names), each resolved as the new key
    _, path = experiment_file(experiment)
    known = flatten(resolve_file(read_toml(path), str(path)))
    fixed = {renamed_key(s.split("=", 1)[0].strip(), known, f"--set {s.strip()}"): s.split("=", 1)[0].strip()
             for s in sets}
    for k in keys:
        new = renamed_key(k, known, f"--grid {k}={','.join(grid[k])}")
        if new in fixed:
            raise ConfigError(f"--grid {k} is also given as --set {fixed[new]}; give it in one place.")
    name = None
    for cell in cells:
        try:
            name, _ = resolve_config(experiment, [*sets, *cell.sets])
        except ConfigError as e:
            msg = str(e)
            for k in keys:  # the error names the grid option the user wrote, not an internal --set
                msg = msg.replace(f"--set {k}", f"--grid {k}")
            if not msg.startswith("--"):
                msg = f"--grid cell {', '.join(cell.sets)}: {msg}"
            raise ConfigError(msg) from None
    if name is None:
        name, _ = resolve_config(experiment, sets)
    return name, cells
