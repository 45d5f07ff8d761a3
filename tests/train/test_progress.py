"""Progress lines: rate and ETA from a fake clock, one line per ``every`` seconds, nothing on a short phase."""

from __future__ import annotations

from moelab.train.progress import Progress, format_eta
from moelab.train.run import Run


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_every_interval_with_rate_and_eta():
    clock, lines = Clock(), []
    with Progress("[moe] epoch 1", 1000, lines.append, every=30.0, tty=False, clock=clock) as p:
        clock.t += 10
        p.update(100)  # 10 s in: not yet due
        assert lines == []
        clock.t += 30
        p.update(300)  # 40 s, 400 done: 10 img/s, 600 left -> 60 s
        clock.t += 5
        p.update(100)  # 5 s after the last line: not due
    assert lines == ["[moe] epoch 1: 400/1000 img (40%), 10.0 img/s, elapsed 0:40, ETA 1:00"]
    assert p.done == 500


def test_eta_format_and_no_log():
    assert format_eta(59.6) == "1:00" and format_eta(3725) == "1:02:05" and format_eta(-3) == "0:00"
    clock = Clock()
    p = Progress("x", 10, None, tty=False, clock=clock)
    clock.t += 100
    p.update(10)  # no sink: silent, still counts
    assert p.done == 10 and p.line().startswith("x: 10/10 img (100%), 0.1 img/s")


def test_run_progress_writes_run_log(tmp_path):
    run = Run(tmp_path / "r", "t", {"family": "f"}, seed=0, quiet=True)
    with run:
        with run.progress("[p] epoch 1", 10, every=0.0) as p:
            p.update(5)
    assert "[p] epoch 1: 5/10 img (50%)" in (tmp_path / "r" / "run.log").read_text()
