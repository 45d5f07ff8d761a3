"""A run directory: resolved config, metrics, log, checkpoints, summary.

Layout of ``RUN_DIR``::

    config.toml      the fully resolved config (family, seed, every key)
    metrics.jsonl    one JSON object per line: per epoch / evaluation
    run.log          what was printed
    ckpt/*.safetensors  checkpoints (atomic), one per training phase
    summary.json     written last: test_accuracy, models, wall_time_s, ...
    .lock            held (flock) while a process writes the run

Only rank 0 writes (see ``moelab.parallel``); other ranks get a Run whose writes are no-ops.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from moelab.config import dumps_toml
from moelab.errors import MoelabError
from moelab.io import atomic_write_json, atomic_write_text

try:  # fcntl is POSIX-only; on other systems the lock is advisory-by-pid
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class RunFinished(Exception):
    """``--resume`` of a run that has its summary: there is nothing to do, and nothing was changed."""


class Run:
    """Everything an experiment writes goes through here."""

    def __init__(
        self,
        out_dir: str | Path,
        name: str,
        cfg: dict,
        *,
        seed: int,
        data_dir: str | None = None,
        resume: bool = False,
        is_main: bool = True,
        quiet: bool = False,
        mutable: tuple[str, ...] = (),
        device: str | torch.device = "cpu",
    ):
        from moelab.device import resolve_device

        self.dir = Path(out_dir)
        self.device = resolve_device(device)  # where the experiment computes (moelab.device)
        self.name, self.cfg, self.seed, self.data_dir = name, cfg, seed, data_dir
        self.is_main, self.quiet = is_main, quiet
        self.resumed, self.mutable = resume, tuple(mutable)
        self._t0 = time.perf_counter()
        self._lock_fd: int | None = None
        self._lock_created = False
        self._log_f = None
        self._metrics_lines = 0
        self._trim_metrics_to: int | None = None
        self.phase_times: dict[str, dict[str, float]] = {}  # phase -> its clock (train.trainer.Trainer.fit)
        self.shared_rows = None  # a study's dense rows shared across its cells (experiments.baselines.SharedRows)  # resume: drop stale metric lines before the first new one
        if not is_main:
            return
        if resume:
            self._open_for_resume()
        else:
            self._open_new()
        self._log_f = open(self.dir / "run.log", "a", encoding="utf-8")

    # ------------------------------------------------------------- lifecycle
    def _lock(self) -> None:
        """Hold the run's flock. The pid is written by :meth:`_claim` once the run is sure to go on, so a
        refused resume leaves ``.lock`` as it was (and removes it if this call created it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self.dir / ".lock"
        self._lock_created = not lock.exists()
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise MoelabError(
                    f"run directory '{self.dir}' is in use by another moelab process (pid {holder}); "
                    f"wait for it to finish or choose another --out."
                ) from None
        self._lock_fd = fd

    def _claim(self) -> None:
        """Our pid into the lock file: written first, then cut to length, so a failed write (a full disk) leaves
        the file as it was."""
        pid = str(os.getpid()).encode()
        os.pwrite(self._lock_fd, pid, 0)
        os.ftruncate(self._lock_fd, len(pid))

    def _unlock_refused(self) -> None:
        """A refused resume: release the lock and leave the directory exactly as it was."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._lock_created:
            (self.dir / ".lock").unlink(missing_ok=True)

    def _open_new(self) -> None:
        if self.dir.exists() and any(p.name != ".lock" for p in self.dir.iterdir()):
            raise MoelabError(
                f"output folder '{self.dir}' already holds files; to continue that run use "
                f"--resume {self.dir}, otherwise choose an empty or new --out."
            )
        self._lock()
        self._claim()
        atomic_write_text(self.dir / "config.toml", dumps_toml(self.full_config()))
        (self.dir / "metrics.jsonl").touch()

    def _open_for_resume(self) -> None:
        """Resume is a transaction: every check (the config, by :func:`moelab.experiments.runner.resume_config`
        before this; every checkpoint readable) runs before anything in the directory changes; a refusal leaves
        every file byte-identical. Metric lines written after
        the newest checkpoint are dropped only when the resumed run writes its first new line."""
        cfg_path = self.dir / "config.toml"
        if not cfg_path.is_file():
            raise MoelabError(f"cannot resume: '{self.dir}' is not a moelab run directory (no config.toml).")
        self._lock()
        if (self.dir / "summary.json").is_file():
            self._unlock_refused()
            raise RunFinished(self.dir)
        try:
            keep = self._check_resumable()
        except BaseException:
            self._unlock_refused()
            raise
        self._claim()
        for tmp in self.dir.rglob(".*.tmp"):  # temp files of writes a killed process never finished
            tmp.unlink(missing_ok=True)
        if self.mutable:  # resumable keys the resume changed (e.g. log_every): the run goes on with them
            atomic_write_text(cfg_path, dumps_toml(self.full_config()))
        self._metrics_lines, self._trim_metrics_to = keep, keep

    def _check_resumable(self) -> int:
        """Refuse (MoelabError) unless every checkpoint loads; -> the number of metric lines the checkpoints
        account for. The config was checked before (:func:`moelab.experiments.runner.resume_config`: the run's
        own config.toml, old key names read as the new ones, only resumable keys changed)."""
        from moelab.train.checkpoint import load_checkpoint

        metas = []
        for path in sorted((self.dir / "ckpt").glob("*.safetensors")):
            try:
                metas.append(load_checkpoint(path)[1])
            except MoelabError as e:
                raise MoelabError(f"cannot resume '{self.dir}': {e} Nothing was changed; remove that file to "
                                  f"redo its phase from the start, or start a new run.") from None
        return max((m.get("metrics_lines", 0) for m in metas), default=0)

    def _checkpoint_metas(self) -> list[dict]:
        from moelab.train.checkpoint import read_meta

        return [read_meta(p) for p in sorted((self.dir / "ckpt").glob("*.safetensors"))]

    def full_config(self) -> dict:
        return {**self.cfg, "run": {"name": self.name, "seed": self.seed}}

    def close(self) -> None:
        if self._log_f is not None:
            self._log_f.close()
            self._log_f = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------- writing
    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if not self.quiet:
            print(msg, flush=True)
        if self._log_f is not None:
            self._log_f.write(msg + "\n")
            self._log_f.flush()

    def metric(self, **row: Any) -> None:
        """Append one line to metrics.jsonl (flushed and fsynced: a kill never leaves half a line)."""
        if not self.is_main:
            return
        self._trim_metrics()
        line = json.dumps(row, sort_keys=True, default=_jsonable) + "\n"
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._metrics_lines += 1

    def _trim_metrics(self) -> None:
        """On resume: cut metrics.jsonl back to the lines the newest checkpoint accounts for (the rest are
        recomputed), just before the first new line: a resume that fails earlier changes nothing."""
        if self._trim_metrics_to is None:
            return
        mpath = self.dir / "metrics.jsonl"
        lines = mpath.read_text(encoding="utf-8").splitlines(keepends=True) if mpath.exists() else []
        if len(lines) != self._trim_metrics_to:
            atomic_write_text(mpath, "".join(lines[:self._trim_metrics_to]))
        self._trim_metrics_to = None

    @property
    def metrics_lines(self) -> int:
        return self._metrics_lines

    def train_time(self, phase: str, clock: str = "elapsed_s") -> float:
        """Seconds ``phase`` trained, summed over every process that worked on it (resumes included)."""
        return round(self.phase_times[phase][clock], 1)

    def checkpoint_path(self, phase: str) -> Path:
        return self.dir / "ckpt" / f"{phase}.safetensors"

    def write_summary(self, summary: dict) -> dict:
        summary = {**summary, "wall_time_s": round(time.perf_counter() - self._t0, 3), "name": self.name,
                   "family": self.cfg.get("family"), "seed": self.seed, "device": str(self.device)}
        if self.resumed:
            summary["resumed"] = True
        if self.is_main:
            self._trim_metrics()
            atomic_write_json(self.dir / "summary.json", _jsonable(summary))
        return summary

    def progress(self, desc: str, total: int, unit: str = "img", every: float = 30.0):
        """A :class:`moelab.train.progress.Progress` for ``total`` items: a tqdm bar on a TTY, a plain
        line with rate and ETA in run.log (and stdout) every ``every`` seconds otherwise."""
        from moelab.train.progress import Progress

        log = self.log if self.is_main else None  # with --quiet: run.log only, no bar
        return Progress(desc, total, log, unit=unit, every=every, tty=False if self.quiet else None)

    def generator(self, *salt: int | str) -> torch.Generator:
        """A torch.Generator seeded from the run seed and ``salt`` (e.g. phase name, epoch): data order
        depends only on these, so a resumed run sees the same batches."""
        return seeded_generator(self.seed, *salt)


def seeded_generator(seed: int, *salt: int | str) -> torch.Generator:
    """A generator whose seed is a stable hash of ``(seed, *salt)`` (same in every process)."""
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _jsonable(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)
