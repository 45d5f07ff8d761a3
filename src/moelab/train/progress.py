"""Progress of a long phase: a tqdm bar on a TTY, a plain line in ``run.log`` every ``every`` seconds.

Both show items done of the total, items per second and the ETA; the plain lines are what a run that
prints to a file (CI, ``nohup``, a cluster job) has instead of a bar, so a 20-minute epoch is not
silent. Nothing is printed for a phase that ends before its first line is due.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "format_eta"]


def format_eta(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``with Progress(desc, total, log) as p: ... p.update(n)``.

    ``log(msg)`` receives the plain lines (``Run.log``); ``tty=None`` asks ``sys.stderr``; ``clock`` is
    the time source (a test passes a fake one).
    """

    def __init__(self, desc: str, total: int, log: Callable[[str], None] | None, *, unit: str = "img",
                 every: float = 30.0, tty: bool | None = None, clock: Callable[[], float] = time.perf_counter):
        self.desc, self.total, self.log, self.unit, self.every = desc, max(int(total), 0), log, unit, every
        self.clock, self.done = clock, 0
        self._start = self._last = clock()
        self._bar = None
        if log is not None and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, unit_scale=True, leave=False,
                             dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if self.log is not None and now - self._last >= self.every:
            self._last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = format_eta((self.total - self.done) / rate) if rate > 0 else "?"
        pct = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.1f} {self.unit}/s, "
                f"elapsed {format_eta(elapsed)}, ETA {eta}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
