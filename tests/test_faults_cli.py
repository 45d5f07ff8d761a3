"""What the user's disk and data can do to a command, through the real CLI: a read-only place, a path
through a file, a folder where a file should go, a full disk (at start, on resume, mid-run), a missing
data set. Each is one line on stderr naming the path and what to do, exit status 2, no traceback, and
nothing half-written left behind.

Tests run as root here, where chmod-based read-only folders are still writable: read-only and full
disks are simulated by making the system call fail as the kernel would (the errno, the file name).
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors import SafetensorError

from moelab.cli import main
from moelab.train.checkpoint import load_checkpoint

QUICK = ["--set", "train.epochs=2", "--set", "data.train_limit=384", "--set", "compute.threads=1", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished digits-jacobs run; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        assert main(["run", "digits-jacobs", "--out", str(out), *QUICK]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *names) -> str:
    """The captured stderr: exactly one line, moelab's error prefix, naming every one of ``names``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("moelab: error: "), err
    for name in names:
        assert str(name) in err, err
    return err


def _fail_on(errno_code: int, filename_of=lambda args: None):
    def fail(*args, **kwargs):
        raise OSError(errno_code, os.strerror(errno_code), *(() if filename_of(args) is None else (filename_of(args),)))
    return fail


def _read_only_lock(monkeypatch, code=errno.EROFS):
    """``open(RUN/.lock)`` fails as on a read-only file system (the first write of run and resume)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def _read_only_temp_files(monkeypatch, code=errno.EROFS):
    """Creating a temp file (every atomic write starts so) fails as on a read-only file system."""
    def fake_mkstemp(suffix=None, prefix=None, dir=None, text=False):
        raise OSError(code, os.strerror(code), os.path.join(dir or ".", f"{prefix}abc123{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", fake_mkstemp)


def _disk_full_writes(monkeypatch):
    """Writing file contents fails as on a full disk: ENOSPC from write(), which names no file."""
    monkeypatch.setattr(pathlib.Path, "write_bytes", _fail_on(errno.ENOSPC))


# ------------------------------------------------------------------ run


def test_run_out_under_a_regular_file(tmp_path):
    """Through ``python -m moelab``: NotADirectoryError becomes one line naming the path."""
    (tmp_path / "afile").write_text("x")
    env = {**os.environ, "MOELAB_CACHE_DIR": str(tmp_path / "c")}
    p = subprocess.run([sys.executable, "-m", "moelab", "run", "digits-jacobs", "--out", str(tmp_path / "afile" / "r")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"moelab: error: {tmp_path / 'afile'}") and "Not a directory" in p.stderr
    assert "choose another path" in p.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_run_out_on_a_read_only_place(tmp_path, monkeypatch, capsys):
    _read_only_lock(monkeypatch)
    out = tmp_path / "r"
    assert main(["run", "digits-jacobs", "--out", str(out), *QUICK]) == 2
    err = one_line_error(capsys, out / ".lock", "Read-only file system", "choose a writable place")
    assert "--out" in err
    assert not out.exists()  # the refused run leaves no folder (the runner removes what it made)


def test_run_out_without_permission(tmp_path, monkeypatch, capsys):
    _read_only_lock(monkeypatch, errno.EACCES)
    assert main(["run", "digits-jacobs", "--out", str(tmp_path / "r"), *QUICK]) == 2
    one_line_error(capsys, tmp_path / "r" / ".lock", "Permission denied", "choose a folder you can write to")


def test_disk_full_at_start(tmp_path, monkeypatch, capsys):
    _disk_full_writes(monkeypatch)
    out = tmp_path / "r"
    assert main(["run", "digits-jacobs", "--out", str(out), *QUICK]) == 2
    one_line_error(capsys, out / "config.toml", "No space left on device", "free some space, then run the same "
                   "command again")
    assert not out.exists()


def test_disk_full_mid_run_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as SafetensorError: one line naming the checkpoint; the previous
    checkpoint is intact, no temp file is left, and --resume finishes the run once there is space."""
    import moelab.train.checkpoint as checkpoint

    real_save, calls = checkpoint.save_file, []

    def save_then_fill(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                                  f'path "{Path(filename).parent / ".tmpXyZ"}"')
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_then_fill)
    out = tmp_path / "r"
    assert main(["run", "digits-jacobs", "--out", str(out), *QUICK]) == 2
    err = one_line_error(capsys, out / "ckpt" / "moe.safetensors", "No space left on device",
                         f"continue the run with `moelab run --resume {out}`")
    assert "SafetensorError" not in err and ".tmp" not in err
    assert not list(out.rglob("*.tmp"))
    _, meta = load_checkpoint(out / "ckpt" / "moe.safetensors")  # epoch 1's, intact
    assert meta["epoch"] == 0
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert (out / "summary.json").is_file()


# ------------------------------------------------------------------ resume


def test_resume_of_a_read_only_run(run_copy, monkeypatch, capsys):
    (run_copy / "summary.json").unlink()  # unfinished: resume has work to do
    before = _snapshot(run_copy)
    _read_only_lock(monkeypatch)
    assert main(["run", "--resume", str(run_copy), "--quiet"]) == 2
    one_line_error(capsys, run_copy / ".lock", "Read-only file system")
    assert _snapshot(run_copy) == before


