"""Reading a run directory robustly: every problem is a MoelabError that names the file.

A run directory (see ``moelab.train.run``) holds ``config.toml``, ``metrics.jsonl``,
``summary.json`` (once finished) and ``eval/<model>.safetensors`` (test predictions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelab.config import read_toml
from moelab.errors import MoelabError
from moelab.train.checkpoint import load_checkpoint

SKIP_DIRS = {"ckpt", "eval", "report_files"}


@dataclass
class RunDir:
    """What analysis needs from one run directory."""

    path: Path
    config: dict
    summary: dict | None  # None while the run has not finished
    metrics: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.config.get("run", {}).get("name", self.path.name))

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def eval_models(self) -> list[str]:
        return eval_models(self.path)

    def load_eval(self, model: str) -> tuple[dict[str, torch.Tensor], dict]:
        return load_eval(self.path, model)


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.toml").is_file()


def open_run(path: str | Path) -> RunDir:
    """Read ``path`` as a run directory; a clear MoelabError if it is not one or a file is damaged."""
    path = Path(path)
    if not path.is_dir():
        raise MoelabError(f"'{path}' is not a folder; give a run directory written by `moelab run`.")
    if not is_run_dir(path):
        raise MoelabError(
            f"'{path}' is not a moelab run directory (no config.toml); give the folder `moelab run` "
            f"wrote (its --out)."
        )
    return RunDir(path, read_toml(path / "config.toml"), read_summary(path), read_metrics(path))


def read_summary(path: str | Path) -> dict | None:
    """``summary.json`` as a dict, or None if the run has not finished."""
    file = Path(path) / "summary.json"
    if not file.is_file():
        return None
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MoelabError(f"{file}, line {e.lineno}: not valid JSON ({e.msg}); the file is damaged.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoelabError(f"{file}: cannot be read: {e}.") from None
    if not isinstance(obj, dict):
        raise MoelabError(f"{file}: expected a JSON object, found {type(obj).__name__}.")
    return obj


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` ([] if absent); a cut or edited line names its line number."""
    file = Path(path) / "metrics.jsonl"
    if not file.is_file():
        return []
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoelabError(f"{file}: cannot be read: {e}.") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoelabError(
                f"{file}, line {i}: not a complete JSON object ({e.msg}, column {e.colno}); the line was cut "
                f"or edited. Delete that line (a resumed run rewrites it) or re-run the experiment."
            ) from None
        if not isinstance(row, dict):
            raise MoelabError(f"{file}, line {i}: expected a JSON object, found {type(row).__name__}.")
        rows.append(row)
    return rows


def eval_models(path: str | Path) -> list[str]:
    """Names of the models with saved test predictions (``eval/<model>.safetensors``)."""
    folder = Path(path) / "eval"
    return sorted(p.stem for p in folder.glob("*.safetensors") if not p.name.startswith("."))


def load_eval(path: str | Path, model: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Test predictions of ``model``: ``labels`` (N,), ``probs`` (N, C), optional ``gates`` (N, E) and
    ``expert_probs`` (E, N, C); shapes are checked."""
    file = Path(path) / "eval" / f"{model}.safetensors"
    tensors, meta = load_checkpoint(file)
    for key in ("labels", "probs"):
        if key not in tensors:
            raise MoelabError(f"{file}: has no '{key}' tensor; was it written by moelab's save_eval?")
    labels, probs = tensors["labels"], tensors["probs"]
    n = labels.shape[0] if labels.dim() == 1 else -1
    if labels.dim() != 1 or probs.dim() != 2 or probs.shape[0] != n:
        raise MoelabError(
            f"{file}: expected labels (N,) and probs (N, C), found {tuple(labels.shape)} and {tuple(probs.shape)}."
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        raise MoelabError(f"{file}: labels lie outside 0..{probs.shape[1] - 1} (the columns of probs).")
    gates = tensors.get("gates")
    if gates is not None and (gates.dim() != 2 or gates.shape[0] != n):
        raise MoelabError(f"{file}: expected gates (N={n}, E), found {tuple(gates.shape)}.")
    ep = tensors.get("expert_probs")
    if ep is not None:
        want = (gates.shape[1] if gates is not None else ep.shape[0], n, probs.shape[1])
        if tuple(ep.shape) != want:
            raise MoelabError(f"{file}: expected expert_probs (E, N, C) = {want}, found {tuple(ep.shape)}.")
    return tensors, meta


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths``; a folder that is not a run is searched for runs below it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise MoelabError(f"'{p}' is not a folder; give run directories or a folder holding them.")
        below = _runs_below(p)
        if not below:
            raise MoelabError(
                f"'{p}' is not a moelab run directory (no config.toml) and holds none; give the folders "
                f"`moelab run` wrote."
            )
        found.extend(r for r in below if r not in found)
    return found


def _runs_below(folder: Path, depth: int = 4) -> list[Path]:
    if is_run_dir(folder):
        return [folder]
    if depth == 0:
        return []
    runs: list[Path] = []
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and sub.name not in SKIP_DIRS and not sub.name.startswith("."):
            runs.extend(_runs_below(sub, depth - 1))
    return runs
