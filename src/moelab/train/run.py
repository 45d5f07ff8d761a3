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
import tomllib
from pathlib import Path
from typing import Any

import torch

from moelab.config import dumps_toml, flatten, read_toml
from moelab.errors import MoelabError
from moelab.io import atomic_write_json, atomic_write_text

try:  # fcntl is POSIX-only; on other systems the lock is advisory-by-pid
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


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
        self._log_f = None
        self._metrics_lines = 0
        if not is_main:
            return
        if resume:
            self._open_for_resume()
        else:
            self._open_new()
        self._log_f = open(self.dir / "run.log", "a", encoding="utf-8")

    # ------------------------------------------------------------- lifecycle
    def _lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _open_new(self) -> None:
        if self.dir.exists() and any(p.name != ".lock" for p in self.dir.iterdir()):
            raise MoelabError(
                f"output folder '{self.dir}' already holds files; to continue that run use "
                f"--resume {self.dir}, otherwise choose an empty or new --out."
            )
        self._lock()
        atomic_write_text(self.dir / "config.toml", dumps_toml(self.full_config()))
        (self.dir / "metrics.jsonl").touch()

    def _open_for_resume(self) -> None:
        cfg_path = self.dir / "config.toml"
        if not cfg_path.is_file():
            raise MoelabError(f"cannot resume: '{self.dir}' is not a moelab run directory (no config.toml).")
        self._lock()
        for tmp in self.dir.rglob(".*.tmp"):  # temp files of writes a killed process never finished
            tmp.unlink(missing_ok=True)
        saved = read_toml(cfg_path)
        want = tomllib.loads(dumps_toml(self.full_config()))  # as written to config.toml (switches as booleans)
        diff = sorted(
            k for k in set(flatten(saved)) | set(flatten(want)) if flatten(saved).get(k) != flatten(want).get(k)
        )
        diff = [k for k in diff if k not in ("description", "run.data_dir", *self.mutable)]
        if diff:
            shown = "; ".join(f"{k}: run has {flatten(saved).get(k)!r}, asked {flatten(want).get(k)!r}" for k in diff[:8])
            self.close()
            raise MoelabError(
                f"cannot resume '{self.dir}': its checkpoint was made with another config ({shown})."
            )
        if self.mutable:  # resumable keys the resume changed (e.g. log_every): the run goes on with them
            atomic_write_text(cfg_path, dumps_toml(self.full_config()))
        # Drop metric lines written after the newest checkpoint: they are recomputed.
        keep = max((m.get("metrics_lines", 0) for m in self._checkpoint_metas()), default=0)
        mpath = self.dir / "metrics.jsonl"
        lines = mpath.read_text(encoding="utf-8").splitlines(keepends=True) if mpath.exists() else []
        atomic_write_text(mpath, "".join(lines[:keep]))
        self._metrics_lines = keep
        (self.dir / "summary.json").unlink(missing_ok=True)

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
        line = json.dumps(row, sort_keys=True, default=_jsonable) + "\n"
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._metrics_lines += 1

    @property
    def metrics_lines(self) -> int:
        return self._metrics_lines

    def checkpoint_path(self, phase: str) -> Path:
        return self.dir / "ckpt" / f"{phase}.safetensors"

    def write_summary(self, summary: dict) -> dict:
        summary = {**summary, "wall_time_s": round(time.perf_counter() - self._t0, 3), "name": self.name,
                   "family": self.cfg.get("family"), "seed": self.seed, "device": str(self.device)}
        if self.resumed:
            summary["resumed"] = True
        if self.is_main:
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