def test_disk_full_at_resume(run_copy, monkeypatch, capsys):
    """The lock's pid write fails with ENOSPC, a write() that names no file: the run folder is named, and
    nothing in it changes (the lock file keeps the pid it had)."""
    (run_copy / "summary.json").unlink()
    (run_copy / ".lock").write_bytes(b"4242424")
    before = _snapshot(run_copy)
    monkeypatch.setattr(os, "pwrite", _fail_on(errno.ENOSPC))
    assert main(["run", "--resume", str(run_copy), "--quiet"]) == 2
    one_line_error(capsys, run_copy, "No space left on device", f"free some space, then continue the run with "
                   f"`moelab run --resume {run_copy}`")
    assert _snapshot(run_copy) == before


# ------------------------------------------------------------------ report


def test_report_of_a_read_only_run(run_copy, monkeypatch, capsys):
    before = _snapshot(run_copy)
    _read_only_temp_files(monkeypatch)
    assert main(["report", str(run_copy)]) == 2
    err = one_line_error(capsys, run_copy, "Read-only file system", "choose a writable place")
    assert "abc123" not in err  # the file the user would get, not our temp file
    assert _snapshot(run_copy) == before


def test_disk_full_at_report(run_copy, monkeypatch, capsys):
    _disk_full_writes(monkeypatch)
    assert main(["report", str(run_copy)]) == 2
    one_line_error(capsys, run_copy, "No space left on device")
    assert not list(run_copy.rglob("*.tmp")) and not (run_copy / "report.html").exists()
    assert not (run_copy / "report_files").exists()  # made by this call, emptied by the failure: removed


# ------------------------------------------------------------------ compare --csv


def test_compare_csv_to_a_folder(run_copy, tmp_path, capsys):
    folder = tmp_path / "tables"
    folder.mkdir()
    assert main(["compare", str(run_copy), "--csv", str(folder)]) == 2
    one_line_error(capsys, folder, "Is a directory", "give a file path")
    assert list(folder.iterdir()) == []


def test_compare_csv_under_a_regular_file(run_copy, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["compare", str(run_copy), "--csv", str(tmp_path / "afile" / "sub" / "c.csv")]) == 2
    one_line_error(capsys, tmp_path / "afile", "Not a directory")


@pytest.mark.parametrize("code, says", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"),
                                        (errno.ENOSPC, "No space left on device")])
def test_compare_csv_to_an_unwritable_place(run_copy, tmp_path, monkeypatch, capsys, code, says):
    _read_only_temp_files(monkeypatch, code)
    target = tmp_path / "c.csv"
    assert main(["compare", str(run_copy), "--csv", str(target)]) == 2
    err = one_line_error(capsys, target, says)
    assert "abc123" not in err and not target.exists()


# ------------------------------------------------------------------ data


def test_data_check_with_an_unwritable_cache(tmp_path, monkeypatch, capsys):
    """The decoded-data cache under a file: data sets still load (one warning), the verdict is the data's."""
    import gzip

    import numpy as np

    for stem, arr in (("train-images-idx3-ubyte", np.zeros((4, 28, 28))), ("train-labels-idx1-ubyte", np.arange(4)),
                      ("t10k-images-idx3-ubyte", np.zeros((2, 28, 28))), ("t10k-labels-idx1-ubyte", np.arange(2))):
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        head = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
        (tmp_path / "data" / "mnist").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "mnist" / f"{stem}.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    assert main(["data", "check", "--data-dir", str(tmp_path / "data")]) == 1  # fashion-mnist, cifar10 missing
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "mnist          OK" in captured.out
    lines = captured.err.splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("moelab data check: 2 data sets missing: fashion-mnist, cifar10")
    if len(lines) == 2:
        assert "cannot write the" in lines[0] and "MOELAB_CACHE_DIR" in lines[0]


def test_data_error_leaves_no_run_folder_and_a_corrected_run_goes_on(real_data_dir, tmp_path):
    """A missing data set refuses the run before training: no half-made --out, so the corrected command
    (same --out, the right --data-dir) is not refused as 'already holds files'."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-mirror").mkdir()
    env = {**os.environ, "MOELAB_CACHE_DIR": str(tmp_path / "cache"),
           "MOELAB_MIRRORS": (tmp_path / "no-mirror").as_uri()}  # no download either
    env.pop("MOELAB_DATA_DIR", None)
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "moelab", "run", "mnist-jacobs", "--out", str(out), "--quiet",
           "--set", "train.epochs=1", "--set", "data.train_limit=1000", "--set", "data.test_limit=500",
           "--set", "compute.threads=1"]
    p = subprocess.run([*cmd, "--data-dir", str(tmp_path / "empty")], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert "Data set 'mnist' not found" in p.stderr and str(tmp_path / "empty") in p.stderr
    assert not out.exists()
    p = subprocess.run([*cmd, "--data-dir", str(real_data_dir)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    assert (out / "summary.json").is_file()
