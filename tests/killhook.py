"""Test-only: a run that SIGKILLs itself at an exact moment, for the kill / resume tests.

Importing this module adds :func:`kill_at` to :data:`moelab.train.callbacks.CALLBACKS`; it acts when
``$MOELAB_TEST_KILL_AT`` is ``"phase:epoch:point"`` (``epoch`` from 1) and is a no-op otherwise. Points:
``mid_epoch`` (after the epoch's first optimiser step, or at the end of its training if it has none),
``evaluate`` (as the validation pass starts), ``checkpoint_write`` (the temp file half written, not yet
renamed; the test-prediction files count as phase ``eval-<model>``, epoch 0).

A subprocess runs the CLI through it: ``python -c "import killhook; ..."`` with ``tests/`` on its path
(:data:`CLI`).
"""

import os
import signal
from pathlib import Path

from moelab.train.callbacks import CALLBACKS

KILL_ENV = "MOELAB_TEST_KILL_AT"
TESTS_DIR = str(Path(__file__).parent)
# `python -m moelab ARGS` with this hook installed: [sys.executable, *CLI, *ARGS], with env(...)
CLI = ["-c", "import sys, killhook; from moelab.cli import main; sys.exit(main(sys.argv[1:]))"]


def env(base: dict) -> dict:
    """``base`` with ``tests/`` on PYTHONPATH, so a subprocess can import this module."""
    path = base.get("PYTHONPATH")
    return {**base, "PYTHONPATH": TESTS_DIR + (os.pathsep + path if path else "")}


def kill_at(point: str, phase: str | None = None, epoch: int | None = None, tmp=None, meta=None, **_) -> None:
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    if point == "checkpoint_write":
        phase, epoch = meta.get("phase", f"eval-{meta.get('model')}"), meta.get("epoch", -1)
    at = {"step": "mid_epoch", "train_end": "mid_epoch"}.get(point, point)
    if want != f"{phase}:{epoch + 1}:{at}":
        return
    if tmp is not None:
        os.truncate(tmp, tmp.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


CALLBACKS.append(kill_at)
